"""`paretune bench --tune lr`: the grid, the search runs on the validation split, the choice, the
store's version-2 schema (search runs) and its migration from version 1."""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
from pathlib import Path

import pytest

from paretune.bench import sweep, tune
from paretune.bench.cli import run_bench
from paretune.bench.data import TEST_FRACTION, unit_hash
from paretune.bench.report import tuning_tables
from paretune.bench.store import SCHEMA_VERSION, Store
from paretune.bench.sweep import RunSpec, plan_runs
from paretune.errors import ParetuneError

def arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def options_of(argv: list[str]) -> dict:
    return {a.partition("=")[0]: json.loads(a.partition("=")[2]) for prev, a in zip(argv, argv[1:]) if prev == "-o"}


WORDS = [f"town{i:03d}" for i in range(240)]


def test_parse():
    assert tune.parse_tune("lr") == "lr" and tune.parse_tune(None) is None and tune.parse_tune("none") is None
    with pytest.raises(ParetuneError, match="--tune 'steps' is not supported"):
        tune.parse_tune("steps")
    assert tune.parse_grid(None) == (0.25, 0.5, 1.0, 2.0, 4.0)
    assert tune.parse_grid("2,0.5,1,2") == (0.5, 1.0, 2.0)
    for bad in ("a,b", "0,1", "-1", ""):
        with pytest.raises(ParetuneError, match="--tune-grid"):
            tune.parse_grid(bad)


class Splits:
    search_train, val, data_id = "/d/search-train.jsonl", "/d/val.jsonl", "abc123"


def test_search_runs_first_seed_every_factor_on_validation(bert):
    plan = plan_runs(bert, model="tiny", task="city-continent", methods=["lora"], budgets=[960, 3840],
                     seeds=[0, 1, 2], steps=3, batch_size=4, baselines=["head"])
    search = tune.search_runs(plan.runs, Splits, (0.5, 1, 2))
    assert len(search) == 3 * 3  # (lora r=2, lora r=8, head) x 3 rates, seed 0 only
    assert {r.seed for r in search} == {0} and {r.phase for r in search} == {"search"}
    assert {r.key for r in search}.isdisjoint(r.key for r in plan.runs)
    lora2 = next(r for r in plan.runs if r.method == "lora" and r.options["r"] == 2)
    assert sorted(r.lr for r in search if r.options == lora2.options) == pytest.approx([lora2.lr * f for f in (0.5, 1, 2)])
    argv = search[0].argv("/tmp/x")
    assert arg(argv, "--data") == Splits.search_train and arg(argv, "--eval-data") == Splits.val
    assert "--task" not in argv and search[0].canonical()["phase"] == "search"
    assert len(tune.search_runs(plan.runs, Splits, (1,), seeds=[0, 1, 2])) == 3 * 3


def row(method, lr, score, loss=None, status="finished", seed=0, options=None):
    return {"method": method, "options": options or {}, "targets": None, "lr": lr, "status": status, "seed": seed,
            "budget": None, "metric": "accuracy",
            "metrics": {"accuracy": score, **({"eval_loss": loss} if loss is not None else {})}}


def test_choose_best_mean_then_loss_then_closest_to_default():
    rows = [row("lora", 1e-3, 0.5), row("lora", 2e-3, 0.7), row("lora", 2e-3, 0.5, seed=1), row("lora", 4e-3, 0.65),
            row("head", 1e-3, 0.6, loss=0.9), row("head", 2e-3, 0.6, loss=0.8), row("head", 4e-3, 0.6, loss=0.8),
            row("full", 1e-4, 0.3, status="failed"), row("full", 2e-4, 0.3, status="failed")]
    defaults = {tune.config_key("head", {}, None): 4e-3}
    ch = {c.method: c for c in tune.choose(rows, defaults).values()}
    assert ch["lora"].lr == 4e-3 and ch["lora"].scores[2e-3] == pytest.approx(0.6)  # mean over seeds
    assert ch["head"].lr == 4e-3  # equal score, equal loss: the default (factor 1) wins the tie
    assert ch["full"].note and math.isnan(ch["full"].scores[1e-4])
    spec = RunSpec("m", "t", "lora", {}, None, 0, 1, 2e-3, 4)
    assert tune.apply([spec], {tune.config_key("lora", {}, None): ch["lora"]})[0].lr == 4e-3
    assert any("validation" in line for line in tune.describe(tune.choose(rows)))


