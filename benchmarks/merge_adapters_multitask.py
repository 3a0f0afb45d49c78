"""Two LoRA adapters (SmolLM2-135M on country -> capital and country -> currency) merged into one
by each method of paretune.merging.methods, at rank 16 and exact, against each single adapter and
against both served per sample (row i gets the adapter of its own task: the upper bound).

    uv run python benchmarks/merge_adapters_multitask.py --out /tmp/merge-multitask

Prints a markdown table (exact match of the whole completion on each task's held-out set, and
their mean) and writes it, with the command line, the machine and the timings, to ``--table``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

import paretune
import paretune.models
from paretune.data import get_task
from paretune.merging.adapters import merge_adapters
from paretune.training import train
from paretune.training.batching import collate, encode, summed_loss
from paretune.training.trainer import evaluate

TASKS = {"capital": "country-capital", "currency": "country-currency"}
MERGES = [  # (method, options): the papers' defaults where they give one
    ("task_arithmetic", {}),
    ("weighted_average", {}),
    ("ties", {"density": 0.2}),
    ("dare_linear", {"density": 0.5, "seed": 0}),
    ("dare_ties", {"density": 0.5, "seed": 0}),
    ("pcb", {"ratio": 0.1}),
]


def exact_match(model, enc, pad_id) -> float:
    return evaluate(model, enc, pad_id, torch.device("cpu"))["exact_match"]


@torch.no_grad()
def per_sample_em(model, encs: dict, pad_id: int, batch_size: int = 64) -> dict[str, float]:
    """Both test sets in mixed batches; row i runs the adapter of its own task."""
    rows = [(key, i) for key, enc in encs.items() for i in range(len(enc))]
    rows = rows[::2] + rows[1::2]  # interleave the tasks, so that batches mix them
    right = {k: 0 for k in encs}
    model.eval()
    for start in range(0, len(rows), batch_size):
        part = rows[start:start + batch_size]
        # one batch per task-encoding, padded to a common width, concatenated
        batches = [collate(encs[k], [i], pad_id, torch.device("cpu")) for k, i in part]
        width = max(b["input_ids"].shape[1] for b in batches)

        def pad(t, value):
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        batch = {"input_ids": torch.cat([pad(b["input_ids"], pad_id) for b in batches]),
                 "attention_mask": torch.cat([pad(b["attention_mask"], 0) for b in batches]),
                 "labels": torch.cat([pad(b["labels"], -100) for b in batches])}
        with paretune.per_sample(model, [k for k, _ in part]):
            _, correct = summed_loss(model, batch, "generation")
        for (k, _), ok in zip(part, correct.all(dim=-1).tolist()):
            right[k] += int(ok)
    return {k: right[k] / len(encs[k]) for k in encs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="merge-multitask", help="folder for the two trained adapters")
    ap.add_argument("--table", default="merge_multitask_table.md", help="markdown file the results go to")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--targets", default="all-linear", help="'all-linear' or a comma list such as q_proj,v_proj")
    ap.add_argument("--ranks", default="16,exact", help="merged ranks: integers and/or 'exact'")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    out = Path(args.out)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    model, tok = paretune.models.load("smollm2-135m")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    splits = {k: get_task(t).splits() for k, t in TASKS.items()}
    encs = {k: encode(test, tok, max_length=64) for k, (_, test) in splits.items()}

    results: list[tuple[str, dict[str, float], str]] = []
    t0 = time.perf_counter()
    results.append(("base model", {k: exact_match(model, encs[k], pad_id) for k in TASKS}, ""))
    timings["evaluate base"] = time.perf_counter() - t0

    for key, (train_ds, _) in splits.items():
        folder = out / key
        t0 = time.perf_counter()
        if (folder / "paretune.json").is_file():
            paretune.load(model, folder, name=key)
            timings[f"load {key}"] = time.perf_counter() - t0
        else:
            if paretune.adapters(model):
                paretune.set_active(model, [])
            rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in train_ds.rows]
            train(model, rows, tokenizer=tok, method="lora", options={"r": args.r, "alpha": float(args.r)},
                  targets=targets, name=key, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=0,
                  progress=False)
            model.eval()
            paretune.save(model, folder, name=key)
            timings[f"train {key}"] = time.perf_counter() - t0
        print(f"{key}: {timings.get(f'train {key}', timings.get(f'load {key}')):.1f} s", flush=True)

    for key in TASKS:
        paretune.set_active(model, [key])
        results.append((f"{key} adapter alone", {k: exact_match(model, encs[k], pad_id) for k in TASKS}, ""))
    t0 = time.perf_counter()
    results.append(("both, per sample (upper bound)", per_sample_em(model, encs, pad_id), ""))
    timings["evaluate per sample"] = time.perf_counter() - t0

    ranks = [None if r == "exact" else int(r) for r in args.ranks.split(",")]
    for method, opts in MERGES:
        for rank in ranks:
            label = f"{method} ({', '.join(f'{k}={v}' for k, v in opts.items()) or 'defaults'}), " \
                    f"{'exact' if rank is None else f'rank {rank}'}"
            t0 = time.perf_counter()
            rep = merge_adapters(model, list(TASKS), method=method, rank=rank, out_name="merged", progress=False,
                                 **opts)
            t_merge = time.perf_counter() - t0
            ems = {k: exact_match(model, encs[k], pad_id) for k in TASKS}
            t_eval = time.perf_counter() - t0 - t_merge
            note = f"r={rep['rank']}, SVD rel. error {rep['rel_error']:.3g}, merge {t_merge:.1f} s, eval {t_eval:.1f} s"
            results.append((label, ems, note))
            print(f"{label}: {ems} ({note})", flush=True)
            paretune.remove(model, "merged")

    lines = ["| configuration | capital EM | currency EM | mean | notes |", "|---|---:|---:|---:|---|"]
    for label, ems, note in results:
        mean = sum(ems.values()) / len(ems)
        lines.append(f"| {label} | {ems['capital']:.4f} | {ems['currency']:.4f} | {mean:.4f} | {note} |")
    table = "\n".join(lines)
    print(table)
    total = time.perf_counter() - t_start
    n_test = {k: len(e) for k, e in encs.items()}
    text = "\n".join([
        "# Merging two LoRA adapters: SmolLM2-135M, country -> capital and country -> currency", "",
        "```bash", "uv run python " + " ".join(shlex.quote(a) for a in sys.argv), "```", "",
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores ({platform.processor() or platform.platform()}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads.",
        f"LoRA r={args.r}, alpha={args.r}, targets {args.targets}; {args.steps} steps of {args.batch_size}, "
        f"lr {args.lr}, seed 0. Held-out items: capital {n_test['capital']}, currency {n_test['currency']}. "
        "Merges: lam=1, no weights (uniform), options as shown.", "",
        table, "",
        "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()) + f"; whole run {total:.1f}.", "",
    ])
    Path(args.table).parent.mkdir(parents=True, exist_ok=True)
    from paretune.core.atomic import atomic_write_text

    atomic_write_text(args.table, text)


if __name__ == "__main__":
    main()
