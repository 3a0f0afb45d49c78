"""Seed statistics of the bench: mean and a 95% Student-t confidence interval per configuration,
and "within noise" (two intervals overlap).

For ``n`` values with mean ``m`` and sample standard deviation ``s`` (``n - 1`` in the
denominator), the interval is ``m ± t_{1-α/2, n-1} · s / √n`` (α = 0.05 by default). With one
value there is no interval (``half_width`` is None: unknown, not zero): a single seed says
nothing about seed-to-seed noise.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Iterable


@dataclasses.dataclass(frozen=True)
class Interval:
    mean: float  # NaN for no values
    half_width: float | None  # None: unknown (fewer than 2 values)
    n: int
    std: float | None  # sample standard deviation (None for n < 2)

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    def text(self, digits: int = 4) -> str:
        """``0.8123 ± 0.0210`` (or ``0.8123`` for one value, ``-`` for none)."""
        if self.n == 0:
            return "-"
        if self.half_width is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (scipy.stats.t.ppf)."""
    if df < 1:
        raise ValueError(f"df={df}: Student's t needs at least 1 degree of freedom")
    from scipy.stats import t

    return float(t.ppf(p, df))


def mean_interval(values: Iterable[float], confidence: float = 0.95) -> Interval:
    """Mean and ``confidence`` Student-t interval of ``values`` (NaN / None values are dropped)."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(xs)
    if n == 0:
        return Interval(math.nan, None, 0, None)
    m = statistics.fmean(xs)
    if n == 1:
        return Interval(m, None, 1, None)
    s = statistics.stdev(xs)
    h = t_quantile(0.5 + confidence / 2, n - 1) * s / math.sqrt(n)
    return Interval(m, h, n, s)


def overlap(a: Interval, b: Interval) -> bool:
    """Whether two configurations are "within noise": both intervals known and overlapping
    (touching counts). With an unknown interval (one seed) nothing is within noise, except two
    equal means."""
    if a.n == 0 or b.n == 0:
        return False
    if a.half_width is None or b.half_width is None:
        return a.mean == b.mean
    return a.low <= b.high and b.low <= a.high
