"""Speed and memory of paretune against PEFT and the bare base model, as ratios measured in one run.

    uv run python benchmarks/speed.py                 # CPU (default), SmolLM2-135M, LoRA r=16 all-linear
    uv run python benchmarks/speed.py --device cuda   # on a GPU
    uv run python benchmarks/speed.py --quick         # fewer repeats and adapters (a smoke run)
    uv run python benchmarks/speed.py --switching --sparse-training   # (a)-(c), then (d) and (e)
    uv run python benchmarks/speed.py --only switching,sparse-training # (d) and (e) alone

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

Two more sections, off by default (``--switching``, ``--sparse-training``, or name them in ``--only``):

(d) switching a merged model from adapter "a" to adapter "b" (``unmerge(a)``, ``set_active([b])``,
    ``merge(b)``) at equal trainable count: SHiRA r (random mask, ``r·(d_in + d_out)`` entries per
    layer; "a" and "b" get masks from seeds 0 and 1) against LoRA r (``B·A`` added and taken out),
    all-linear, both adapters with non-zero values. Every repeat times a -> b and b -> a for each
    method, interleaved; the median of those switches is reported, and LoRA / SHiRA. After the
    last switch the model's logits on a 2 x 8 input are checked (assert) against a fresh copy of
    the base with only "b" (same values) merged. The SHiRA paper (arXiv 2406.13175) reports 5-16x
    faster switching than LoRA; this measures paretune's.
(e) a training step of the sparse / spectral methods against LoRA r, as (c) (batch 4 x 128,
    AdamW, ``--steps`` steps per variant, interleaved in one process; peak memory from one
    subprocess per variant): SHiRA r (same count as LoRA r) and LoCA with one ``n_frequency`` for
    every layer, ``round(LoRA's trainable count / (3 · layers))``, so that LoCA's 3·n per layer
    (n coefficients + 2n locations) totals LoRA's count. LoCA alternates what it trains: "loca"
    is the coefficients phase (every step after the first ``location_fraction`` = 10% of a run,
    and 10 of every 30 before), "loca-locations" the locations phase (the other 20 of 30 in the
    first 10%); the phase is set with the trainer's hook ``on_step`` and kept for the timed steps.

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
SECTIONS = ("forward", "mixed", "training", "switching", "sparse-training")


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
    """Non-zero adapter weights (B = 0 at init would let a lazy path skip work). LoCA's
    ``locations`` keep their U(0, 1) draw: they are positions, and noise around 0 would pile every
    coefficient onto the first row and column."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ("lora_" in n or ".deltas." in n) and not n.endswith(".locations"):
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


# LoCA's phase for (e): the trainer's on_step(step, total) hook sets what the next step trains.
LOCA_PHASES = {"loca": (500, 1000, "coefficients"), "loca-locations": (10, 1000, "locations")}


def sparse_adapter(base: torch.nn.Module, variant: str, rank: int, n_frequency: int | None,
                   copy_base: bool = True) -> torch.nn.Module:
    """A copy of ``base`` with one all-linear adapter "task0" for (e): SHiRA r or LoCA n_frequency
    (its phase set as in LOCA_PHASES), values non-zero."""
    import paretune
    from paretune.core.delta import Delta

    model = copy.deepcopy(base) if copy_base else base
    if variant == "shira":
        paretune.adapt(model, "shira", name="task0", r=rank, targets="all-linear")
    else:
        if n_frequency is None:
            raise ValueError("LoCA needs n_frequency")
        paretune.adapt(model, "loca", name="task0", n_frequency=n_frequency, targets="all-linear")
        step, total, phase = LOCA_PHASES[variant]
        for m in model.modules():
            if isinstance(m, Delta):
                m.on_step(step, total)
                assert m.phase == phase, (m.phase, phase)
    randomize_adapters(model, 1)
    return model


def training_step(variant: str, base: torch.nn.Module, device: str, rank: int, copy_base: bool = True,
                  n_frequency: int | None = None):
    """(step function, trainable count) of one variant: full fine-tuning, paretune or PEFT LoRA,
    or (for (e)) paretune SHiRA r, LoCA ``n_frequency`` in either phase ("loca", "loca-locations")."""
    if variant == "full":
        model = copy.deepcopy(base) if copy_base else base
        for p in model.parameters():
            p.requires_grad_(True)
    elif variant == "paretune":
        model = paretune_lora(base, ["task0"], rank)
    elif variant in ("shira", *LOCA_PHASES):
        model = sparse_adapter(base, variant, rank, n_frequency, copy_base)
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


