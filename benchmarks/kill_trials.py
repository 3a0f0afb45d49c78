"""Kill -9 at random moments, then check what is left.

    uv run python benchmarks/kill_trials.py                   # 20 trials of each scenario
    uv run python benchmarks/kill_trials.py --trials 5 --only save

Scenarios (each trial forks a child from this process, which has torch and paretune imported
already, so a trial costs the work and not an interpreter start; ``OMP_NUM_THREADS=1`` keeps the
fork safe):

* ``save``: the child saves a large LoRA adapter (``--mb`` megabytes of tensors) to one folder
  in a loop, each save with other values; it is SIGKILLed after a random delay. Then: the folder
  must load (``paretune.load``) and hold one whole version (the tensors equal one of the versions
  the child wrote, or the one saved before), and the next save must leave no ``.tmp-*`` /
  ``.old-*`` beside it.
* ``train``: the child runs ``paretune train --checkpoint-every 1`` on a tiny BERT (saved to a
  temporary folder with MiniLM's tokenizer); SIGKILL after a random delay. Then ``--resume`` in a
  new child must exit 0, and its adapter must equal, bit for bit, that of an uninterrupted run.
* ``bench``: the child runs a bench (``paretune.bench.cli.run_bench``, every run a fake trainer
  that sleeps then writes metrics) into one folder; SIGKILL after a random delay. Then the store
  must pass SQLite's integrity check, the folder lock must be free, and rerunning the same bench
  must exit 0 with every planned run finished.

Delays are drawn uniformly from [0, the scenario's uninterrupted duration] with a fixed seed.
Prints one line per trial and a table of outcomes per scenario.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import sqlite3  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import paretune  # noqa: E402

torch.set_num_threads(1)
FORK = mp.get_context("fork")


def leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")
                  and (".tmp-" in p.name or ".old-" in p.name))


def kill_after(proc, delay: float) -> bool:
    """SIGKILL ``proc`` after ``delay`` s; False when it had already ended."""
    proc.join(delay)
    if not proc.is_alive():
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    return True


# -- save --------------------------------------------------------------------------------------

class Wide(nn.Module):
    def __init__(self, width: int, layers: int):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def wide_adapter(mb: int, version: int) -> nn.Module:
    width, layers = 1024, 8
    r = max(1, int(mb * 2 ** 20 / (4 * 2 * width * layers)))
    net = Wide(width, layers)
    paretune.adapt(net, "lora", r=r, targets=[f"layers.{i}" for i in range(layers)])
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.fill_(float(version))
    return net


def tensor_version(path: Path) -> int | None:
    """The single value every saved adapter tensor holds (the version), None when mixed."""
    from safetensors.torch import load_file

    values = {float(t.flatten()[0]) for t in load_file(str(path / "adapter.safetensors")).values()}
    values |= {float(t.min()) for t in load_file(str(path / "adapter.safetensors")).values()}
    return int(values.pop()) if len(values) == 1 else None


def _save_loop(path: str, mb: int, start: int) -> None:
    v = start
    while True:
        paretune.save(wide_adapter(mb, v), path)
        v += 1


def trial_save(root: Path, rng: random.Random, mb: int, span: float) -> dict:
    path = root / "adapter"
    paretune.save(wide_adapter(mb, 1), path)
    child = FORK.Process(target=_save_loop, args=(str(path), mb, 2))
    child.start()
    delay = rng.uniform(0, span)
    killed = kill_after(child, delay)
    left = leftovers(path)
    try:
        net = Wide(1024, 8)
        paretune.load(net, path)
        version = tensor_version(path)
        whole = version is not None and version >= 1
        state = f"whole (version {version})" if whole else "MIXED"
    except paretune.ParetuneError as e:
        whole, state = False, f"LOAD FAILED: {str(e)[:80]}"
    paretune.save(wide_adapter(mb, 99), path)  # the next write
    after = leftovers(path)
    ok = whole and not after
    return {"delay": delay, "killed": killed, "state": state, "left_after_kill": len(left),
            "left_after_next_write": len(after), "ok": ok}


# -- train -------------------------------------------------------------------------------------

def tiny_bert(root: Path) -> tuple[Path, Path, Path]:
    import importlib.util

    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from paretune.models import BUNDLED

    spec = importlib.util.find_spec(BUNDLED["minilm-l6"].module)
    tok = AutoTokenizer.from_pretrained(Path(list(spec.submodule_search_locations)[0]) / "model")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    model = root / "tiny-bert"
    BertForSequenceClassification(cfg).save_pretrained(model)
    tok.save_pretrained(model)
    train, test = root / "train.csv", root / "eval.csv"
    train.write_text("text,label\n" + "".join(f"word{i} thing,{'ab'[i % 2]}\n" for i in range(64)))
    test.write_text("text,label\n" + "".join(f"word{i} other,{'ab'[i % 2]}\n" for i in range(16)))
    return model, train, test


def _train(args: list[str]) -> None:
    from paretune.cli import main

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        main(args)
    except SystemExit as e:
        os._exit(e.code if isinstance(e.code, int) else 1)
    os._exit(0)


def train_args(model: Path, train: Path, test: Path, out: Path, steps: int, resume: bool) -> list[str]:
    return ["train", "--model", str(model), "--data", str(train), "--eval-data", str(test), "--batch-size", "8",
            "--steps", str(steps), "-o", "r=2", "--seed", "0", "--checkpoint-every", "1", "--out", str(out),
            *(["--resume"] if resume else [])]


def adapter_hash(out: Path) -> str | None:
    f = out / "adapter" / "adapter.safetensors"
    if not f.is_file():
        return None
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for k, v in sorted(load_file(str(f)).items()):
        h.update(k.encode() + v.numpy().tobytes())
    return h.hexdigest()


def run_child(args: list[str]) -> int:
    p = FORK.Process(target=_train, args=(args,))
    p.start()
    p.join()
    return p.exitcode


def trial_train(root: Path, rng: random.Random, files, steps: int, span: float, reference: str) -> dict:
    out = root / "run"
    p = FORK.Process(target=_train, args=(train_args(*files, out, steps, False),))
    p.start()
    delay = rng.uniform(0, span)
    killed = kill_after(p, delay)
    code = run_child(train_args(*files, out, steps, True))
    h = adapter_hash(out)
    left = [n for n in (leftovers(out / "adapter") if (out / "adapter").exists() else [])]
    left += leftovers(out / "checkpoint") if (out / "checkpoint").parent.exists() else []
    equal = h == reference
    return {"delay": delay, "killed": killed, "resume_rc": code, "equal_to_uninterrupted": equal,
            "left_after_next_write": len(left), "ok": code == 0 and equal and not left}


# -- bench -------------------------------------------------------------------------------------

def _fake_runner(seconds: float):
    import subprocess

    def run(argv):
        time.sleep(seconds)
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        method = argv[argv.index("--method") + 1]
        metrics = {"metric": "accuracy", "accuracy": 0.5, "trainable": 100, "stored_bytes": 400,
                   "method": method, "train_loss": 0.1}
        (out / "metrics.json").write_text(json.dumps(metrics))
        return subprocess.CompletedProcess(argv, 0, "", "")

    return run


def _bench_net():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=32,
                                                    max_position_embeddings=32, num_labels=3)).eval()


def _bench(out: str, seconds: float) -> None:
    from paretune.bench.cli import run_bench

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    run_bench(task="city-continent", model="tiny", methods=["lora", "vera"], budgets=[960, 3840], seeds=[0, 1],
              steps=2, batch_size=4, baselines=["head"], out=out, runner=_fake_runner(seconds), net=_bench_net(),
              progress=False, echo=lambda s: None)
    os._exit(0)


def trial_bench(root: Path, rng: random.Random, seconds: float, span: float) -> dict:
    from paretune.bench.store import Store, bench_lock

    out = root / "bench"
    p = FORK.Process(target=_bench, args=(str(out), seconds))
    p.start()
    delay = rng.uniform(0, span)
    killed = kill_after(p, delay)
    integrity, finished_before = "no store", 0
    if (out / "runs.sqlite").exists():
        conn = sqlite3.connect(out / "runs.sqlite")
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        finished_before = conn.execute("SELECT COUNT(*) FROM runs WHERE status = 'finished'").fetchone()[0]
        conn.close()
    try:
        with bench_lock(out):
            lock_free = True
    except paretune.ParetuneError:
        lock_free = False
    p = FORK.Process(target=_bench, args=(str(out), 0.0))
    p.start()
    p.join()
    with Store(out) as store:
        counts = store.counts()
    ok = (integrity in ("ok", "no store") and lock_free and p.exitcode == 0
          and counts.get("finished", 0) == sum(counts.values()))
    return {"delay": delay, "killed": killed, "integrity": integrity, "lock_free": lock_free,
            "finished_before_rerun": finished_before, "rerun_rc": p.exitcode, "finished_after": counts.get("finished", 0),
            "ok": ok}


# -- main --------------------------------------------------------------------------------------

def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--only", choices=["save", "train", "bench"], action="append")
    ap.add_argument("--mb", type=int, default=64, help="adapter size in MB for the save scenario")
    ap.add_argument("--steps", type=int, default=8, help="training steps in the train scenario")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    scenarios = args.only or ["save", "train", "bench"]
    rng = random.Random(args.seed)
    table: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="paretune-kill-") as tmp:
        tmp = Path(tmp)
        if "save" in scenarios:
            d = tmp / "save-span"
            d.mkdir()
            span = timed(lambda: paretune.save(wide_adapter(args.mb, 1), d / "a")) * 3
            print(f"save: one {args.mb} MB save takes {span / 3:.2f} s; killing within {span:.2f} s", flush=True)
            table["save"] = []
            for i in range(args.trials):
                root = tmp / f"save-{i}"
                root.mkdir()
                r = trial_save(root, rng, args.mb, span)
                table["save"].append(r)
                print(f"save  #{i:2d}: kill at {r['delay']:.2f} s -> {r['state']}; leftovers {r['left_after_kill']} "
                      f"after the kill, {r['left_after_next_write']} after the next save", flush=True)
        if "train" in scenarios:
            files = tiny_bert(tmp)
            ref = tmp / "reference"
            span = timed(lambda: run_child(train_args(*files, ref, args.steps, False)))
            reference = adapter_hash(ref)
            print(f"train: an uninterrupted run takes {span:.2f} s", flush=True)
            table["train"] = []
            for i in range(args.trials):
                root = tmp / f"train-{i}"
                root.mkdir()
                r = trial_train(root, rng, files, args.steps, span, reference)
                table["train"].append(r)
                print(f"train #{i:2d}: kill at {r['delay']:.2f} s (killed={r['killed']}) -> resume rc "
                      f"{r['resume_rc']}, adapter equal to uninterrupted: {r['equal_to_uninterrupted']}, "
                      f"leftovers {r['left_after_next_write']}", flush=True)
        if "bench" in scenarios:
            seconds = 0.4
            d = tmp / "bench-span"
            p = FORK.Process(target=_bench, args=(str(d), seconds))
            t0 = time.perf_counter()
            p.start()
            p.join()
            span = time.perf_counter() - t0
            print(f"bench: an uninterrupted bench (fake runs of {seconds} s each) takes {span:.2f} s", flush=True)
            table["bench"] = []
            for i in range(args.trials):
                root = tmp / f"bench-{i}"
                root.mkdir()
                r = trial_bench(root, rng, seconds, span)
                table["bench"].append(r)
                print(f"bench #{i:2d}: kill at {r['delay']:.2f} s (killed={r['killed']}) -> store {r['integrity']}, "
                      f"lock free {r['lock_free']}, {r['finished_before_rerun']} finished before the rerun, rerun rc "
                      f"{r['rerun_rc']}, {r['finished_after']} finished after", flush=True)
    print()
    print("| scenario | trials | still running when killed | ok | failed |")
    print("|---|---|---|---|---|")
    bad = 0
    for name, rows in table.items():
        ok = sum(r["ok"] for r in rows)
        bad += len(rows) - ok
        print(f"| {name} | {len(rows)} | {sum(r['killed'] for r in rows)} | {ok} | {len(rows) - ok} |")
    for name, rows in table.items():
        if name == "save":
            states = Counter("whole" if r["state"].startswith("whole") else r["state"][:40] for r in rows)
            print(f"save outcomes: {dict(states)}; trials with leftovers right after the kill: "
                  f"{sum(r['left_after_kill'] > 0 for r in rows)}, after the next save: "
                  f"{sum(r['left_after_next_write'] > 0 for r in rows)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