def test_store_v1_file_is_migrated(tmp_path):
    """A version-1 runs.sqlite (before phase / data) opens, keeps its runs and resumes by key."""
    from paretune.bench import store as store_mod

    v1 = store_mod.SCHEMA.replace(",\n    phase TEXT NOT NULL DEFAULT 'final' CHECK (phase IN ('final', 'search')),"
                                  "\n    data TEXT", "")
    assert "phase" not in v1
    spec = RunSpec("tiny", "city-continent", "lora", {"r": 2}, 960, 0, 10, 1e-3, 8)
    conn = sqlite3.connect(tmp_path / "runs.sqlite")
    conn.executescript(v1)
    conn.execute("INSERT INTO runs (key, status, model, task, method, budget, seed, steps, lr, batch_size, metric) "
                 "VALUES (?, 'finished', 'tiny', 'city-continent', 'lora', 960, 0, 10, 0.001, 8, 'accuracy')",
                 (spec.key,))
    conn.execute("INSERT INTO metrics VALUES (1, 'accuracy', 0.5)")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with Store(tmp_path) as store:
        (r,) = store.runs()
        assert r["phase"] == "final" and r["data"] is None and r["metrics"] == {"accuracy": 0.5}
        assert store.plan(spec) == (1, "finished")
        search = RunSpec("tiny", "city-continent", "lora", {"r": 2}, 960, 0, 10, 2e-3, 8, data="a", eval_data="b",
                         data_id="d", phase="search")
        store.plan(search)
        assert [x["phase"] for x in store.runs()] == ["final", "search"] and len(store.runs(phase="search")) == 1
    conn = sqlite3.connect(tmp_path / "runs.sqlite")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    conn.close()
    with Store(tmp_path) as store:  # opening again changes nothing
        assert len(store.runs()) == 2


