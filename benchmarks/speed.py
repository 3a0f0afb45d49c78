"""Speed and memory of paretune against PEFT and the bare base model, as ratios measured in one run.

    uv run python benchmarks/speed.py                 # CPU (default), SmolLM2-135M, LoRA r=16 all-linear
    uv run python benchmarks/speed.py --device cuda   # on a GPU
    uv run python benchmarks/speed.py --quick         # fewer repeats and adapters (a smoke run)

What it measures (medians over ``--repeats`` repeats; the three variants of each measurement
are interleaved within every repeat, so machine noise hits them alike):

(a) forward, no grad, batch 4 x 128 tokens: unmerged LoRA / base, for paretune and PEFT;
(b) a mixed batch where every row has its own adapter, for 4, 16 and 64 distinct adapters:
    paretune's ``per_sample`` and PEFT's ``adapter_names`` / base. The batch keeps 512 tokens:
    N rows of 512/N tokens (4 x 128, 16 x 32, 64 x 8);
(c) a training step (forward, backward, AdamW step) on batch 4 x 128 with a causal-LM loss:
    LoRA / full fine-tuning, time and peak memory, for paretune and PEFT. Step times are taken in
    one process, the three variants' steps interleaved (``--steps`` each); peak memory is taken
    with each variant alone in its own subprocess: the peak of CUDA allocations on a GPU, and on a
    CPU the peak resident set size sampled every 2 ms during the steps, minus the size before.

It prints a table and writes JSON (``--out``) with the machine, versions and every number.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

MODEL = "smollm2-135m"
TOKENS = 512  # per batch, all measurements


def load_base(device: str) -> torch.nn.Module:
    from paretune import models

    model, _ = models.load(MODEL, task="causal-lm")
    return model.to(device).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def ids_for(rows: int, device: str, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (rows, TOKENS // rows), generator=g).to(device)


def randomize_adapters(model: torch.nn.Module, seed: int) -> None:
    """Non-zero adapter weights (B = 0 at init would let a lazy path skip work)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or ".deltas." in n:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.device, p.dtype))


def paretune_lora(base: torch.nn.Module, names: list[str], rank: int) -> torch.nn.Module:
    import paretune

    model = copy.deepcopy(base)
    for i, name in enumerate(names):
        paretune.adapt(model, "lora", name=name, r=rank, alpha=2 * rank, targets="all-linear")
    randomize_adapters(model, 1)
    paretune.set_active(model, names[:1])
    return model


def peft_lora(base: torch.nn.Module, names: list[str], rank: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0)
    model = get_peft_model(copy.deepcopy(base), cfg, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, cfg)
    randomize_adapters(model, 1)
    model.set_adapter(names[0])
    return model.eval()


def measure_forward(device: str, repeats: int, rank: int) -> dict:
    base = load_base(device)
    vocab = base.config.vocab_size
    ours, theirs = paretune_lora(base, ["task0"], rank), peft_lora(base, ["task0"], rank)
    ids = ids_for(4, device, vocab)
    runs = {"base": lambda: base(input_ids=ids), "paretune": lambda: ours(input_ids=ids),
            "peft": lambda: theirs(input_ids=ids)}
    times = _interleaved(runs, repeats, device)
    del ours, theirs
    return {"batch": [4, TOKENS // 4], "seconds": times,
            "ratio": {k: times[k] / times["base"] for k in ("paretune", "peft")}}


def measure_mixed(device: str, repeats: int, rank: int, counts: list[int]) -> dict:
    import paretune

    base = load_base(device)
    vocab = base.config.vocab_size
    out = {}
    for n in counts:
        names = [f"task{i}" for i in range(n)]
        ours, theirs = paretune_lora(base, names, rank), peft_lora(base, names, rank)
        ids = ids_for(n, device, vocab)

        def run_ours():
            with paretune.per_sample(ours, names):
                ours(input_ids=ids)

        runs = {"base": lambda: base(input_ids=ids), "paretune": run_ours,
                "peft": lambda: theirs(input_ids=ids, adapter_names=names)}
        times = _interleaved(runs, repeats, device)
        out[str(n)] = {"batch": [n, TOKENS // n], "seconds": times,
                       "ratio": {k: times[k] / times["base"] for k in ("paretune", "peft")},
                       "paretune_speedup_over_peft": times["peft"] / times["paretune"]}
        del ours, theirs
    return out


def _interleaved(runs: dict, repeats: int, device: str) -> dict:
    samples: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(repeats):
            for k, fn in runs.items():
                samples[k].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in samples.items()}


# -- (c) training step, one subprocess per variant -------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Peak resident set size above the level at start, sampled every 2 ms (Linux)."""

    def __init__(self):
        self.start = rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def training_step(variant: str, base: torch.nn.Module, device: str, rank: int, copy_base: bool = True):
    """(step function, trainable count) of one variant: full fine-tuning, paretune or PEFT LoRA."""
    if variant == "full":
        model = copy.deepcopy(base) if copy_base else base
        for p in model.parameters():
            p.requires_grad_(True)
    elif variant == "paretune":
        model = paretune_lora(base, ["task0"], rank)
    else:
        model = peft_lora(base, ["task0"], rank)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = ids_for(4, device, model.config.vocab_size)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state exists from here on, as in a real run
    return step, sum(p.numel() for p in params)


def train_variant(variant: str, device: str, steps: int, rank: int) -> dict:
    """Runs in a subprocess: ``steps`` training steps of one variant alone; its peak memory."""
    step, trainable = training_step(variant, load_base(device), device, rank, copy_base=False)
    times = []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(steps):
            times.append(timed(step, device))
        peak = torch.cuda.max_memory_allocated() - before
    else:
        with PeakRss() as mem:
            for _ in range(steps):
                times.append(timed(step, device))
        peak = mem.peak - mem.start
    return {"seconds_alone": statistics.median(times), "peak_bytes": int(peak), "trainable": trainable}


def measure_training(device: str, steps: int, rank: int) -> dict:
    base = load_base(device)
    steps_of = {v: training_step(v, base, device, rank)[0] for v in ("full", "paretune", "peft")}
    samples: dict[str, list[float]] = {v: [] for v in steps_of}
    for _ in range(steps):
        for v, fn in steps_of.items():
            samples[v].append(timed(fn, device))
    del steps_of, base
    out = {}
    for variant in ("full", "paretune", "peft"):
        cmd = [sys.executable, __file__, "--train-variant", variant, "--device", device, "--steps", "3",
               "--rank", str(rank)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"training variant {variant} failed:\n{res.stderr[-3000:]}")
        out[variant] = json.loads(res.stdout.strip().splitlines()[-1])
        out[variant]["seconds"] = statistics.median(samples[variant])
    for v in ("paretune", "peft"):
        out[v]["time_vs_full"] = out[v]["seconds"] / out["full"]["seconds"]
        out[v]["memory_vs_full"] = out[v]["peak_bytes"] / max(1, out["full"]["peak_bytes"])
    out["paretune_time_vs_peft"] = out["paretune"]["seconds"] / out["peft"]["seconds"]
    out["paretune_memory_vs_peft"] = out["paretune"]["peak_bytes"] / max(1, out["peft"]["peak_bytes"])
    return out


def machine(device: str) -> dict:
    import peft
    import transformers

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    else:
        try:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                               if line.startswith("model name"))
        except (OSError, StopIteration):
            info["cpu"] = platform.processor()
    return info


