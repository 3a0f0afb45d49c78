"""paretune.bench.stats (against scipy.stats.t) and the report's intervals, ties and recommendation."""

from __future__ import annotations

import math
import statistics

import pytest
import scipy.stats

from paretune.bench.stats import Interval, mean_interval, overlap, t_quantile


@pytest.mark.parametrize("values", [[0.5, 0.6], [0.71, 0.69, 0.74], [1.0, 2.0, 4.0, 8.0, 16.0], [0.3] * 3 + [0.31]])
def test_interval_matches_scipy(values):
    iv = mean_interval(values)
    n = len(values)
    lo, hi = scipy.stats.t.interval(0.95, n - 1, loc=statistics.fmean(values), scale=scipy.stats.sem(values))
    assert iv.n == n and iv.mean == pytest.approx(statistics.fmean(values))
    assert iv.low == pytest.approx(lo) and iv.high == pytest.approx(hi)
    assert iv.half_width == pytest.approx(t_quantile(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n))


def test_t_quantile_and_other_levels():
    for df in (1, 2, 5, 30):
        assert t_quantile(0.975, df) == pytest.approx(scipy.stats.t.ppf(0.975, df))
    assert t_quantile(0.975, 2) == pytest.approx(4.302652729911275)
    lo, hi = scipy.stats.t.interval(0.9, 2, loc=2.0, scale=scipy.stats.sem([1.0, 2.0, 3.0]))
    iv = mean_interval([1.0, 2.0, 3.0], confidence=0.9)
    assert (iv.low, iv.high) == (pytest.approx(lo), pytest.approx(hi))
    with pytest.raises(ValueError):
        t_quantile(0.975, 0)


def test_one_value_has_no_interval_and_none_is_empty():
    iv = mean_interval([0.42])
    assert iv == Interval(0.42, None, 1, None) and iv.low is None and iv.text() == "0.4200"
    assert mean_interval([]).n == 0 and math.isnan(mean_interval([float("nan")]).mean)
    assert mean_interval([0.5, 0.7]).text() .startswith("0.6000 ± ")
    assert mean_interval([0.5, 0.5]).half_width == 0.0  # identical seeds: a zero-width interval


def test_overlap():
    a, b = mean_interval([0.50, 0.52, 0.54]), mean_interval([0.53, 0.55, 0.57])
    c = mean_interval([0.90, 0.91, 0.92])
    assert overlap(a, b) and overlap(b, a) and not overlap(a, c)
    assert not overlap(mean_interval([0.5]), mean_interval([0.5, 0.6]))  # one seed: unknown, not tied
    assert overlap(mean_interval([0.5]), mean_interval([0.5]))
    assert not overlap(mean_interval([]), a)


def _run(i, method, r, seed, q, trainable):
    return {"id": i, "key": f"k{i}", "status": "finished", "model": "m", "task": "t", "method": method,
            "budget": None, "seed": seed, "steps": 1, "lr": 1e-3, "batch_size": 1, "targets": None,
            "metric": "accuracy", "run_dir": None, "started_at": None, "finished_at": None, "error": None,
            "phase": "final", "data": None, "options": {"r": r} if r else {}, "environment": None,
            "metrics": {"accuracy": q, "trainable": trainable, "stored_bytes": 4 * trainable}}


def test_intervals_ties_and_recommendation():
    from paretune.bench.report import format_table, recommendation, render_html, summarize, ties_text

    runs, i = [], 0
    for method, r, qs, n in [("lora", 2, (0.70, 0.72, 0.74), 1000), ("dora", 2, (0.69, 0.71, 0.73), 1100),
                             ("vera", 0, (0.40, 0.41, 0.42), 900), ("lora", 8, (0.90, 0.91, 0.92), 4000)]:
        for seed, q in enumerate(qs):
            i += 1
            runs.append(_run(i, method, r, seed, q, n))
    s = summarize(runs)
    rows = {r.label: r for r in s.rows}
    lora2, dora2, vera, lora8 = rows["lora r=2"], rows["dora r=2"], rows["vera"], rows["lora r=8"]
    assert lora2.interval.half_width == pytest.approx(scipy.stats.t.ppf(0.975, 2) * 0.02 / math.sqrt(3))
    assert lora2.pareto_params and not dora2.pareto_params and vera.pareto_params and lora8.pareto_params
    assert lora2.tied == [dora2.number] and not vera.tied and not lora8.tied  # vera is far below
    assert ties_text(s) == ["lora r=2 and dora r=2 are within noise (95% intervals overlap) at about 1k trainable "
                            "parameters"]
    rec = recommendation(s)
    assert rec[1] == (f"At about 1k trainable parameters, pick lora r=2 (accuracy 0.7200 ± "
                      f"{lora2.interval.half_width:.4f}). dora r=2 is within noise.")
    assert rec[2].startswith("At about 4k trainable parameters, pick lora r=8") and len(rec) == 3
    text = format_table(s)
    assert "accuracy (95% CI)" in text and "#2" in text and "within noise: lora r=2 and dora r=2" in text
    page = render_html(s, None)
    assert page.index("<h2>Recommendation</h2>") > page.index("<h2>Runs</h2>")  # the page ends with it
    # one seed: no interval, no tie, and the advice to run more seeds
    s1 = summarize([r for r in runs if r["seed"] == 0])
    assert all(r.interval.half_width is None and not r.tied for r in s1.rows)
    rec1 = recommendation(s1)
    assert "interval unknown with 1 seed" in rec1[0] and "--seeds 0,1,2" in rec1[-1]
