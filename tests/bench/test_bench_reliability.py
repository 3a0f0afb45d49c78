"""The bench under stress: one bench per folder, workers that die with a killed bench, diverged
runs counted as failed, and ``--targets`` written as in every command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from paretune.bench import sweep
from paretune.bench.store import BenchLocked, Store, bench_lock
from paretune.errors import ParetuneError

ENV = {"python": "3", "torch": "2", "transformers": "4", "paretune": "0", "platform": "p", "cpu": "c", "gpu": "none"}
SRC = str(Path(__file__).resolve().parents[2] / "src")


def _child(code: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True, env=env)


# -- the folder lock -------------------------------------------------------------------------------

def test_a_second_lock_on_the_same_folder_names_the_holder(tmp_path):
    with bench_lock(tmp_path / "out"):
        with pytest.raises(BenchLocked, match=rf"another bench is running in .*out \(pid {os.getpid()}\)"):
            with bench_lock(tmp_path / "out"):
                pass
    with bench_lock(tmp_path / "out"):  # released on exit
        pass


@pytest.mark.slow
def test_a_killed_holder_releases_the_lock(tmp_path):
    out = tmp_path / "out"
    p = _child(f"""
        import time
        from paretune.bench.store import bench_lock
        with bench_lock({str(out)!r}):
            print("locked", flush=True)
            time.sleep(60)
    """)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(BenchLocked, match=rf"\(pid {p.pid}\)"):
            with bench_lock(out):
                pass
    finally:
        p.kill()
        p.wait()
    with bench_lock(out):  # SIGKILL released it: no stale lock
        pass


def test_a_second_bench_on_the_same_out_exits_2_and_trains_nothing(app, fake_runner, route_runs, make_bert,
                                                                   monkeypatch, tmp_path):
    runner = route_runs(fake_runner())
    monkeypatch.setattr(sweep, "load_model_for", lambda model, kind: make_bert())
    out = tmp_path / "bench"
    with bench_lock(out):
        res = CliRunner().invoke(app, ["--task", "city-continent", "--model", "tiny", "--methods", "lora",
                                       "--budget", "960", "--baselines", "none", "--out", str(out)],
                                 catch_exceptions=False)
    assert res.exit_code == 2 and f"another bench is running in {out} (pid {os.getpid()})" in res.output
    assert "Traceback" not in res.output and runner.calls == []


# -- workers die with the bench --------------------------------------------------------------------

@pytest.mark.slow
def test_a_sigkilled_bench_leaves_no_worker_behind():
    p = _child("""
        import time
        from paretune.bench.executors import WorkerProcess
        w = WorkerProcess()
        w.start()
        print(w.pid, flush=True)
        time.sleep(120)
    """)
    try:
        worker = int(p.stdout.readline())
        os.kill(worker, 0)  # running
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        try:  # reap it if it became our child (a subreaper); else init reaps it
            os.waitpid(worker, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the worker outlived its SIGKILLed bench by 10 s")


# -- diverged runs ---------------------------------------------------------------------------------

class DivergingRunner:
    """A fake `paretune train`: lora runs at r=8 diverge, either exiting 2 with the trainer's
    message (``mode="error"``) or finishing with NaN losses (``mode="nan"``)."""

    def __init__(self, base, mode: str):
        self.base, self.mode = base, mode

    def __call__(self, argv):
        r = json.loads(argv[argv.index("-o") + 1].split("=", 1)[1]) if "-o" in argv else 0
        if r != 8:
            return self.base(argv)
        if self.mode == "error":
            return subprocess.CompletedProcess(argv, 2, "", "error: training diverged at step 3: the loss is nan; "
                                               "rerun with a lower --lr.\n")
        proc = self.base(argv)
        out = Path(argv[argv.index("--out") + 1]) / "metrics.json"
        m = json.loads(out.read_text())
        m.update(train_loss=float("nan"), eval_loss=float("nan"), accuracy=0.9)  # a chance-level "win"
        out.write_text(json.dumps(m))
        return proc


@pytest.mark.parametrize("mode", ["error", "nan"])
def test_a_diverged_run_is_failed_with_its_message_and_never_on_the_front(bert, fake_runner, tmp_path, mode):
    from paretune.bench.report import summarize

    plan = sweep.plan_runs(bert, model="tiny", task="city-continent", methods=["lora"], budgets=[960, 3840],
                           seeds=[0], steps=5, batch_size=4, baselines=["head"])
    with Store(tmp_path) as store:
        result = sweep.run_sweep(plan.runs, store, tmp_path, runner=DivergingRunner(fake_runner(), mode),
                                 progress=False, log=lambda s: None, env=ENV)
        runs = store.runs()
    assert result.finished == 2 and len(result.failed) == 1
    failed = [r for r in runs if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["options"] == {"r": 8}
    assert ("diverged at step 3" if mode == "error" else "non-finite metrics") in failed[0]["error"]
    s = summarize(runs, model="tiny", task="city-continent")
    assert all(r.options != {"r": 8} for r in s.rows)


def test_check_finite():
    ok = {"metric": "accuracy", "accuracy": 0.5, "train_loss": 0.1, "name": "x", "flag": True}
    sweep.check_finite(ok)
    with pytest.raises(ParetuneError, match=r"non-finite metrics \(train_loss=inf\)"):
        sweep.check_finite({**ok, "train_loss": float("inf")})
    with pytest.raises(ParetuneError, match="accuracy is None"):
        sweep.check_finite({**ok, "accuracy": None})


# -- --targets -------------------------------------------------------------------------------------

def test_target_values():
    assert sweep.target_values(None) == (None, None)
    assert sweep.target_values([]) == (None, None)
    assert sweep.target_values(["query,value", "key", "value"]) == (("query", "value", "key"),
                                                                     ["query", "value", "key"])
    assert sweep.target_values("all-linear") == (("all-linear",), "all-linear")
    assert sweep.target_values(".*query") == (("re:.*query",), ".*query")
    assert sweep.target_values(["re:.*(query|value)"]) == (("re:.*(query|value)",), ".*(query|value)")


def test_bench_targets_are_parsed_like_every_command(app, fake_runner, route_runs, make_bert, monkeypatch, tmp_path):
    runner = route_runs(fake_runner())
    monkeypatch.setattr(sweep, "load_model_for", lambda model, kind: make_bert())
    base = ["--task", "city-continent", "--model", "tiny", "--methods", "lora", "--baselines", "none"]
    res = CliRunner().invoke(app, base + ["--budget", "320", "--targets", "query,value", "--targets", "key",
                                          "--out", str(tmp_path / "a")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    argv = runner.calls[-1]
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--targets"] == ["query", "value", "key"]
    res = CliRunner().invoke(app, base + ["--budget", "320", "--targets", r"re:.*\.(query|value)",
                                          "--out", str(tmp_path / "b")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    argv = runner.calls[-1]
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--targets"] == [r"re:.*\.(query|value)"]
    res = CliRunner().invoke(app, base + ["--budget", "320", "--targets", "re:x", "--targets", "key",
                                          "--out", str(tmp_path / "c")], catch_exceptions=False)
    assert res.exit_code == 2 and "must be the only --targets value" in res.output
