"""The results store: one SQLite file (``OUT/runs.sqlite``) holding every run of a bench.

Schema (version 2, in ``PRAGMA user_version``)::

    runs         one row per planned run
      id           INTEGER PRIMARY KEY
      key          TEXT UNIQUE NOT NULL   sha256 of the canonical run spec (see RunSpec.key)
      status       TEXT NOT NULL          queued | running | finished | failed
      model        TEXT NOT NULL          e.g. minilm-l6
      task         TEXT NOT NULL          e.g. city-continent
      method       TEXT NOT NULL          a registered method, or the baselines head / full
      budget       INTEGER                the trainable-parameter budget (NULL: baselines and
                                          methods of fixed size)
      seed         INTEGER NOT NULL
      steps        INTEGER NOT NULL
      lr           REAL NOT NULL
      batch_size   INTEGER NOT NULL
      targets      TEXT                   JSON list of target names, NULL for all-linear
      metric       TEXT                   name of the task's quality metric (accuracy, exact_match)
      run_dir      TEXT                   folder the run wrote (metrics.json)
      started_at   TEXT                   ISO-8601 UTC
      finished_at  TEXT                   ISO-8601 UTC
      error        TEXT                   a failed run's message and stderr tail
      phase        TEXT NOT NULL          final (a reported run) | search (a --tune lr search run,
                                          scored on the validation split; version 2)
      data         TEXT                   sha256 of the run's data files and split rule (user
                                          data, or a search run's splits); NULL: the built-in
                                          task's own split (version 2)
    configs      the method options of a run
      run_id       INTEGER REFERENCES runs(id) ON DELETE CASCADE
      key          TEXT                   option name (e.g. r)
      value_json   TEXT                   its value as JSON (e.g. 8)
      PRIMARY KEY (run_id, key)
    metrics      every numeric value of a finished run's metrics.json
      run_id       INTEGER REFERENCES runs(id) ON DELETE CASCADE
      name         TEXT                   trainable, stored_bytes, train_seconds, peak_memory_bytes,
                                          eval_loss, accuracy / exact_match, ...
      value        REAL
      PRIMARY KEY (run_id, name)
    environment  where a run ran
      run_id       INTEGER PRIMARY KEY REFERENCES runs(id) ON DELETE CASCADE
      python, torch, transformers, paretune, platform, cpu, gpu   TEXT

Version 1 files (no ``phase`` / ``data``) are migrated in place when opened: the two columns
are added (every existing run is ``final`` with ``data`` NULL) and ``user_version`` becomes 2, in
one transaction; their run keys are unchanged, so they resume as before.

Resuming: a run is identified by its key. Planning a run that is already ``finished`` leaves it
alone; a run ``queued``, ``running`` (left so by an interrupted bench) or ``failed`` is run again.
Every change (planning, starting, finishing, failing) is one transaction, so the file never
holds a half-recorded run: a run is either finished with all its metrics or not finished.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import sqlite3
from pathlib import Path
from typing import Any, Iterator

from ..errors import ParetuneError
from ..core.atomic import pid_alive

SCHEMA_VERSION = 2
PHASES = ("final", "search")
DB_NAME = "runs.sqlite"
STATUSES = ("queued", "running", "finished", "failed")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    key TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'finished', 'failed')),
    model TEXT NOT NULL,
    task TEXT NOT NULL,
    method TEXT NOT NULL,
    budget INTEGER,
    seed INTEGER NOT NULL,
    steps INTEGER NOT NULL,
    lr REAL NOT NULL,
    batch_size INTEGER NOT NULL,
    targets TEXT,
    metric TEXT,
    run_dir TEXT,
    started_at TEXT,
    finished_at TEXT,
    error TEXT,
    phase TEXT NOT NULL DEFAULT 'final' CHECK (phase IN ('final', 'search')),
    data TEXT
);
CREATE TABLE IF NOT EXISTS configs (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value_json TEXT NOT NULL,
    PRIMARY KEY (run_id, key)
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (run_id, name)
);
CREATE TABLE IF NOT EXISTS environment (
    run_id INTEGER PRIMARY KEY REFERENCES runs(id) ON DELETE CASCADE,
    python TEXT, torch TEXT, transformers TEXT, paretune TEXT, platform TEXT, cpu TEXT, gpu TEXT
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status);
"""

