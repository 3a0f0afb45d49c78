"""Plain-line progress when stderr is not a terminal, and the phase context manager."""

from __future__ import annotations

import io
import re

import pytest

from paretune import progress


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_plain_bar_prints_whole_lines_and_a_final_line(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = _Stream(tty=False)
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.delenv("PARETUNE_PROGRESS", raising=False)
    items = list(progress.bar(range(7), desc="layers", unit="layer", leave=False))
    assert items == list(range(7))
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # quick loop: no start line, no intermediate lines, exactly one final line
    assert len(lines) == 1
    assert re.fullmatch(r"layers: 7/7 \(100%\) \d+\.\d s", lines[0])


def test_plain_bar_throttles_intermediate_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = _Stream(tty=False)
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.delenv("PARETUNE_PROGRESS", raising=False)
    clock = [0.0]
    b = progress.bar(total=100, desc="train")
    b._time = lambda: clock[0]  # drive tqdm's clock by hand
    b.start_t = b.last_print_t = 0.0
    for _ in range(100):
        clock[0] += 0.5  # 50 s in all: intermediate lines only every PLAIN_INTERVAL_S
        b.update(1)
    b.close()
    lines = stream.getvalue().splitlines()
    assert lines[-1] == "train: 100/100 (100%) 50.0 s"
    # 50 s with a 5 s interval: roughly ten intermediate lines, never one per update
    assert 5 <= len(lines) - 1 <= 11
    assert all(re.fullmatch(r"train: \d+/100 \(\d+%\) \d+\.\d s", line) for line in lines)


def test_manual_bar_without_total_and_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = _Stream(tty=False)
    monkeypatch.setattr("sys.stderr", stream)
    b = progress.bar(desc="read", unit="file")
    b.update(3)
    b.close()
    assert re.fullmatch(r"read: 3 file \d+\.\d s\n", stream.getvalue())
    stream2 = _Stream(tty=False)
    monkeypatch.setattr("sys.stderr", stream2)
    assert sum(progress.bar(range(4), desc="x", enabled=False)) == 6
    monkeypatch.setenv("PARETUNE_PROGRESS", "0")
    assert sum(progress.bar(range(4), desc="y")) == 6
    with progress.phase("quiet"):
        pass
    assert stream2.getvalue() == ""


def test_tty_bar_is_a_redrawn_tqdm_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = _Stream(tty=True)
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.delenv("PARETUNE_PROGRESS", raising=False)
    assert not progress.plain_mode()
    list(progress.bar(range(3), desc="tty"))
    assert "\r" in stream.getvalue()


def test_phase_prints_start_and_done_and_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = _Stream(tty=False)
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.delenv("PARETUNE_PROGRESS", raising=False)
    with progress.phase("loading model m"):
        pass
    with pytest.raises(KeyError):
        with progress.phase("broken"):
            raise KeyError("x")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "loading model m ..."
    assert re.fullmatch(r"loading model m: done in \d+\.\d s", lines[1])
    assert lines[2] == "broken ..."
    assert re.fullmatch(r"broken: failed after \d+\.\d s", lines[3])


def test_verbose_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PARETUNE_VERBOSE", raising=False)
    assert not progress.verbose()
    monkeypatch.setenv("PARETUNE_VERBOSE", "1")
    assert progress.verbose()


def test_delay_keeps_quick_work_silent_and_announces_slow_work(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    stream = _Stream(tty=False)
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.delenv("PARETUNE_PROGRESS", raising=False)
    assert sum(progress.bar(range(5), desc="quick", delay=60.0)) == 10
    with progress.phase("quick phase", delay=60.0):
        pass
    assert stream.getvalue() == ""
    with progress.phase("slow phase", delay=0.05):
        time.sleep(0.3)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "slow phase ..." and lines[1].startswith("slow phase: done in ")