def train_variant(variant: str, device: str, steps: int, rank: int, n_frequency: int | None = None) -> dict:
    """Runs in a subprocess: ``steps`` training steps of one variant alone; its peak memory."""
    step, trainable = training_step(variant, load_base(device), device, rank, copy_base=False,
                                    n_frequency=n_frequency)
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
        out[variant] = variant_alone(variant, device, rank)
        out[variant]["seconds"] = statistics.median(samples[variant])
    for v in ("paretune", "peft"):
        out[v]["time_vs_full"] = out[v]["seconds"] / out["full"]["seconds"]
        out[v]["memory_vs_full"] = out[v]["peak_bytes"] / max(1, out["full"]["peak_bytes"])
    out["paretune_time_vs_peft"] = out["paretune"]["seconds"] / out["peft"]["seconds"]
    out["paretune_memory_vs_peft"] = out["paretune"]["peak_bytes"] / max(1, out["peft"]["peak_bytes"])
    return out


def variant_alone(variant: str, device: str, rank: int, n_frequency: int | None = None) -> dict:
    """Peak memory (and a time) of 3 training steps of ``variant`` alone, in a subprocess."""
    cmd = [sys.executable, __file__, "--train-variant", variant, "--device", device, "--steps", "3",
           "--rank", str(rank)]
    if n_frequency is not None:
        cmd += ["--n-frequency", str(n_frequency)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"training variant {variant} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# -- (d) switching a merged model between two adapters -----------------------------------------

def adapter_pair(base: torch.nn.Module, method: str, rank: int) -> tuple[torch.nn.Module, dict]:
    """A copy of ``base`` with adapters "a" and "b" of ``method`` (LoRA r or SHiRA r, all-linear,
    non-zero values), "a" active and merged; and the options of "b"."""
    import paretune

    if method == "lora":
        model, opts = paretune_lora(base, ["a", "b"], rank), {"r": rank, "alpha": 2 * rank}
    else:
        model = copy.deepcopy(base)
        for seed, name in enumerate(("a", "b")):  # seeds 0, 1: two different random masks
            paretune.adapt(model, "shira", name=name, r=rank, seed=seed, targets="all-linear")
        randomize_adapters(model, 1)
        opts = {"r": rank, "seed": 1}
    paretune.set_active(model, ["a"])
    paretune.merge(model, "a")
    return model, opts


def adapter_count(model: torch.nn.Module, name: str) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if f".deltas.{name}." in n)


def switch(model: torch.nn.Module, src: str, dst: str) -> None:
    """From merged ``src`` to merged ``dst``: what serving another task on a merged model costs."""
    import paretune

    paretune.unmerge(model, src)
    paretune.set_active(model, [dst])
    paretune.merge(model, dst)


