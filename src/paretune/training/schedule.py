"""Learning-rate schedules: linear warm-up, then linear decay, cosine decay or constant."""

from __future__ import annotations

import math

from ..errors import ParetuneError

SCHEDULES = ("linear", "cosine", "constant")


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based) of ``total``."""
    if kind not in SCHEDULES:
        raise ParetuneError(f"unknown lr schedule {kind!r}; choose one of {', '.join(SCHEDULES)}.")
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
