"""SmolLM2-135M compressed and then recovered by a short retraining: perplexity, parameters and bytes.

    uv run python benchmarks/compress_recovery_smollm2.py [--steps 100] [--only LABEL ...] [--skip LABEL ...]

Rows (each starts from a fresh copy of the bundled model):

* float32, and float32 + a LoRA (r=8, all Linears) trained with the language-model loss on the
  same lines for the same steps: the reference for what the retraining data alone buys;
* RTN 4-bit and 3-bit (group 64, output rows), each plain and with an INT2.1-style error-correcting
  LoRA (r=16 on every quantised layer) distilled from the float model
  (:func:`paretune.compress.correction.correct_quantization`);
* GlowQ shared right factors (rank 32) on the same 4-bit and 3-bit bases, as initialised from the
  SVD of W − Q(W) (no training);
* 50% magnitude (per layer) and 50% Wanda pruning, each plain and retrained PERP-style: biases and
  norms (SmolLM2 has no biases: its RMSNorm scales) and, for magnitude, a MaskLoRA (r=8) merged
  back with the masks kept;
* a recursive SmolLM2: 30 layers tied into 15 shared blocks (average init) with a rank-64 per-depth
  LoRA from the SVD of each layer's difference to its block, before and after uptraining every
  parameter by distillation from the float model.

Held-out text: the test split of country -> capital and country -> currency, prompt + completion
(the text of benchmarks/compress_smollm2.py). Retraining data: the training split of the same
tasks, 8 lines per step; distillation and the language-model loss both use every token of a line
(the loss the perplexity measures). Prints a
markdown table; times are wall seconds per row (load, change, retrain, evaluate).
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch

import paretune
import paretune.models
from paretune.compress import make_recursive, perp, prune, quantize, recursive_counts
from paretune.compress.correction import correct_quantization
from paretune.compress.lowrank import distill
from paretune.data import get_task

from compress_smollm2 import TASKS, perplexity, texts

BATCH = 8


def train_rows() -> list[dict]:
    rows = []
    for name in TASKS:
        rows += list(get_task(name).splits()[0].rows)
    g = torch.Generator().manual_seed(0)
    return [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]


def distill_batches(tok, lines: list[str]) -> list[dict]:
    return [dict(tok(lines[i:i + BATCH], return_tensors="pt", padding=True)) for i in range(0, len(lines), BATCH)]


def size(model) -> tuple[int, int]:
    c = paretune.count(model)
    return c["base"] + c["trainable"], c["base_bytes"] + c["stored_bytes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="retraining steps of 8 lines each")
    ap.add_argument("--only", nargs="*", default=None, help="run only the rows whose label starts with one of these")
    ap.add_argument("--skip", nargs="*", default=(), help="leave out the rows whose label starts with one of these")
    args = ap.parse_args()
    steps = args.steps
    test = texts("test")
    rows_train = train_rows()
    lines_train = [r["prompt"] + r["completion"] for r in rows_train]
    lm_rows = [{"prompt": "", "completion": line} for line in lines_train]  # an empty prompt: every token trains
    teacher, tok = paretune.models.load("smollm2-135m")
    tok.padding_side = "right"
    batches = distill_batches(tok, lines_train)
    fresh = copy.deepcopy(teacher)
    results = []

    def run(label: str, settings: str, change) -> None:
        if args.only and not any(label.startswith(o) for o in args.only):
            return
        if any(label.startswith(o) for o in args.skip):
            return
        t = time.perf_counter()
        model = copy.deepcopy(fresh)
        extra = change(model) or ""
        params, nbytes = size(model)
        ppl = perplexity(model, tok, test)
        sec = time.perf_counter() - t
        results.append((label, settings + extra, params, nbytes, ppl, sec))
        print(f"{label}: perplexity {ppl:.3f}, {params:,} parameters, {nbytes / 2**20:.1f} MiB ({sec:.0f} s)", flush=True)

    def task_train(model, **kw):
        return paretune.train(model, lm_rows, tokenizer=tok, steps=steps, batch_size=BATCH, seed=0,
                              progress=False, **kw)

    run("float32", "-", lambda m: None)
    run("float32 + LoRA", f"r=8 on every Linear, LM loss, {steps} steps",
        lambda m: task_train(m, method="lora", options={"r": 8}, lr=1e-3) and None)
    for bits in (4, 3):
        q = f"RTN {bits}-bit"
        run(q, "group 64", lambda m, b=bits: quantize(m, bits=b, group_size=64, progress=False) and None)
        run(f"{q} + error-correcting LoRA", f"group 64; LoRA r=16 distilled from float32, {steps} steps",
            lambda m, b=bits: (quantize(m, bits=b, group_size=64, progress=False),
                               correct_quantization(m, teacher, batches, steps=steps, lr=1e-3, r=16,
                                                    progress=False)) and None)
        run(f"{q} + GlowQ", "group 64; shared right factors, rank 32, SVD init", lambda m, b=bits: glowq_row(m, b))

    def pruned(m, method: str) -> None:
        kw = {"calibration": [tok(x, return_tensors="pt") for x in lines_train[:32]]} if method == "wanda" else {}
        prune(m, 0.5, method=method, progress=False, **kw)

    for method, label in (("magnitude", "50% magnitude"), ("wanda", "50% Wanda")):
        run(label, "per layer" if method == "magnitude" else "per output row", lambda m, x=method: pruned(m, x))
        run(f"{label} + PERP (norms)", f"RMSNorm scales retrained, LM loss, {steps} steps",
            lambda m, x=method: (pruned(m, x), perp(m, lm_rows, tok, mode="norms-biases", steps=steps, lr=1e-3,
                                                     batch_size=BATCH, seed=0, progress=False)) and None)
    run("50% magnitude + PERP (MaskLoRA)", f"r=8, merged, masks kept, LM loss, {steps} steps",
        lambda m: (pruned(m, "magnitude"), perp(m, lm_rows, tok, mode="lora", r=8, steps=steps, lr=1e-3,
                                                 batch_size=BATCH, seed=0, progress=False)) and None)

    def recursive(m, uptrain: bool) -> str:
        make_recursive(m, 15, init="average", lora_rank=64)
        if uptrain:
            distill(m, teacher, batches, steps, lr=1e-4, train="all", progress=False)
        c = recursive_counts(m)
        return f" ({c['shared_blocks']:,} in the blocks, {c['relaxation']:,} in the per-depth LoRA)"

    run("recursive 30 -> 15 layers", "average init, per-depth LoRA r=64", lambda m: recursive(m, False))
    run("recursive 30 -> 15 layers, uptrained", f"the same, every parameter distilled from float32, {steps} steps",
        lambda m: recursive(m, True))
    print()
    print(f"SmolLM2-135M, held-out text of {', '.join(TASKS)} ({len(test)} lines); retraining on "
          f"{len(rows_train)} training lines; {platform.machine()} CPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads.")
    print()
    print("| model | settings | parameters | bytes | perplexity | seconds |")
    print("|---|---|---:|---:|---:|---:|")
    for label, settings, params, nbytes, ppl, sec in results:
        print(f"| {label} | {settings} | {params:,} | {nbytes / 2**20:.1f} MiB | {ppl:,.2f} | {sec:.0f} |")


def glowq_row(model, bits: int) -> str:
    from paretune.compress.glowq import glowq, glowq_report

    glowq(model, bits=bits, rank=32, group_size=64, progress=False)
    r = glowq_report(model)
    return f" ({r['parameters']:,} correction parameters)"


if __name__ == "__main__":
    main()