def check_switched(model: torch.nn.Module, base: torch.nn.Module, method: str, opts: dict, device: str) -> dict:
    """Assert that ``model`` (switched to "b") gives the logits of a fresh copy of ``base`` with only
    "b" (its values copied) merged, on a 2 x 8 input; return the largest difference and, for scale,
    the largest change "b" makes to the base's logits."""
    import paretune

    fresh = copy.deepcopy(base)
    paretune.adapt(fresh, method, name="b", targets="all-linear", **opts)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    with torch.no_grad():
        for n, p in fresh.named_parameters():
            if ".deltas.b." in n:
                p.copy_(params[n])
        for n, b in fresh.named_buffers():  # SHiRA's positions: the same seed must give the same mask
            if ".deltas.b." in n:
                assert torch.equal(b, buffers[n]), f"{method}: {n} differs from the switched model's"
    paretune.merge(fresh, "b")
    ids = torch.randint(0, base.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        got, want, plain = (m(input_ids=ids).logits.float() for m in (model, fresh, base))
    err, effect = (got - want).abs().max().item(), (want - plain).abs().max().item()
    assert effect > 0, f"{method}: adapter b does not change the logits; the check would be void"
    assert err <= 1e-3 * effect, f"{method}: switched model differs from a fresh b-merged one by {err} (effect {effect})"
    return {"max_abs_diff": err, "max_abs_effect_of_b": effect}


def measure_switching(device: str, repeats: int, rank: int) -> dict:
    base = load_base(device)
    pairs = {m: adapter_pair(base, m, rank) for m in ("shira", "lora")}
    counts = {m: adapter_count(model, "b") for m, (model, _) in pairs.items()}
    assert counts["shira"] == counts["lora"], counts
    samples: dict[str, list[float]] = {m: [] for m in pairs}
    for model, _ in pairs.values():  # warm-up
        switch(model, "a", "b")
        switch(model, "b", "a")
    for _ in range(repeats):
        for src, dst in (("a", "b"), ("b", "a")):
            for m, (model, _) in pairs.items():
                samples[m].append(timed(lambda: switch(model, src, dst), device))
    out: dict = {"trainable_per_adapter": counts["lora"], "switches_timed": 2 * repeats}
    for m, (model, opts) in pairs.items():
        switch(model, "a", "b")
        out[m] = {"seconds": statistics.median(samples[m]), "check": check_switched(model, base, m, opts, device)}
    out["lora_over_shira"] = out["lora"]["seconds"] / out["shira"]["seconds"]
    return out


# -- (e) training step of the sparse / spectral methods against LoRA ----------------------------

def loca_n_frequency(base: torch.nn.Module, rank: int) -> tuple[int, int, int]:
    """(n_frequency, LoRA r's trainable count, adapted layers): one n for every layer, so that
    LoCA's 3·n per layer totals LoRA's count."""
    import paretune

    lora = paretune_lora(base, ["task0"], rank)
    layers = len(paretune.adapters(lora)["task0"].targets)
    count = adapter_count(lora, "task0")
    return round(count / (3 * layers)), count, layers


def measure_sparse_training(device: str, steps: int, rank: int) -> dict:
    base = load_base(device)
    n, lora_count, layers = loca_n_frequency(base, rank)
    variants = {"lora": "paretune", "shira": "shira", "loca": "loca", "loca-locations": "loca-locations"}
    built = {k: training_step(v, base, device, rank, n_frequency=n) for k, v in variants.items()}
    samples: dict[str, list[float]] = {k: [] for k in built}
    for _ in range(steps):
        for k, (fn, _) in built.items():
            samples[k].append(timed(fn, device))
    trainable = {k: t for k, (_, t) in built.items()}
    del built, base
    out: dict = {"loca_n_frequency": n, "layers": layers, "lora_trainable": lora_count}
    for k, v in variants.items():
        out[k] = variant_alone(v, device, rank, n)
        out[k]["seconds"] = statistics.median(samples[k])
        out[k]["trainable"] = trainable[k]
    for k in variants:
        out[k]["time_vs_lora"] = out[k]["seconds"] / out["lora"]["seconds"]
        out[k]["memory_vs_lora"] = out[k]["peak_bytes"] / max(1, out["lora"]["peak_bytes"])
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
    lines = [f"paretune speed benchmark, {MODEL}, LoRA r={res['rank']} all-linear, device {res['machine']['device']}",
             f"machine: {res['machine'].get('gpu') or res['machine'].get('cpu')}, {res['machine']['cpus']} CPUs"]
    f = res.get("forward")
    if f:
        lines += ["", "(a) unmerged forward / base forward (batch 4 x 128)",
                  f"    paretune {f['ratio']['paretune']:.3f}x   PEFT {f['ratio']['peft']:.3f}x   "
                  f"(base {f['seconds']['base'] * 1000:.0f} ms)"]
    if res.get("mixed"):
        lines += ["", "(b) mixed batch, one adapter per row / base forward (512 tokens)"]
    for n, m in res.get("mixed", {}).items():
        lines.append(f"    {n:>3} adapters ({m['batch'][0]} x {m['batch'][1]}): paretune {m['ratio']['paretune']:.3f}x   "
                     f"PEFT {m['ratio']['peft']:.3f}x   paretune {m['paretune_speedup_over_peft']:.2f}x faster than PEFT")
    t = res.get("training")
    if t:
        lines += ["", "(c) training step (batch 4 x 128): LoRA / full fine-tuning",
                  f"    paretune time {t['paretune']['time_vs_full']:.3f}x, memory {t['paretune']['memory_vs_full']:.3f}x",
                  f"    PEFT     time {t['peft']['time_vs_full']:.3f}x, memory {t['peft']['memory_vs_full']:.3f}x",
                  f"    paretune / PEFT: time {t['paretune_time_vs_peft']:.3f}x, peak memory {t['paretune_memory_vs_peft']:.3f}x",
                  f"    (full: {t['full']['seconds']:.2f} s/step, peak +{t['full']['peak_bytes'] / 2**20:.0f} MiB)"]
    s = res.get("switching")
    if s:
        lines += ["", f"(d) switching a merged model a -> b (unmerge, set_active, merge), "
                      f"{s['trainable_per_adapter']:,} trainable per adapter",
                  f"    SHiRA r={res['rank']} {s['shira']['seconds'] * 1000:.1f} ms   "
                  f"LoRA r={res['rank']} {s['lora']['seconds'] * 1000:.1f} ms   "
                  f"LoRA / SHiRA {s['lora_over_shira']:.2f}x   (median of {s['switches_timed']} switches each)",
                  f"    check against a fresh b-merged model: max |diff| SHiRA {s['shira']['check']['max_abs_diff']:.2e}, "
                  f"LoRA {s['lora']['check']['max_abs_diff']:.2e} (b itself changes the logits by up to "
                  f"{s['shira']['check']['max_abs_effect_of_b']:.2f} / {s['lora']['check']['max_abs_effect_of_b']:.2f})"]
    e = res.get("sparse_training")
    if e:
        lines += ["", f"(e) training step (batch 4 x 128) / LoRA r={res['rank']} "
                      f"({e['lora']['seconds']:.2f} s/step, peak +{e['lora']['peak_bytes'] / 2**20:.0f} MiB, "
                      f"{e['lora_trainable']:,} trainable)"]
        names = {"shira": f"SHiRA r={res['rank']}", "loca": f"LoCA n={e['loca_n_frequency']} (coefficients)",
                 "loca-locations": f"LoCA n={e['loca_n_frequency']} (locations)"}
        for k, label in names.items():
            lines.append(f"    {label:<30} time {e[k]['time_vs_lora']:.3f}x, memory {e[k]['memory_vs_lora']:.3f}x   "
                         f"({e[k]['trainable']:,} trainable)")
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
    ap.add_argument("--switching", action="store_true", help="also (d): switching a merged model, SHiRA vs LoRA")
    ap.add_argument("--sparse-training", action="store_true", help="also (e): SHiRA and LoCA training steps vs LoRA")
    ap.add_argument("--only", default=None,
                    help=f"run only these sections, comma-separated, of: {','.join(SECTIONS)}")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--train-variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n-frequency", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.train_variant:
        print(json.dumps(train_variant(args.train_variant, args.device, args.steps, args.rank, args.n_frequency)))
        return
    if args.quick:
        args.repeats, args.steps, args.adapters = 3, 2, "4,16"
    counts = [int(c) for c in args.adapters.split(",") if c]
    for c in counts:
        if TOKENS % c:
            ap.error(f"--adapters: {c} does not divide {TOKENS} tokens")
    if args.only is not None:
        sections = [s for s in args.only.split(",") if s]
        unknown = [s for s in sections if s not in SECTIONS]
        if unknown or not sections:
            ap.error(f"--only: unknown sections {unknown}; choose from {','.join(SECTIONS)}")
    else:
        sections = ["forward", "mixed"] + ([] if args.no_training else ["training"])
        sections += ["switching"] * args.switching + ["sparse-training"] * args.sparse_training
    res = {"machine": machine(args.device), "rank": args.rank, "repeats": args.repeats, "steps": args.steps}
    if "forward" in sections:
        res["forward"] = measure_forward(args.device, args.repeats, args.rank)
    if "mixed" in sections:
        res["mixed"] = measure_mixed(args.device, args.repeats, args.rank, counts)
    if "training" in sections:
        res["training"] = measure_training(args.device, args.steps, args.rank)
    if "switching" in sections:
        res["switching"] = measure_switching(args.device, args.repeats, args.rank)
    if "sparse-training" in sections:
        res["sparse_training"] = measure_sparse_training(args.device, args.steps, args.rank)
    print(report(res))
    if args.out:
        from paretune.core.atomic import atomic_write_text

        atomic_write_text(args.out, json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
