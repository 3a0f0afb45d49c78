"""The SQLite results store: schema, round trip, resumable statuses, transactions."""

import sqlite3

import pytest

from paretune.bench.store import DB_NAME, ENV_FIELDS, SCHEMA_VERSION, Store
from paretune.bench.sweep import RunSpec
from paretune.errors import ParetuneError

ENV = {f: f"{f}-value" for f in ENV_FIELDS}


def spec(method="lora", r=2, seed=0, budget=1000):
    return RunSpec("tiny", "city-continent", method, {"r": r, "alpha": 8.0} if r else {}, budget, seed, 10, 1e-3, 8)


def columns(conn, table):
    return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


def test_schema(tmp_path):
    with Store(tmp_path) as store:
        assert store.path == tmp_path / DB_NAME
    conn = sqlite3.connect(tmp_path / DB_NAME)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"runs", "configs", "metrics", "environment"} <= tables
    assert columns(conn, "runs")[:2] == ["id", "key"]
    assert {"status", "model", "task", "method", "budget", "seed", "steps", "lr", "batch_size", "started_at",
            "finished_at", "error"} <= set(columns(conn, "runs"))
    assert columns(conn, "configs") == ["run_id", "key", "value_json"]
    assert columns(conn, "metrics") == ["run_id", "name", "value"]
    assert columns(conn, "environment") == ["run_id", *ENV_FIELDS]
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    with pytest.raises(sqlite3.IntegrityError):  # status is checked
        conn.execute("INSERT INTO runs (key, status, model, task, method, seed, steps, lr, batch_size) "
                     "VALUES ('k', 'done', 'm', 't', 'x', 0, 1, 0.1, 1)")
    conn.close()


def test_round_trip(tmp_path):
    s = spec()
    with Store(tmp_path) as store:
        run_id, status = store.plan(s)
        assert status == "queued"
        assert store.plan(s) == (run_id, "queued")  # same key: same row
        store.start(run_id, tmp_path / "run")
        assert store.status_of(s.key) == "running"
        store.finish(run_id, {"method": "lora", "trainable": 123, "stored_bytes": 492, "metric": "accuracy",
                              "accuracy": 0.75, "train_seconds": 1.25, "options": {"r": 2}, "flag": True,
                              "eval_loss": float("nan")}, ENV)
    with Store(tmp_path / DB_NAME, create=False) as store:  # the file path works as well as the folder
        (row,) = store.runs()
        assert store.counts() == {"queued": 0, "running": 0, "finished": 1, "failed": 0}
    assert row["key"] == s.key and len(row["key"]) == 64
    assert row["status"] == "finished" and row["metric"] == "accuracy"
    assert (row["model"], row["task"], row["method"], row["budget"], row["seed"], row["steps"], row["lr"],
            row["batch_size"]) == ("tiny", "city-continent", "lora", 1000, 0, 10, 1e-3, 8)
    assert row["options"] == {"r": 2, "alpha": 8.0}
    assert row["metrics"] == {"trainable": 123.0, "stored_bytes": 492.0, "accuracy": 0.75, "train_seconds": 1.25,
                              "eval_loss": None}  # numbers only; NaN stored as NULL
    assert row["environment"] == ENV
    assert row["started_at"] and row["finished_at"] and row["error"] is None
    assert row["run_dir"] == str(tmp_path / "run")


def test_failed_run_and_retry(tmp_path):
    with Store(tmp_path) as store:
        run_id, _ = store.plan(spec())
        store.start(run_id, tmp_path)
        store.fail(run_id, "exit status 1: boom", ENV)
        (row,) = store.runs("failed")
        assert row["error"] == "exit status 1: boom" and row["metrics"] == {}
        assert store.plan(spec()) == (run_id, "failed")
        store.start(run_id, tmp_path)  # a retry clears the error
        (row,) = store.runs()
        assert row["status"] == "running" and row["error"] is None and row["finished_at"] is None


def test_transaction_rolls_back(tmp_path):
    with Store(tmp_path) as store:
        run_id, _ = store.plan(spec())
        with pytest.raises(KeyboardInterrupt):
            with store.transaction() as c:
                c.execute("INSERT INTO metrics (run_id, name, value) VALUES (?, 'x', 1)", (run_id,))
                c.execute("UPDATE runs SET status = 'finished' WHERE id = ?", (run_id,))
                raise KeyboardInterrupt
        (row,) = store.runs()
        assert row["status"] == "queued" and row["metrics"] == {}
        # a finish whose metrics cannot be written leaves the run as it was
        store.start(run_id, tmp_path)
        with pytest.raises(sqlite3.Error):
            with store.transaction() as c:
                c.execute("UPDATE runs SET status = 'finished' WHERE id = ?", (run_id,))
                c.execute("INSERT INTO nowhere VALUES (1)")
        assert store.runs()[0]["status"] == "running"


def test_bad_files(tmp_path):
    with pytest.raises(ParetuneError, match="does not exist"):
        Store(tmp_path / "empty", create=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / DB_NAME).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ParetuneError, match="not a paretune results database"):
        Store(tmp_path / "junk")