MIGRATE_1_TO_2 = (
    "ALTER TABLE runs ADD COLUMN phase TEXT NOT NULL DEFAULT 'final' CHECK (phase IN ('final', 'search'))",
    "ALTER TABLE runs ADD COLUMN data TEXT",
)

ENV_FIELDS = ("python", "torch", "transformers", "paretune", "platform", "cpu", "gpu")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _cpu_name() -> str:
    name = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    name = name or platform.processor() or platform.machine()
    return f"{name} ({os.cpu_count()} cores)"


def environment() -> dict[str, str]:
    """Versions and hardware of this machine (the runs' subprocesses use the same interpreter)."""
    import torch
    import transformers

    from .. import __version__

    gpu = ""
    if torch.cuda.is_available():
        gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "paretune": __version__, "platform": platform.platform(), "cpu": _cpu_name(), "gpu": gpu or "none",
    }


class Store:
    """The SQLite results store of one bench folder. Use as a context manager or call close()."""

    def __init__(self, path: str | os.PathLike, *, create: bool = True):
        path = Path(path)
        if path.is_dir() or path.suffix != ".sqlite":
            path = path / DB_NAME
        if not create and not path.is_file():
            raise ParetuneError(f"{path} does not exist; run `paretune bench` with this --out first.")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.conn = sqlite3.connect(str(path), isolation_level=None, timeout=30)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA foreign_keys = ON")
        try:
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, 1, SCHEMA_VERSION):
                raise ParetuneError(f"{path} has results schema version {version}; this paretune reads versions "
                                    f"1 to {SCHEMA_VERSION}. Use another --out folder.")
            with self.transaction():
                if version == 1:
                    cols = {r[1] for r in self.conn.execute("PRAGMA table_info(runs)")}
                    for statement, col in zip(MIGRATE_1_TO_2, ("phase", "data")):
                        if col not in cols:
                            self.conn.execute(statement)
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            self.conn.close()
            raise ParetuneError(f"{path} is not a paretune results database ({e}); use another --out folder.") from None

    # -- plumbing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; ROLLBACK on any error (KeyboardInterrupt included)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing ----------------------------------------------------------------------------
    def plan(self, spec) -> tuple[int, str]:
        """Record a planned run (a :class:`paretune.bench.sweep.RunSpec`); returns (id, status).
        An existing run with the same key keeps its row and status."""
        key = spec.key
        with self.transaction() as c:
            row = c.execute("SELECT id, status FROM runs WHERE key = ?", (key,)).fetchone()
            if row is not None:
                return row["id"], row["status"]
            cur = c.execute(
                "INSERT INTO runs (key, status, model, task, method, budget, seed, steps, lr, batch_size, targets, "
                "phase, data) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, spec.model, spec.task, spec.method, spec.budget, spec.seed, spec.steps, spec.lr,
                 spec.batch_size, json.dumps(spec.targets) if spec.targets is not None else None,
                 getattr(spec, "phase", "final"), getattr(spec, "data_id", None)),
            )
            run_id = cur.lastrowid
            c.executemany("INSERT INTO configs (run_id, key, value_json) VALUES (?, ?, ?)",
                          [(run_id, k, json.dumps(v, sort_keys=True)) for k, v in sorted(spec.options.items())])
            return run_id, "queued"

    def start(self, run_id: int, run_dir: str | os.PathLike) -> None:
        with self.transaction() as c:
            c.execute("DELETE FROM metrics WHERE run_id = ?", (run_id,))
            c.execute("DELETE FROM environment WHERE run_id = ?", (run_id,))
            c.execute("UPDATE runs SET status = 'running', run_dir = ?, started_at = ?, finished_at = NULL, "
                      "error = NULL WHERE id = ?", (str(run_dir), now(), run_id))

    def finish(self, run_id: int, metrics: dict[str, Any], env: dict[str, str] | None = None) -> None:
        """Mark a run finished with the numeric values of its metrics.json, in one transaction."""
        numeric = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        numeric = {k: (v if math.isfinite(v) else None) for k, v in numeric.items()}
        metric = metrics.get("metric") if isinstance(metrics.get("metric"), str) else None
        with self.transaction() as c:
            c.execute("DELETE FROM metrics WHERE run_id = ?", (run_id,))
            c.executemany("INSERT INTO metrics (run_id, name, value) VALUES (?, ?, ?)",
                          [(run_id, k, v) for k, v in sorted(numeric.items())])
            self._write_env(c, run_id, env)
            c.execute("UPDATE runs SET status = 'finished', metric = ?, finished_at = ?, error = NULL WHERE id = ?",
                      (metric, now(), run_id))

    def fail(self, run_id: int, error: str, env: dict[str, str] | None = None) -> None:
        with self.transaction() as c:
            c.execute("DELETE FROM metrics WHERE run_id = ?", (run_id,))
            self._write_env(c, run_id, env)
            c.execute("UPDATE runs SET status = 'failed', finished_at = ?, error = ? WHERE id = ?",
                      (now(), error, run_id))

    @staticmethod
    def _write_env(c: sqlite3.Connection, run_id: int, env: dict[str, str] | None) -> None:
        c.execute("DELETE FROM environment WHERE run_id = ?", (run_id,))
        if env:
            c.execute(f"INSERT INTO environment (run_id, {', '.join(ENV_FIELDS)}) VALUES (?{', ?' * len(ENV_FIELDS)})",
                      (run_id, *(str(env.get(f, "")) for f in ENV_FIELDS)))

    # -- reading ----------------------------------------------------------------------------
    def runs(self, status: str | None = None, phase: str | None = None) -> list[dict[str, Any]]:
        """Every run as a dict: the runs row plus ``options`` (dict), ``metrics`` (dict) and
        ``environment`` (dict or None), in id order; only those of ``status`` / ``phase`` when given."""
        conds = [(c, v) for c, v in (("status = ?", status), ("phase = ?", phase)) if v]
        where = ("WHERE " + " AND ".join(c for c, _ in conds)) if conds else ""
        args = tuple(v for _, v in conds)
        rows = [dict(r) for r in self.conn.execute(f"SELECT * FROM runs {where} ORDER BY id", args)]
        for r in rows:
            r["targets"] = json.loads(r["targets"]) if r["targets"] else None
            r["options"] = {k: json.loads(v) for k, v in
                            self.conn.execute("SELECT key, value_json FROM configs WHERE run_id = ? ORDER BY key",
                                              (r["id"],))}
            r["metrics"] = dict(self.conn.execute("SELECT name, value FROM metrics WHERE run_id = ? ORDER BY name",
                                                  (r["id"],)).fetchall())
            env = self.conn.execute("SELECT * FROM environment WHERE run_id = ?", (r["id"],)).fetchone()
            r["environment"] = {f: env[f] for f in ENV_FIELDS} if env else None
        return rows

    def status_of(self, key: str) -> str | None:
        row = self.conn.execute("SELECT status FROM runs WHERE key = ?", (key,)).fetchone()
        return row["status"] if row else None

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for row in self.conn.execute("SELECT status, COUNT(*) AS n FROM runs GROUP BY status"):
            out[row["status"]] = row["n"]
        return out


