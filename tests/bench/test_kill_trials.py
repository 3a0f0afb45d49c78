"""benchmarks/kill_trials.py, with two small trials of each scenario (slow: forks, trains, benches)."""

import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_kill_trials_small():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        import kill_trials
    finally:
        sys.path.pop(0)
    assert kill_trials.main(["--trials", "2", "--mb", "4", "--steps", "4"]) == 0
