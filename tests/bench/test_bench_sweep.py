"""The sweep: the run list, one subprocess per run (a fake one here), failures, resuming."""

import dataclasses
import json
import sys

import pytest

from paretune.bench import sweep
from paretune.bench.budget import layer_shapes
from paretune.bench.store import Store
from paretune.bench.sweep import DEFAULT_LR, RunSpec, plan_runs, run_sweep
from paretune.bench.tuning import tuning_of
from paretune.core import registry
from paretune.errors import ParetuneError

ENV = {"python": "3", "torch": "2", "transformers": "4", "paretune": "0", "platform": "p", "cpu": "c", "gpu": "none"}


def budgets_for(model, rs=(2, 8)):
    per_r = sum(n * (a + b) for (a, b), n in layer_shapes(model, "lora").items())
    return [per_r * r for r in rs]


def make_plan(model, **kw):
    args = dict(model="tiny", task="city-continent", methods=["lora", "pissa"], budgets=budgets_for(model),
                seeds=[0, 1], steps=5, batch_size=4)
    args.update(kw)
    return plan_runs(model, **args)


def test_plan_methods_budgets_seeds_and_baselines(bert):
    plan = make_plan(bert)
    runs = plan.runs
    assert len(runs) == 2 * 2 * 2 + 2 * 2  # methods x budgets x seeds + (head, full) x seeds
    adapters = [(r.method, r.options["r"], r.seed) for r in runs if r.method not in ("head", "full")]
    assert sorted(adapters) == sorted((m, r, s) for m in ("lora", "pissa") for r in (2, 8) for s in (0, 1))
    baselines = [(r.method, r.seed) for r in runs if r.method in ("head", "full")]
    assert sorted(baselines) == [("full", 0), ("full", 1), ("head", 0), ("head", 1)]
    assert all(r.budget is None and r.options == {} for r in runs if r.method in ("head", "full"))
    lrs = {r.method: r.lr for r in runs}
    assert lrs == {"lora": DEFAULT_LR["adapter"], "pissa": tuning_of("pissa").lr, "head": DEFAULT_LR["head"],
                   "full": DEFAULT_LR["full"]}
    assert len({r.key for r in runs}) == len(runs)
    assert plan.notes == []
    # --lr overrides every default; no baselines when asked
    plan = make_plan(bert, lr=0.05, baselines=[])
    assert {r.lr for r in plan.runs} == {0.05} and {r.method for r in plan.runs} == {"lora", "pissa"}


def test_every_registered_method_joins(bert, monkeypatch):
    registry.get("lora")
    spec = registry.get("lora")
    monkeypatch.setitem(registry._METHODS, "lora-copy",
                        registry.MethodSpec("lora-copy", spec.config_cls, spec.delta_cls, "t", "f", spec.kinds))
    plan = make_plan(bert, methods=None, seeds=[0])
    ran = {r.method for r in plan.runs}
    assert {"lora-copy", "lora", "head", "full"} <= ran
    for name in registry.all_methods():  # each method runs, or a note says why it could not
        assert name in ran or any(n.startswith(f"skipped {name}") for n in plan.notes), name