class ValRunner:
    """A fake `paretune train` whose accuracy on the file it is scored on depends on the rate and on
    that file's labels: a pseudo-prediction per (rate, input). Poisoning the file it reads changes
    which rate wins; poisoning a file it never reads changes nothing."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def accuracy(path, lr) -> float:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
        hits = [("a" if unit_hash(f"{lr:.6g}", r["text"]) < 0.5 else "b") == r["label"] for r in rows]
        return sum(hits) / len(hits)

    def __call__(self, argv):
        self.calls.append(list(argv))
        lr = float(arg(argv, "--lr"))
        acc = self.accuracy(arg(argv, "--eval-data"), lr)
        r = options_of(argv).get("r", 0)
        metrics = {"trainable": 1000 * r + 100, "stored_bytes": 4000 * r + 400, "metric": "accuracy",
                   "accuracy": acc, "eval_loss": 1 - acc, "train_seconds": 0.1}
        out = Path(arg(argv, "--out"))
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics))
        return subprocess.CompletedProcess(argv, 0, "", "")


def _csv(path: Path, poison: bool) -> Path:
    lines = ["text,label"]
    for i, w in enumerate(WORDS):
        label = "b" if i % 3 else "a"
        if poison and unit_hash("paretune-test", w) < TEST_FRACTION:  # a test row: flip its label
            label = "a" if label == "b" else "b"
        lines.append(f"{w},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _bench(tmp_path, name, poison, runner):
    return run_bench(model="tiny", data=_csv(tmp_path / f"{name}.csv", poison), methods=["lora"], budgets=[960],
                     seeds=[0, 1], steps=2, batch_size=4, baselines=["head"], out=tmp_path / name, runner=runner,
                     net=_tiny(), progress=False, echo=lambda s: None, tune="lr")


def _tiny():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def chosen(runner) -> dict:
    """(method, options) -> the rate of its final runs."""
    out = {}
    for c in runner.calls:
        if not arg(c, "--eval-data").endswith("test.jsonl"):
            continue
        out.setdefault((arg(c, "--method"), json.dumps(options_of(c))), set()).add(float(arg(c, "--lr")))
    return out


def test_poisoned_test_labels_leave_the_chosen_rates_unchanged(tmp_path):
    clean, poisoned = ValRunner(), ValRunner()
    res, files = _bench(tmp_path, "clean", False, clean)
    _bench(tmp_path, "poisoned", True, poisoned)
    a, b = chosen(clean), chosen(poisoned)
    assert a == b and all(len(v) == 1 for v in a.values()) and set(a) == {("lora", '{"r": 2}'), ("head", "{}")}
    # every search run read the validation split, never the test split, on seed 0 only
    search = [c for c in clean.calls if arg(c, "--eval-data").endswith("val.jsonl")]
    assert len(search) == 2 * 5 and {arg(c, "--seed") for c in search} == {"0"}
    assert all(arg(c, "--data").endswith("search-train.jsonl") for c in search)
    assert len(clean.calls) == 2 * 5 + 2 * 2 and res.search.finished == 10 and res.finished == 4
    # the test has teeth: scored on the test split, the two data sets would pick different rates
    grid = sorted({float(arg(c, "--lr")) for c in search if arg(c, "--method") == "lora"})
    pick = lambda d: max(grid, key=lambda lr: ValRunner.accuracy(next((tmp_path / d / "data").iterdir()) / "test.jsonl", lr))  # noqa: E731
    assert pick("clean") != pick("poisoned")
    # the report's tuning tables: rate -> validation score, the chosen one marked
    tables = tuning_tables(files.summary)
    assert len(tables) == 2 and all(sum(c[3] == "chosen" for c in t[2]) == 1 for t in tables)
    page = files.html.read_text()
    assert "Learning-rate search (--tune lr)" in page and "chosen" in page and "validation accuracy" in page
    assert "tune lr, lora r=2:" in files.table
    # search runs are not rows of the results table
    assert {r.method for r in files.summary.rows} == {"lora", "head"} and len(files.summary.runs) == 4


def test_tune_resumes(tmp_path):
    runner = ValRunner()
    _bench(tmp_path, "x", False, runner)
    n = len(runner.calls)
    res, _ = _bench(tmp_path, "x", False, runner)
    assert len(runner.calls) == n and res.search.skipped == 10 and res.skipped == 4


def test_tune_on_a_built_in_task_uses_its_validation_split(tmp_path, monkeypatch, bert, fake_runner):
    from paretune.bench import data as data_mod

    fake = fake_runner()  # run_bench imports prepare_task_search from paretune.bench.data when it runs
    monkeypatch.setattr(data_mod, "prepare_task_search", lambda task, out: _SplitsTask(tmp_path))

    res, files = run_bench(task="city-continent", model="tiny", methods=["lora"], budgets=[960], seeds=[0, 1],
                           steps=2, batch_size=4, baselines=[], out=tmp_path / "o", runner=fake, net=bert,
                           progress=False, echo=lambda s: None, tune="lr", tune_grid=(0.5, 1, 2))
    search = [c for c in fake.calls if "--data" in c]
    final = [c for c in fake.calls if "--task" in c]
    assert len(search) == 3 and len(final) == 2 and all(arg(c, "--eval-data") == "VAL" for c in search)
    # FakeRunner's quality does not depend on the rate: the tie goes to the default rate
    assert {float(arg(c, "--lr")) for c in final} == {sweep.default_lr("lora")}


class _SplitsTask:
    def __init__(self, tmp):
        self.search_train, self.val, self.data_id = "TRAIN", "VAL", "tid"
        self.counts = {"search_train": 10, "val": 2, "train": 12, "test": 3}
