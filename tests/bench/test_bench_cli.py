"""`paretune bench` through typer's CliRunner, with a fake trainer and a tiny model."""

import sqlite3

import pytest
from typer.testing import CliRunner

from paretune.bench import sweep
from paretune.bench.cli import parse_seeds
from paretune.core import registry
from paretune.errors import ParetuneError

cli = CliRunner()


@pytest.fixture
def fake(monkeypatch, make_bert, fake_runner, route_runs):
    """Every run goes to a FakeRunner; budgets are matched on a tiny BERT (480 LoRA params per r)."""
    runner = route_runs(fake_runner(fail={"full"}))
    monkeypatch.setattr(sweep, "load_model_for", lambda model, kind: make_bert())
    monkeypatch.setitem(sweep.QUICK, "budgets", (960, 3840))  # r=2, r=8 on the tiny model
    return runner


def invoke(app, args):
    return cli.invoke(app, args, catch_exceptions=False)


def test_quick(app, fake, tmp_path):
    out = tmp_path / "bench"
    res = invoke(app, ["--quick", "--out", str(out)])
    assert res.exit_code == 0, res.output
    methods = [c[c.index("--method") + 1] for c in fake.calls]
    assert methods.count("lora") == methods.count("pissa") == 2 and methods.count("head") == methods.count("full") == 1
    for name in registry.all_methods():  # every registered method runs, or the output says why not
        assert name in methods or f"skipped {name}" in res.stdout
    for c in fake.calls:
        text = " ".join(c)
        assert "--model minilm-l6 --task city-continent" in text
        assert "--steps 80" in text and "--batch-size 16" in text and "--seed 0" in text
        assert "--max-eval 500" in text
        # the common classification head trains at the head baseline's rate in every run
        assert ("--head-lr" in text) == ("--method head" not in text)
    finished = len(fake.calls) - 1
    assert (out / "runs.sqlite").is_file() and (out / "pareto.png").is_file() and (out / "report.html").is_file()
    assert "lora" in res.stdout and "r=8" in res.stdout and "params" in res.stdout
    assert "failed runs (1)" in res.stdout and "full blew up on purpose" in res.stdout
    assert str(out / "report.html") in res.stdout
    conn = sqlite3.connect(out / "runs.sqlite")
    assert conn.execute("SELECT COUNT(*) FROM runs WHERE status = 'finished'").fetchone()[0] == finished
    conn.close()
    # the same command again: nothing is redone but the failed run
    n = len(fake.calls)
    res = invoke(app, ["--quick", "--out", str(out)])
    assert res.exit_code == 0 and len(fake.calls) == n + 1 and f"{finished} run(s) already finished" in res.stdout
    # --report-only trains nothing
    (out / "report.html").unlink()
    res = invoke(app, ["--report-only", "--out", str(out)])
    assert res.exit_code == 0 and len(fake.calls) == n + 1 and (out / "report.html").is_file()
    assert "lora" in res.stdout


def test_explicit_sweep(app, fake, tmp_path):
    res = invoke(app, ["--task", "city-continent", "--model", "tiny", "--methods", "lora", "--budget", "1000",
                       "--budget", "2000", "--seeds", "0,1", "--steps", "7", "--lr", "0.01", "--batch-size", "8",
                       "--baselines", "head", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    runs = [(c[c.index("--method") + 1], c[c.index("--seed") + 1]) for c in fake.calls]
    assert sorted(runs) == [("head", "0"), ("head", "1"), ("lora", "0"), ("lora", "0"), ("lora", "1"), ("lora", "1")]
    assert all("--lr 0.01" in " ".join(c) and "--steps 7" in " ".join(c) for c in fake.calls)


@pytest.mark.parametrize("args, message", [
    (["--task", "city-continen"], "unknown task 'city-continen'"),
    (["--quick", "--methods", "lora,nope"], "unknown method 'nope'"),
    (["--quick", "--seeds", "0,x"], "--seeds '0,x' is invalid"),
    (["--quick", "--budget", "0"], "--budget 0 is invalid"),
    (["--quick", "--steps", "0"], "--steps 0 is invalid"),
    (["--quick", "--lr", "-1"], "--lr -1.0 is invalid"),
    (["--quick", "--baselines", "heads"], "unknown baseline 'heads'"),
    ([], "give --task NAME"),
])
def test_bad_input(app, fake, tmp_path, args, message):
    res = cli.invoke(app, args + ["--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert message in res.stderr and "Traceback" not in res.output
    assert fake.calls == []


def test_report_only_needs_a_store(app, tmp_path):
    res = cli.invoke(app, ["--report-only", "--out", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "does not exist" in res.stderr


def test_interrupt_exits_130(app, monkeypatch, make_bert, fake_runner, route_runs, tmp_path):
    route_runs(fake_runner(interrupt_at=2))
    monkeypatch.setattr(sweep, "load_model_for", lambda model, kind: make_bert())
    monkeypatch.setitem(sweep.QUICK, "budgets", (960, 3840))
    res = cli.invoke(app, ["--quick", "--out", str(tmp_path)])
    assert res.exit_code == 130 and "Run the same command again" in res.stderr


def test_parse_seeds():
    assert parse_seeds("0, 1,2,1") == [0, 1, 2] and parse_seeds(None) is None
    with pytest.raises(ParetuneError):
        parse_seeds(",")


def test_registered_in_paretune_cli():
    from paretune.cli import app as main_app

    res = cli.invoke(main_app, ["bench", "--help"])
    assert res.exit_code == 0 and "--quick" in res.output and "--report-only" in res.output
