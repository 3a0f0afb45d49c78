"""Progress display shared by every long-running part of paretune.

Two helpers:

* :func:`bar` returns a ``tqdm`` progress bar. On a terminal (stderr is a TTY) it is the usual
  redrawn bar. When stderr is not a terminal (a log file, a pipe, CI, a notebook's captured
  stream) redrawing would fill the log with carriage-return fragments, so the bar instead
  prints plain lines such as ``train lora: 40/100 (40%) 12.3 s``: at most one every
  ``PLAIN_INTERVAL_S`` seconds while it runs, and always one final line when it closes (even
  for ``leave=False`` bars, so a log keeps a record of every finished loop). No line is printed
  when the bar starts; a loop shorter than ``PLAIN_INTERVAL_S`` therefore prints one line.
* :func:`phase` is a context manager for a step that has no natural count (loading a model,
  one large factorisation). It prints ``desc ...`` when the step starts and
  ``desc: done in 3.2 s`` when it ends, in both terminal and non-terminal mode and whatever
  the duration (a predictable pair of lines is easier to read and to grep than lines that
  appear only sometimes; a caller whose step is usually quick passes ``delay`` so that only a
  slow one is announced). If the step raises, it prints ``desc: failed after 3.2 s`` and the
  exception propagates unchanged.

Both write to ``sys.stderr`` (looked up at call time, so redirection and test capture work)
and take ``enabled=False`` to print nothing at all. Setting the environment variable
``PARETUNE_PROGRESS=0`` disables both everywhere (for scripts that want silent stderr).

:func:`verbose` reports whether the user asked for third-party progress output
(``PARETUNE_VERBOSE=1``); paretune keeps bars from other libraries (for example the GGUF
de-quantisation bar of ``transformers``) quiet unless it is set.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from typing import Any, Iterable, Iterator, TextIO

from tqdm.std import tqdm as _std_tqdm

__all__ = ["PLAIN_INTERVAL_S", "bar", "phase", "plain_mode", "progress_enabled", "verbose"]

#: Seconds between two plain progress lines when stderr is not a terminal.
PLAIN_INTERVAL_S = 5.0


def progress_enabled() -> bool:
    """False when ``PARETUNE_PROGRESS`` is set to ``0``/``false``/``no``/``off``."""
    return os.environ.get("PARETUNE_PROGRESS", "1").strip().lower() not in {"0", "false", "no", "off"}


def verbose() -> bool:
    """True when ``PARETUNE_VERBOSE`` is ``1``/``true``/``yes``/``on``: show third-party bars
    and log messages that paretune otherwise keeps quiet."""
    return os.environ.get("PARETUNE_VERBOSE", "").strip().lower() in {"1", "true", "yes", "on"}


def plain_mode(stream: TextIO | None = None) -> bool:
    """True when ``stream`` (default: the current ``sys.stderr``) is not a terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return not (callable(isatty) and isatty())
    except (ValueError, OSError):  # closed or detached stream
        return True


def _format_seconds(seconds: float) -> str:
    return f"{seconds:.1f} s"


class _PlainBar(_std_tqdm):
    """A tqdm bar that prints whole lines instead of redrawing (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._plain_closed = False
        self._plain_started = False
        self._plain_last = float("-inf")
        kwargs["mininterval"] = PLAIN_INTERVAL_S
        kwargs["maxinterval"] = max(PLAIN_INTERVAL_S, kwargs.get("maxinterval", 10.0))
        super().__init__(*args, **kwargs)
        self._plain_started = True

    def plain_line(self) -> str:
        """The text of one plain progress line for the bar's current state."""
        elapsed = self._time() - self.start_t if hasattr(self, "start_t") else 0.0
        desc = self.desc.rstrip(": ") if self.desc else "progress"
        if self.total:
            percent = int(100 * self.n / self.total) if self.total else 0
            count = f"{self.n}/{self.total} ({percent}%)"
        else:
            count = f"{self.n} {self.unit}"
        return f"{desc}: {count} {_format_seconds(elapsed)}"

    def _emit(self) -> None:
        fp = self.fp
        fp.write(self.plain_line() + "\n")
        flush = getattr(fp, "flush", None)
        if callable(flush):
            flush()

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:  # noqa: ARG002
        # Called by tqdm on refresh: at start (skipped), every ``mininterval`` seconds, and on
        # close (the final line is written by ``close`` itself).
        if not self._plain_started or self._plain_closed:
            return True
        now = self._time()
        if now - self._plain_last < PLAIN_INTERVAL_S / 2:  # tqdm's monitor thread may refresh too
            return True
        self._plain_last = now
        self._emit()
        return True

    def close(self) -> None:
        if self.disable or self._plain_closed:
            return super().close()
        self._plain_closed = True
        if self._time() - self.start_t >= self.delay:
            self._emit()
        # tqdm's own close writes a newline or a carriage return; send those nowhere.
        self.fp = io.StringIO()
        return super().close()


def bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: float | None = None,
    desc: str,
    unit: str = "it",
    leave: bool = True,
    enabled: bool = True,
    delay: float = 0.0,
) -> _std_tqdm:
    """A progress bar over ``iterable`` (or a manual one: call ``.update(n)``, then ``.close()``).

    ``total`` defaults to ``len(iterable)`` when it has one. A redrawn bar on a terminal; plain
    lines (``desc: 40/100 (40%) 12.3 s``, at most one per ``PLAIN_INTERVAL_S`` seconds plus a
    final one) otherwise. ``enabled=False`` or ``PARETUNE_PROGRESS=0`` disables all output while
    the returned object still counts and iterates. ``delay`` (seconds): show nothing unless the
    work is still running after that long (a loop that is usually quick stays silent).
    """
    disable = not (enabled and progress_enabled())
    stream = sys.stderr
    if total is None and iterable is not None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    cls: type[_std_tqdm] = _PlainBar if plain_mode(stream) else _std_tqdm
    return cls(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=disable, file=stream,
               dynamic_ncols=True, delay=delay)


@contextlib.contextmanager
def phase(desc: str, enabled: bool = True, *, delay: float = 0.0) -> Iterator[None]:
    """Print ``desc ...`` now and ``desc: done in N s`` when the block ends (see module docstring).

    ``delay`` (seconds): print the start line only once the block has run that long (from a
    timer thread), and the end line only if the start line was printed, so a phase that is
    usually quick (a small model from a local folder) prints nothing."""
    if not (enabled and progress_enabled()):
        yield
        return
    import threading

    stream = sys.stderr
    shown = threading.Event()
    lock = threading.Lock()

    def announce() -> None:
        with lock:
            if not finished:
                print(f"{desc} ...", file=stream, flush=True)
                shown.set()

    finished = False
    timer: threading.Timer | None = None
    if delay > 0:
        timer = threading.Timer(delay, announce)
        timer.daemon = True
        timer.start()
    else:
        announce()
    start = time.perf_counter()
    outcome = "failed after"  # until the block returns; an exception propagates unchanged
    try:
        yield
        outcome = "done in"
    finally:
        with lock:
            finished = True
        if timer is not None:
            timer.cancel()
        if shown.is_set():
            print(f"{desc}: {outcome} {_format_seconds(time.perf_counter() - start)}", file=stream, flush=True)
