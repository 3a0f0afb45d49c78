"""The bench's reusable workers (paretune.bench.worker) and local executors (paretune.bench.executors)
on a tiny BERT folder and small CSV files: model loaded once per worker, the same metrics as a
`paretune train` subprocess, per-run peak memory, failures isolated, dead workers replaced, no
orphans after an interrupted sweep."""

from __future__ import annotations

import csv
import json
import os
import signal
import time

import pytest
import torch

from paretune.bench import executors, sweep, worker
from paretune.bench.store import Store
from paretune.bench.sweep import RunSpec, run_sweep

ENV = {"python": "3", "torch": "2", "transformers": "4", "paretune": "0", "platform": "p", "cpu": "c", "gpu": "none"}
COMPARED = ("accuracy", "eval_loss", "train_loss", "trainable", "stored_bytes")


def make_tiny(root):
    """A tiny BERT encoder folder (no classification head: `paretune train` adds a fresh one, as for
    MiniLM) with a word-piece tokenizer, and train/eval CSVs of 3 classes."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters]
    folder = root / "tiny-bert"
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(folder)
    g = torch.Generator().manual_seed(0)

    def write(path, n):
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for _ in range(n):
                label = int(torch.randint(3, (1,), generator=g))
                word = "".join(letters[int(i)] for i in torch.randint(label * 8, label * 8 + 8, (5,), generator=g))
                w.writerow([" ".join(word), f"c{label}"])

    write(root / "train.csv", 48)
    write(root / "eval.csv", 24)
    return folder, root / "train.csv", root / "eval.csv"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def spec(tiny, method="lora", seed=0, steps=3, **options):
    folder, train, evl = tiny
    opts = options if method not in ("head", "full") else {}
    if method == "lora" and not opts:
        opts = {"r": 2}
    return RunSpec(str(folder), "tiny", method, opts, None, seed, steps, 1e-2, 8, data=str(train),
                   eval_data=str(evl), data_id="tiny", head_lr=5e-3)


def same(a: dict, b: dict) -> None:
    for k in COMPARED:
        assert a[k] == b[k], (k, a[k], b[k])


def test_in_process_runs_load_once_and_do_not_depend_on_history(tiny, tmp_path, monkeypatch):
    from paretune import models

    loads = []
    real = models.load
    monkeypatch.setattr(models, "load", lambda *a, **k: loads.append(a) or real(*a, **k))
    runner = worker.InProcessRunner(capture=str(tmp_path / "cap.log"))
    a, b, h = spec(tiny, seed=0), spec(tiny, seed=1), spec(tiny, "head", seed=0)
    first = runner.run(a.argv(tmp_path / "a1"))
    assert first["ok"], first["error"]
    others = [runner.run(s.argv(tmp_path / f"r{i}")) for i, s in enumerate((b, h))]
    again = runner.run(a.argv(tmp_path / "a2"))
    assert all(r["ok"] for r in others + [again])
    assert len(loads) == 1 == runner.caches.loads  # four runs, one real load
    same(first["metrics"], again["metrics"])  # a run's result is its spec's, whatever ran before it
    assert first["metrics"]["eval_loss"] != others[0]["metrics"]["eval_loss"]  # the seed matters
    assert models.load is not None and models.load.__name__ == "<lambda>"  # the memo was uninstalled
    m = first["metrics"]
    assert m["peak_memory_bytes"] >= m["peak_memory_delta_bytes"] >= 0
    assert 20e6 < m["peak_memory_bytes"] < 64e9 and "sampled" in m["memory_measure"]
    # a failing run is reported with its output tail; the runner goes on
    bad = runner.run(spec(tiny, "lora", r="not-a-rank").argv(tmp_path / "bad"))
    assert not bad["ok"] and bad["error"] and bad["metrics"] is None
    assert runner.run(h.argv(tmp_path / "h2"))["ok"]


def test_peak_rss_sampler_sees_an_allocation():
    s = worker.PeakRSS(interval=0.005).start()
    x = torch.ones(64, 1024, 1024)  # 256 MiB
    time.sleep(0.05)
    del x
    s.stop()
    assert s.peak - s.start_rss > 200 * 2**20


def test_train_args_and_bad_requests():
    assert worker.train_args(["py", "-m", "paretune.cli", "train", "--x"]) == ["train", "--x"]
    assert worker.train_args(["/bin/paretune", "train"]) == ["train"]
    with pytest.raises(ValueError):
        worker.train_args(["py", "-m", "paretune.cli", "merge"])
    reply = worker.InProcessRunner().run(["python", "-c", "pass"])
    assert not reply["ok"] and "not a `paretune train` command" in reply["error"]


def test_sequential_sweep_runs_in_a_worker_process(tiny, tmp_path):
    """The default path (one worker process) end to end, kept to one process start."""
    runs = [spec(tiny, "head", seed=0), spec(tiny, "head", seed=1)]
    with Store(tmp_path) as store:
        result = run_sweep(runs, store, tmp_path, progress=False, log=lambda s: None, env=ENV)
        rows = store.runs()
    assert result.finished == 2 and all(r["metrics"]["peak_memory_delta_bytes"] >= 0 for r in rows)
    assert rows[0]["metrics"]["eval_loss"] != rows[1]["metrics"]["eval_loss"]


def test_sequential_worker_equals_subprocess_and_pool_equals_sequential(tiny, tmp_path):
    runs = [spec(tiny, "lora", seed=0), spec(tiny, "head", seed=0), spec(tiny, "lora", seed=1)]
    got = {}
    for name, kw in (("subprocess", {"runner": sweep.subprocess_runner}), ("sequential", {}),
                     ("pool", {"executor": "pool", "workers": 2})):
        lines = []
        with Store(tmp_path / name) as store:
            result = run_sweep(runs[:1] if name == "subprocess" else runs, store, tmp_path / name,
                               progress=False, log=lines.append, env=ENV, **kw)
            rows = store.runs()
        assert result.finished == len(rows) and not result.failed, result.failed
        assert all(line.startswith("[") and " s wall" in line for line in lines)
        got[name] = {(r["method"], r["seed"]): r["metrics"] for r in rows}
        for r in rows:  # the driver wrote each run folder's metrics.json
            assert json.loads((sweep.run_dir_for(tmp_path / name, next(
                s for s in runs if s.method == r["method"] and s.seed == r["seed"])) / "metrics.json"
                ).read_text())["eval_loss"] == r["metrics"]["eval_loss"]
    same(got["subprocess"][("lora", 0)], got["sequential"][("lora", 0)])
    for k in got["sequential"]:
        same(got["sequential"][k], got["pool"][k])
    assert got["sequential"][("lora", 0)]["peak_memory_delta_bytes"] >= 0


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie is gone too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_killed_worker_is_replaced_and_interrupt_leaves_no_orphans(tiny, tmp_path):
    ex = executors.LocalExecutor(2)
    long = spec(tiny, "lora", seed=0, steps=100_000)
    ex.submit(0, long.argv(tmp_path / "long"))
    ex.submit(1, spec(tiny, "head").argv(tmp_path / "short"))
    slot, reply = ex.wait(timeout=120)
    assert slot == 1 and reply["ok"], reply
    (victim,) = [w.pid for w in ex.workers[:1]]
    os.kill(victim, signal.SIGKILL)
    slot, reply = ex.wait(timeout=60)
    assert slot == 0 and not reply["ok"] and reply.get("worker_died") and "SIGKILL" in reply["error"]
    ex.submit(0, spec(tiny, "head", seed=2).argv(tmp_path / "after"))  # a new worker takes the next run
    slot, reply = ex.wait(timeout=120)
    assert slot == 0 and reply["ok"] and ex.workers[0].pid != victim
    ex.close()

    # Ctrl-C in the middle of a pool sweep: the finished run stays finished, the one in flight is
    # `running` (redone next time), and no worker survives.
    ex = executors.LocalExecutor(2)
    pids = []

    def log(line):
        pids.extend(ex.pids())
        raise KeyboardInterrupt

    runs = [long, spec(tiny, "head", seed=3)]
    with Store(tmp_path / "sweep") as store:
        with pytest.raises(KeyboardInterrupt):
            run_sweep(runs, store, tmp_path / "sweep", executor=ex, progress=False, log=log, env=ENV)
        counts = store.counts()
    assert counts["finished"] == 1 and counts["running"] == 1
    assert len(pids) == 2
    deadline = time.time() + 10
    while not all(_gone(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert all(_gone(p) for p in pids)


def test_executor_options_are_checked():
    from paretune.errors import ParetuneError

    with pytest.raises(ParetuneError, match="unknown"):
        executors.make_executor("threads")
    with pytest.raises(ParetuneError, match="--address is for --executor ray"):
        executors.make_executor("pool", 2, "1.2.3.4:6379")
    with pytest.raises(ParetuneError, match="--workers"):
        executors.LocalExecutor(0)
    assert executors.threads_per_worker(1) is None and executors.threads_per_worker(10 ** 6) == 1