# -- one bench per folder -----------------------------------------------------------------------

LOCK_NAME = ".lock"


class BenchLocked(ParetuneError):
    """Another bench holds the folder's lock."""


@contextlib.contextmanager
def bench_lock(out: str | os.PathLike) -> Iterator[Path]:
    """Hold ``OUT/.lock`` while a bench writes ``out``: a second bench on the same folder gets a
    :class:`BenchLocked` error ("another bench is running in OUT (pid N)") instead of training the
    same runs into the same folders.

    Where ``fcntl`` exists (Linux, macOS) the lock is an exclusive ``flock`` on the file: the
    operating system releases it when the holder exits or is killed (even by SIGKILL), so a stale
    lock never blocks. The file also holds the holder's pid, for the message; the descriptor is not
    inherited by the worker processes (Python opens files non-inheritable), so a leftover worker
    cannot keep the folder locked. Elsewhere the file is a pid file created exclusively: a pid
    that is no longer running is a stale lock and is taken over."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        fcntl = None
    if fcntl is not None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise BenchLocked(f"another bench is running in {out} (pid {holder}); wait for it to finish, "
                                  "stop it, or give another --out.") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield path
        finally:
            os.close(fd)  # releases the lock
        return
    while True:  # pragma: no cover - Windows
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                holder = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                holder = 0
            if holder and pid_alive(holder):
                raise BenchLocked(f"another bench is running in {out} (pid {holder}); wait for it to finish, "
                                  "stop it, or give another --out.") from None
            path.unlink(missing_ok=True)  # stale: its bench is gone
            continue
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        break
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