def report(res: dict) -> str:
    f = res["forward"]
    lines = [f"paretune speed benchmark, {MODEL}, LoRA r={res['rank']} all-linear, device {res['machine']['device']}",
             f"machine: {res['machine'].get('gpu') or res['machine'].get('cpu')}, {res['machine']['cpus']} CPUs",
             "", "(a) unmerged forward / base forward (batch 4 x 128)",
             f"    paretune {f['ratio']['paretune']:.3f}x   PEFT {f['ratio']['peft']:.3f}x   "
             f"(base {f['seconds']['base'] * 1000:.0f} ms)", "",
             "(b) mixed batch, one adapter per row / base forward (512 tokens)"]
    for n, m in res["mixed"].items():
        lines.append(f"    {n:>3} adapters ({m['batch'][0]} x {m['batch'][1]}): paretune {m['ratio']['paretune']:.3f}x   "
                     f"PEFT {m['ratio']['peft']:.3f}x   paretune {m['paretune_speedup_over_peft']:.2f}x faster than PEFT")
    t = res.get("training")
    if t:
        lines += ["", "(c) training step (batch 4 x 128): LoRA / full fine-tuning",
                  f"    paretune time {t['paretune']['time_vs_full']:.3f}x, memory {t['paretune']['memory_vs_full']:.3f}x",
                  f"    PEFT     time {t['peft']['time_vs_full']:.3f}x, memory {t['peft']['memory_vs_full']:.3f}x",
                  f"    paretune / PEFT: time {t['paretune_time_vs_peft']:.3f}x, peak memory {t['paretune_memory_vs_peft']:.3f}x",
                  f"    (full: {t['full']['seconds']:.2f} s/step, peak +{t['full']['peak_bytes'] / 2**20:.0f} MiB)"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=9, help="timed training steps per variant")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapters", default="4,16,64", help="adapter counts for the mixed batch")
    ap.add_argument("--quick", action="store_true", help="3 repeats, 2 steps, 4 and 16 adapters")
    ap.add_argument("--no-training", action="store_true", help="skip (c)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--train-variant", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.train_variant:
        print(json.dumps(train_variant(args.train_variant, args.device, args.steps, args.rank)))
        return
    if args.quick:
        args.repeats, args.steps, args.adapters = 3, 2, "4,16"
    counts = [int(c) for c in args.adapters.split(",") if c]
    for c in counts:
        if TOKENS % c:
            ap.error(f"--adapters: {c} does not divide {TOKENS} tokens")
    res = {"machine": machine(args.device), "rank": args.rank, "repeats": args.repeats}
    res["forward"] = measure_forward(args.device, args.repeats, args.rank)
    res["mixed"] = measure_mixed(args.device, args.repeats, args.rank, counts)
    if not args.no_training:
        res["training"] = measure_training(args.device, args.steps, args.rank)
    print(report(res))
    if args.out:
        from paretune.core.atomic import atomic_write_text

        atomic_write_text(args.out, json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
