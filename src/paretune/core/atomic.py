"""Atomic writes: a folder or file appears complete or not at all.

A folder is written into a temporary folder beside it, ``.{name}.tmp-{pid}-{random}``; every file
and folder in it is fsynced, then an existing ``name`` is renamed aside to
``.{name}.old-{pid}-{random}``, the temporary folder is renamed to ``name``, the parent folder is
fsynced and the old copy removed. The writer's process id in both names lets a later writer tell
a folder left by a killed process (pid no longer running) from one another process is still
writing.

A process killed between the two renames leaves no ``name`` but a complete previous copy in
``.{name}.old-*``. :func:`recover` puts it back: when ``name`` is missing and exactly one
``.{name}.old-*`` folder exists whose writer is no longer running, it is renamed to ``name``.
:func:`atomic_dir` calls it before anything else, and readers call it before reading (the
previous copy, not the unfinished new one, is restored: the write that was killed never
completed). The next write to ``name`` also removes ``.{name}.tmp-*`` and ``.{name}.old-*``
folders (and ``.{name}.tmp-*`` files of :func:`atomic_write_text`) whose writer is no longer
running. A reused process id can make a dead writer's leftovers look alive; they then stay
until a later write.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def pid_alive(pid: int) -> bool:
    """Whether a process with this id is running (a process of another user counts as running)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def _leftovers(path: Path, kind: str) -> list[tuple[Path, int]]:
    """(path, writer pid) of every ``.{name}.{kind}-{pid}-*`` (or ``-{pid}``) beside ``path``. Names
    without a pid there (another writer's scheme) are left out: nothing tells whether their writer
    still runs."""
    if not path.parent.is_dir():
        return []
    prefix = f".{path.name}.{kind}-"
    out = []
    for entry in path.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        m = re.match(r"(\d+)(?:-|$)", entry.name[len(prefix):])
        if m:
            out.append((entry, int(m.group(1))))
    return out


def recover(path: str | os.PathLike) -> bool:
    """Restore ``path`` from the copy a killed writer left renamed aside (see the module
    docstring); returns True when it did. Does nothing when ``path`` exists, when no or more than
    one ``.{name}.old-*`` exists, or when that copy's writer is still running."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        return False
    old = _leftovers(path, "old")
    if len(old) != 1 or pid_alive(old[0][1]) or not old[0][0].is_dir():
        return False
    try:
        os.replace(old[0][0], path)
    except OSError:
        return False  # another process restored it first
    _fsync_dir(path.parent)
    return True


def _clean_stale(path: Path) -> None:
    """Remove temporary and old copies beside ``path`` whose writer is no longer running."""
    for entry, pid in _leftovers(path, "tmp") + _leftovers(path, "old"):
        if pid_alive(pid):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


def _fsync_dir(folder: Path) -> None:
    """fsync a folder (its entries: renames and new files); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (deepest first, the folder itself last)."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for f in files:
            p = os.path.join(root, f)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (an existing
    folder is swapped out, then removed). On error nothing at ``path`` changes. Before writing,
    a copy a killed writer left aside is restored and dead writers' leftovers are removed."""
    path = Path(path)
    recover(path)
    if path.exists() and not path.is_dir():
        from ..errors import ParetuneError

        raise ParetuneError(f"{path} exists and is not a folder; choose another output path.")
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(path)
    pid = os.getpid()
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{pid}-", dir=path.parent))
    try:
        yield tmp
        _normal_modes(tmp)
        _fsync_tree(tmp)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{pid}-{secrets.token_hex(4)}"
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _normal_modes(folder: Path) -> None:
    """Give a finished folder the modes plain mkdir / open would (mkdtemp makes 0700 folders, and
    some writers, safetensors among them, make 0600 files)."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o755 & ~mask)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, (os.stat(p).st_mode | 0o644) & 0o777 & ~mask)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a fsynced temporary file ``.{name}.tmp-{pid}-*`` and a rename
    (the parent folder fsynced after it); dead writers' temporary files are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644 & ~_umask())  # mkstemp makes 0600 files; give the mode a plain open() would
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
