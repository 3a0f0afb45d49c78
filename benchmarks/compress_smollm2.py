"""SmolLM2-135M compressed without retraining: perplexity on held-out text of the built-in generation
tasks for the float model, round-to-nearest 4-bit and 3-bit weights (both grouping axes), and 50%
magnitude and Wanda pruning, with each variant's parameters and bytes.

    uv run python benchmarks/compress_smollm2.py

Held-out text: the test split of country -> capital and country -> currency, each example's prompt
followed by its completion; perplexity = exp(mean next-token loss over every token after the
first). Wanda's calibration: 32 training examples of the same tasks (disjoint from the test text).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch

import paretune
import paretune.models
from paretune.compress import prune, quantize
from paretune.data import get_task

TASKS = ("country-capital", "country-currency")


def texts(split: str) -> list[str]:
    out = []
    for name in TASKS:
        train, test = get_task(name).splits()
        rows = (test if split == "test" else train).rows
        out += [r["prompt"] + r["completion"] for r in rows]
    return out


@torch.no_grad()
def perplexity(model, tokenizer, lines: list[str], batch: int = 16) -> float:
    total, count = 0.0, 0
    for i in range(0, len(lines), batch):
        enc = tokenizer(lines[i:i + batch], return_tensors="pt", padding=True)
        logits = model(**enc).logits[:, :-1].float()
        target = enc["input_ids"][:, 1:]
        mask = enc["attention_mask"][:, 1:].bool()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        total += float(loss[mask].sum())
        count += int(mask.sum())
    return math.exp(total / count)


def size(model) -> tuple[int, int]:
    c = paretune.count(model)
    return c["base"], c["base_bytes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group-size", type=int, default=64, help="quantisation group (SmolLM2's widths: 576, 1536, 192)")
    args = ap.parse_args()
    test, calib = texts("test"), texts("train")[:32]
    rows = []

    def run(label: str, change) -> None:
        t = time.perf_counter()
        model, tok = paretune.models.load("smollm2-135m")
        tok.padding_side = "right"
        info = change(model, tok) or ""
        params, nbytes = size(model)
        ppl = perplexity(model, tok, test)
        rows.append((label, info, params, nbytes, ppl, time.perf_counter() - t))
        print(f"{label}: perplexity {ppl:.3f}, {nbytes / 2**20:.1f} MiB ({time.perf_counter() - t:.0f} s)", flush=True)

    run("float32", lambda m, t: None)
    for bits in (4, 3):
        for axis in ("out", "in"):
            run(f"RTN {bits}-bit, groups along {axis}",
                lambda m, t, b=bits, a=axis: quantize(m, bits=b, group_size=args.group_size, axis=a, progress=False)
                and f"group {args.group_size}")

    def wanda(m, t):
        batches = [t(line, return_tensors="pt") for line in calib]
        r = prune(m, 0.5, method="wanda", calibration=batches, progress=False)
        return f"{r['sparsity']:.3f} of the targeted weights zero"

    def magnitude(m, t):
        r = prune(m, 0.5, method="magnitude", progress=False)
        return f"{r['sparsity']:.3f} of the targeted weights zero"

    run("50% magnitude (per layer)", magnitude)
    run("50% Wanda", wanda)
    print()
    print(f"SmolLM2-135M, held-out text of {', '.join(TASKS)} ({len(test)} lines); "
          f"{platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads.")
    print()
    print("| model | settings | parameters | bytes | perplexity |")
    print("|---|---|---:|---:|---:|")
    for label, info, params, nbytes, ppl, _ in rows:
        print(f"| {label} | {info} | {params:,} | {nbytes / 2**20:.1f} MiB | {ppl:.3f} |")


if __name__ == "__main__":
    main()
