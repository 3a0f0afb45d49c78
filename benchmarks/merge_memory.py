"""Peak memory of the streaming whole-model merge (paretune.merging.merge_models) on SmolLM2-135M.

    uv run python benchmarks/merge_memory.py                        # all six methods, one input
    uv run python benchmarks/merge_memory.py --methods ties,dare_ties --inputs 2
    uv run python benchmarks/merge_memory.py --work /tmp/mm --keep  # keep the checkpoints for a rerun

It saves the bundled SmolLM2-135M (dequantised to float32) as a safetensors folder (the base),
and ``--inputs`` copies of it with seeded Gaussian noise (std 1e-3) added to every float tensor
(the "fine-tunes"; input i+1 is input i plus more noise). Then, for each method, a fresh Python process imports paretune, records its
resident set size (the baseline), resets the kernel's high-water mark (``5 > /proc/self/clear_refs``,
Linux; without it the peak includes the import-time peak), merges, and reports:

* model size: the bytes of the base's safetensors file (one input model);
* baseline RSS, peak RSS (VmHWM, which counts every resident page: anonymous memory and touched
  pages of mapped files), peak − baseline, and (peak − baseline) / model size;
* the peaks of anonymous (RssAnon) and file-backed (RssFile) resident memory, sampled every 2 ms
  in a thread, to show what the peak is made of;
* the largest tensor's bytes: a method that is not entry-wise holds a few float32 copies of it.

The target is peak − baseline < half of one input model's size. Results are printed as a table
and as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def child(base: str, inputs: list[str], out: str, method: str, params: dict) -> None:
    """Runs in a fresh process: merge once, print one JSON line with the memory figures."""
    import threading

    import torch  # noqa: F401  (imported before the baseline is taken)
    import tqdm.auto  # noqa: F401

    from paretune.merging.models import merge_models

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    before = _status()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    peaks = {"RssAnon": 0, "RssFile": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            s = _status()
            for k in peaks:
                peaks[k] = max(peaks[k], s.get(k, 0))
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    merge_models(base, inputs, method=method, out=out, parameters=params, progress=False)
    seconds = time.perf_counter() - t0
    stop.set()
    th.join()
    after = _status()
    print(json.dumps({"baseline_rss": before["VmRSS"], "baseline_anon": before.get("RssAnon"),
                      "baseline_file": before.get("RssFile"), "peak_rss": after["VmHWM"], "hwm_reset": reset,
                      "peak_anon": peaks["RssAnon"], "peak_file": peaks["RssFile"], "seconds": seconds}))


def prepare(work: Path, n_inputs: int) -> tuple[Path, list[Path]]:
    import torch

    import paretune.models

    base = work / "base"
    inputs = [work / f"tuned{i}" for i in range(n_inputs)]
    if base.is_dir() and all(p.is_dir() for p in inputs):
        return base, inputs
    # a GGUF-loaded model refuses save_pretrained; its config and float32 tensors are written directly
    from safetensors.torch import save_file

    model, tok = paretune.models.load("smollm2-135m")
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "float32"
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings") and "lm_head.weight" in sd:
        del sd["lm_head.weight"]  # tied to the embedding; transformers leaves it out too

    def save(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})

    save(base)
    tok.save_pretrained(base)
    g = torch.Generator().manual_seed(1000)
    for p in inputs:  # each input: the previous one plus fresh noise
        for t in sd.values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * 1e-3)
        save(p)
    return base, inputs


def _largest_tensor(folder: Path) -> tuple[str, int]:
    from paretune.merging.models import Checkpoint

    c = Checkpoint(folder)
    try:
        name = max(c.where, key=lambda n: c.entry(n).nbytes)
        return name, c.entry(name).nbytes
    finally:
        c.close()


DEFAULT_PARAMS = {"task_arithmetic": {}, "weighted_average": {}, "ties": {"density": 0.2},
                  "dare_linear": {"density": 0.5, "seed": 0}, "dare_ties": {"density": 0.5, "seed": 0},
                  "pcb": {"ratio": 0.1}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(DEFAULT_PARAMS))
    ap.add_argument("--inputs", type=int, default=1, help="number of fine-tuned inputs")
    ap.add_argument("--work", default=None, help="folder for the checkpoints (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints in --work")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        base, out, method, params, *inputs = args.child
        child(base, inputs, out, method, json.loads(params))
        return

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="merge-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        base, inputs = prepare(work, args.inputs)
        print(f"checkpoints ready in {time.perf_counter() - t0:.0f} s under {work}", flush=True)
        size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        big_name, big_bytes = _largest_tensor(base)
        rows = []
        for method in args.methods.split(","):
            out = work / f"merged-{method}"
            shutil.rmtree(out, ignore_errors=True)
            params = DEFAULT_PARAMS.get(method, {})
            cmd = [sys.executable, __file__, "--child", str(base), str(out), method, json.dumps(params),
                   *map(str, inputs)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(res.stderr, file=sys.stderr)
                raise SystemExit(f"the merge with {method} failed")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            r.update(method=method, params=params, model_bytes=size, inputs=len(inputs),
                     peak_minus_baseline=r["peak_rss"] - r["baseline_rss"])
            r["ratio"] = r["peak_minus_baseline"] / size
            rows.append(r)
            shutil.rmtree(out, ignore_errors=True)
        mib = 2**20
        print(f"\nSmolLM2-135M float32: model {size} bytes ({size / mib:.0f} MiB); largest tensor {big_name} "
              f"{big_bytes / mib:.0f} MiB; {len(inputs)} input(s); {platform.machine()} {os.cpu_count()} CPUs")
        print("| method | seconds | baseline MiB | peak MiB | peak - baseline MiB | / model size | "
              "peak anon MiB | peak file MiB |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['method']} | {r['seconds']:.1f} | {r['baseline_rss'] / mib:.0f} | {r['peak_rss'] / mib:.0f} | "
                  f"{r['peak_minus_baseline'] / mib:.0f} | {r['ratio']:.2f} | {r['peak_anon'] / mib:.0f} | "
                  f"{r['peak_file'] / mib:.0f} |")
        if not all(r["hwm_reset"] for r in rows):
            print("note: VmHWM could not be reset; peaks include the import-time peak")
        if args.out:
            Path(args.out).write_text(json.dumps({"model_bytes": size, "largest_tensor": [big_name, big_bytes],
                                                  "rows": rows}, indent=2) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
