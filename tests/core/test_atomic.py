"""Atomic folder and file writes: a kill between the two renames is recovered, dead writers'
leftovers are removed, live writers' are kept."""

import os
import subprocess
import sys

import pytest

from paretune.core import atomic
from paretune.core.atomic import atomic_dir, atomic_write_text, recover


def _write(path, text):
    with atomic_dir(path) as tmp:
        (tmp / "f.txt").write_text(text)


def _dead_pid() -> int:
    """The id of a process that has exited."""
    p = subprocess.Popen([sys.executable, "-S", "-c", "pass"])
    p.wait()
    return p.pid


def test_write_replaces_and_leaves_nothing_beside(tmp_path):
    _write(tmp_path / "a", "one")
    _write(tmp_path / "a", "two")
    assert (tmp_path / "a" / "f.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_error_inside_changes_nothing(tmp_path):
    _write(tmp_path / "a", "one")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "a") as tmp:
            (tmp / "f.txt").write_text("half")
            raise RuntimeError
    assert (tmp_path / "a" / "f.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_kill_between_renames_is_recovered_by_next_read(tmp_path, monkeypatch):
    """A process killed after renaming the old folder aside: the folder is gone, the previous copy
    sits in .a.old-PID-*. Simulated in a child process that exits hard between the renames."""
    target = tmp_path / "a"
    _write(target, "one")
    code = f"""
import importlib.util, os
spec = importlib.util.spec_from_file_location("atomic_alone", {atomic.__file__!r})  # without importing torch
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
real = os.replace
calls = []
def replace(a, b):
    real(a, b)
    calls.append(1)
    if len(calls) == 1:
        os._exit(9)  # killed between the two renames
atomic.os.replace = replace
with atomic.atomic_dir({str(target)!r}) as tmp:
    (tmp / "f.txt").write_text("two")
"""
    rc = subprocess.run([sys.executable, "-c", code]).returncode
    assert rc == 9
    assert not target.exists()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len([n for n in names if n.startswith(".a.old-")]) == 1
    assert len([n for n in names if n.startswith(".a.tmp-")]) == 1
    assert recover(target) is True
    assert (target / "f.txt").read_text() == "one"  # the previous complete copy, not the unfinished one
    _write(target, "three")  # the next write removes the dead writer's temporary folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert (target / "f.txt").read_text() == "three"


def test_next_write_recovers_first(tmp_path, monkeypatch):
    """The kill simulated in this process (SystemExit after the first rename, writer pid then
    reported dead): the next atomic_dir restores the old copy before anything else."""
    target = tmp_path / "a"
    _write(target, "one")
    real = os.replace
    calls = []

    def replace(a, b):
        real(a, b)
        calls.append(1)
        if len(calls) == 1:
            raise SystemExit

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(SystemExit):
        _write(target, "two")
    monkeypatch.setattr(atomic.os, "replace", real)
    assert not target.exists()
    # this process is alive, so its own leftovers look live: pretend the writer died
    monkeypatch.setattr(atomic, "pid_alive", lambda pid: False)
    with atomic_dir(target) as tmp:
        assert (target / "f.txt").read_text() == "one"  # restored before the write began
        (tmp / "f.txt").write_text("three")
    assert (target / "f.txt").read_text() == "three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_live_writer_is_left_alone(tmp_path):
    """Leftovers named with a running process's id are neither restored nor removed."""
    live = tmp_path / f".a.old-{os.getppid()}-x"
    live.mkdir()
    (live / "f.txt").write_text("old")
    tmpdir = tmp_path / f".a.tmp-{os.getppid()}-y"
    tmpdir.mkdir()
    assert recover(tmp_path / "a") is False
    _write(tmp_path / "b", "x")  # another name: untouched
    assert live.is_dir() and tmpdir.is_dir()


def test_stale_leftovers_removed_and_two_old_copies_not_guessed(tmp_path):
    dead = _dead_pid()
    for n in (f".a.old-{dead}-1", f".a.old-{dead}-2"):
        (tmp_path / n).mkdir()
    assert recover(tmp_path / "a") is False  # two candidates: no guess
    (tmp_path / f".a.tmp-{dead}-3").mkdir()
    (tmp_path / f".m.json.tmp-{dead}-4").write_text("half")
    _write(tmp_path / "a", "new")
    atomic_write_text(tmp_path / "m.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "m.json"]


def test_atomic_write_text_fsyncs_and_replaces(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    atomic_write_text(tmp_path / "x.txt", "hello")
    assert (tmp_path / "x.txt").read_text() == "hello"
    assert len(synced) >= 2  # the file and its folder
    _write(tmp_path / "d", "x")
    assert len(synced) >= 5  # the file, the temporary folder, the parent


def test_names_without_a_writer_pid_are_left_alone(tmp_path):
    """A folder named in another scheme (no pid after the prefix) may belong to a live writer."""
    for n in (".a.tmp-live", ".a.tmp-x12"):
        (tmp_path / n).mkdir()
    _write(tmp_path / "a", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.tmp-live", ".a.tmp-x12", "a"]