def test_plan_skips_what_cannot_run(bert, monkeypatch):
    spec = registry.get("lora")
    monkeypatch.setitem(registry._METHODS, "convlora", registry.MethodSpec(
        "convlora", spec.config_cls, spec.delta_cls, "t", "f", ("conv2d",)))
    per_r = budgets_for(bert, (1,))[0]
    plan = make_plan(bert, methods=["lora", "convlora"], budgets=[per_r * 2, per_r * 2 + 1, per_r // 100],
                     seeds=[0], baselines=[])
    assert [(r.method, r.options) for r in plan.runs] == [("lora", {"r": 2})]
    text = "\n".join(plan.notes)
    assert "skipped convlora: it cannot adapt this model" in text
    assert "gives the same {'r': 2}" in text  # two budgets, one run
    assert f"skipped lora at budget {per_r // 100:,}" in text
    with pytest.raises(ParetuneError, match="unknown method 'lorra'. Did you mean 'lora'"):
        make_plan(bert, methods=["lorra"])
    with pytest.raises(ParetuneError, match="no budget given"):
        make_plan(bert, budgets=[])


def test_key_ignores_budget_but_not_options():
    a = RunSpec("m", "t", "lora", {"r": 2}, 100, 0, 10, 1e-3, 8)
    assert a.key == RunSpec("m", "t", "lora", {"r": 2}, 120, 0, 10, 1e-3, 8).key
    for other in (RunSpec("m", "t", "lora", {"r": 3}, 100, 0, 10, 1e-3, 8),
                  RunSpec("m", "t", "lora", {"r": 2}, 100, 1, 10, 1e-3, 8),
                  RunSpec("m", "t", "lora", {"r": 2}, 100, 0, 10, 2e-3, 8),
                  RunSpec("m", "t", "lora", {"r": 2}, 100, 0, 10, 1e-3, 8, ("query",))):
        assert other.key != a.key


def test_argv_is_a_train_command(tmp_path):
    s = RunSpec("minilm-l6", "city-continent", "lora", {"r": 8, "init": "gaussian"}, 340_000, 3, 150, 2e-3, 32,
                ("query", "value"))
    argv = s.argv(tmp_path / "run")
    assert argv[:4] == [sys.executable, "-m", "paretune.cli", "train"]
    text = " ".join(argv[4:])
    for part in ("--model minilm-l6", "--task city-continent", "--method lora", "-o init=gaussian", "-o r=8",
                 "--targets query --targets value", "--steps 150", "--lr 0.002", "--batch-size 32", "--seed 3",
                 f"--out {tmp_path / 'run'}"):
        assert part in text


def test_sweep_records_every_run(bert, tmp_path, fake_runner):
    plan = make_plan(bert)
    runner = fake_runner()
    lines = []
    with Store(tmp_path) as store:
        result = run_sweep(plan.runs, store, tmp_path, runner=runner, progress=False, log=lines.append, env=ENV)
        rows = store.runs()
    assert len(runner.calls) == len(plan.runs) == result.ran == result.finished and not result.failed
    assert all(r["status"] == "finished" for r in rows)
    lora8 = next(r for r in rows if r["method"] == "lora" and r["options"] == {"r": 8} and r["seed"] == 1)
    assert lora8["metrics"]["accuracy"] == pytest.approx(0.5 + 0.24 + 0.01)
    assert lora8["metrics"]["trainable_planned"] == budgets_for(bert)[1]
    assert lora8["environment"] == ENV and lora8["metric"] == "accuracy"
    assert len(lines) == len(plan.runs)
    assert "lora r=8 seed=1: accuracy=0.7500" in "\n".join(lines) and " s wall" in lines[0]


def test_failed_run_is_recorded_and_the_sweep_goes_on(bert, tmp_path, fake_runner):
    plan = make_plan(bert, seeds=[0])
    runner = fake_runner(fail={"pissa"})
    lines = []
    with Store(tmp_path) as store:
        result = run_sweep(plan.runs, store, tmp_path, runner=runner, progress=False, log=lines.append, env=ENV)
        rows = store.runs()
    assert len(runner.calls) == len(plan.runs)
    failed = [r for r in rows if r["status"] == "failed"]
    assert {r["method"] for r in failed} == {"pissa"} and len(failed) == 2 == len(result.failed)
    assert "exit status 1" in failed[0]["error"] and "pissa blew up on purpose" in failed[0]["error"]
    assert failed[0]["metrics"] == {}
    assert sum(r["status"] == "finished" for r in rows) == len(plan.runs) - 2
    assert any(line.startswith("[") and "FAILED pissa" in line and "blew up" in line for line in lines)
    # a rerun retries the failed runs only
    runner2 = fake_runner()
    with Store(tmp_path) as store:
        result = run_sweep(plan.runs, store, tmp_path, runner=runner2, progress=False, log=lines.append, env=ENV)
        assert store.counts()["finished"] == len(plan.runs)
    assert len(runner2.calls) == 2 and result.skipped == len(plan.runs) - 2


def test_missing_or_bad_metrics_fail_the_run(bert, tmp_path):
    plan = make_plan(bert, methods=["lora"], budgets=budgets_for(bert, (2,)), seeds=[0], baselines=[])

    def no_file(argv):
        import subprocess
        return subprocess.CompletedProcess(argv, 0, "", "")

    def raises(argv):
        raise OSError("cannot start python")

    for runner, message in ((no_file, "wrote no"), (raises, "OSError: cannot start python")):
        with Store(tmp_path / runner.__name__) as store:
            result = run_sweep(plan.runs, store, tmp_path / runner.__name__, runner=runner, progress=False,
                               log=lambda s: None, env=ENV)
            (row,) = store.runs()
        assert row["status"] == "failed" and message in row["error"] and len(result.failed) == 1


def test_resume_after_interrupt(bert, tmp_path, fake_runner):
    plan = make_plan(bert, seeds=[0])
    n = len(plan.runs)
    first = fake_runner(interrupt_at=3)
    with Store(tmp_path) as store:
        with pytest.raises(KeyboardInterrupt):
            run_sweep(plan.runs, store, tmp_path, runner=first, progress=False, log=lambda s: None, env=ENV)
        counts = store.counts()
    assert len(first.calls) == 3
    assert counts == {"queued": n - 3, "running": 1, "finished": 2, "failed": 0}
    # the interrupted run left a stale metrics.json-less folder; the rerun starts it clean
    second = fake_runner()
    with Store(tmp_path) as store:
        result = run_sweep(plan.runs, store, tmp_path, runner=second, progress=False, log=lambda s: None, env=ENV)
        rows = store.runs()
    assert len(second.calls) == n - 2 and result.skipped == 2 and result.finished == n - 2
    assert all(r["status"] == "finished" for r in rows) and len(rows) == n
    done_first = {" ".join(c) for c in first.calls[:2]}
    assert not done_first & {" ".join(c) for c in second.calls}  # finished runs are not redone
    # a third sweep does nothing
    third = fake_runner()
    with Store(tmp_path) as store:
        run_sweep(plan.runs, store, tmp_path, runner=third, progress=False, log=lambda s: None, env=ENV)
    assert third.calls == []


def test_a_stale_metrics_file_is_not_trusted(bert, tmp_path):
    plan = make_plan(bert, methods=["lora"], budgets=budgets_for(bert, (2,)), seeds=[0], baselines=[])
    (spec,) = plan.runs
    stale = sweep.run_dir_for(tmp_path, spec)
    stale.mkdir(parents=True)
    (stale / "metrics.json").write_text(json.dumps({"trainable": 1, "stored_bytes": 1, "metric": "accuracy",
                                                    "accuracy": 1.0}))

    def crash(argv):
        import subprocess
        return subprocess.CompletedProcess(argv, 1, "", "killed")

    with Store(tmp_path) as store:
        run_sweep(plan.runs, store, tmp_path, runner=crash, progress=False, log=lambda s: None, env=ENV)
        assert store.runs()[0]["status"] == "failed"


def test_head_lr_and_max_eval_are_part_of_a_run():
    plain = RunSpec("minilm-l6", "city-continent", "lora", {"r": 2}, None, 0, 150, 2e-3, 32)
    tuned = dataclasses.replace(plain, head_lr=5e-3, max_eval=2000)
    assert plain.key != tuned.key
    argv = tuned.argv("out")
    assert argv[argv.index("--head-lr") + 1] == "0.005" and argv[argv.index("--max-eval") + 1] == "2000"
    assert "--head-lr" not in plain.argv("out")


def test_a_method_can_carry_its_own_bench_lr():
    assert sweep.default_lr("vera") == tuning_of("vera").lr == 8e-2
    assert sweep.default_lr("lora") == DEFAULT_LR["adapter"]
    # the head-only baseline has its own searched rate; the head of adapter runs keeps HEAD_LR
    assert sweep.default_lr("head") == DEFAULT_LR["head"] == 4e-2 != sweep.HEAD_LR
