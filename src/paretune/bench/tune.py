"""``paretune bench --tune lr``: choose each configuration's learning rate on a validation split.

For every configuration of the plan (method + options + targets: one method at one budget, or a
baseline), a small log-spaced grid around the rate it would run at (its default, or --lr):
``rate x {1/4, 1/2, 1, 2, 4}`` (``DEFAULT_FACTORS``; ``--tune-grid 0.5,1,2`` overrides the
factors). Each grid point is one *search run*: trained on the training split minus the validation
split, scored on the validation split (never the test split; :mod:`paretune.bench.data`), on the
first seed of ``--seeds`` only by default (``--tune-seeds all`` searches on every seed). The rate
with the best mean validation score wins (ties: the lower mean validation loss, then the factor
closest to 1, then the smaller rate); the final runs (every seed) then train at that rate on the
whole training split and report test results. A configuration whose search runs all failed keeps
its default rate (with a note). On a classification task the head's own rate (``--head-lr``) is
not searched: it stays at the head baseline's rate, so the search moves the method's rate only;
the ``head`` baseline's own rate is searched like a method's.

Search runs live in the same runs.sqlite with ``phase = 'search'`` and resume like any other run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from typing import Any, Iterable, Sequence

from ..errors import ParetuneError

DEFAULT_FACTORS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
TUNABLE = ("lr",)


def parse_tune(text: str | None) -> str | None:
    """``--tune``: ``lr`` (the only searchable setting today) or None."""
    if text is None:
        return None
    what = text.strip().lower()
    if what in ("", "none", "no"):
        return None
    if what not in TUNABLE:
        raise ParetuneError(f"--tune {text!r} is not supported; give --tune lr (the learning rate).")
    return what


def parse_grid(text: str | None) -> tuple[float, ...]:
    """``--tune-grid 0.5,1,2``: multipliers of each configuration's default rate (sorted, unique)."""
    if text is None:
        return DEFAULT_FACTORS
    try:
        factors = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ParetuneError(f"--tune-grid {text!r} is invalid; give multipliers of the default rate separated by "
                            "commas, e.g. --tune-grid 0.25,0.5,1,2,4.") from None
    if not factors or any(not (f > 0 and math.isfinite(f)) for f in factors):
        raise ParetuneError(f"--tune-grid {text!r} is invalid; give positive multipliers, e.g. 0.5,1,2.")
    return tuple(sorted(set(factors)))


def config_key(method: str, options: dict, targets: Sequence[str] | None) -> str:
    """One configuration (what one row of the report is): method + options + targets."""
    return json.dumps([method, options, list(targets) if targets is not None else None], sort_keys=True)


def search_runs(final_runs: Sequence, splits, factors: Sequence[float] = DEFAULT_FACTORS,
                seeds: Sequence[int] | None = None) -> list:
    """The search runs of a plan's final runs (:class:`paretune.bench.sweep.RunSpec`): every
    configuration at every factor of its rate, on ``seeds`` (default: the plan's first seed),
    trained on ``splits.search_train`` and scored on ``splits.val``."""
    if not final_runs:
        return []
    all_seeds = list(dict.fromkeys(r.seed for r in final_runs))
    seeds = list(seeds) if seeds is not None else all_seeds[:1]
    out, seen = [], set()
    for r in final_runs:
        if r.seed != all_seeds[0]:
            continue  # one configuration, its first seed: the template
        for seed in seeds:
            for f in factors:
                spec = dataclasses.replace(r, seed=int(seed), lr=float(r.lr) * float(f), data=str(splits.search_train),
                                           eval_data=str(splits.val), data_id=splits.data_id, phase="search")
                if spec.key not in seen:
                    seen.add(spec.key)
                    out.append(spec)
    return out


@dataclasses.dataclass
class Choice:
    method: str
    options: dict
    budget: int | None
    default_lr: float
    lr: float  # the chosen rate (the default when no search run finished)
    scores: dict[float, float]  # rate -> mean validation score (NaN: no finished run)
    losses: dict[float, float]  # rate -> mean validation loss (NaN when unknown)
    seeds: list[int]
    note: str = ""


def _fmean(xs: Iterable[float | None]) -> float:
    vals = [float(x) for x in xs if x is not None and not math.isnan(float(x))]
    return statistics.fmean(vals) if vals else math.nan


def choose(search_rows: Sequence[dict[str, Any]], default_lrs: dict[str, float] | None = None) -> dict[str, Choice]:
    """The chosen rate per configuration key from the store's search runs (``Store.runs(phase=
    "search")`` rows; failed and unfinished ones count as missing). ``default_lrs``: config key ->
    the rate the grid was centred on (for the tie-break; default: the grid's geometric middle)."""
    groups: dict[str, list[dict]] = {}
    for r in search_rows:
        groups.setdefault(config_key(r["method"], r["options"], r["targets"]), []).append(r)
    out: dict[str, Choice] = {}
    for key, rows in groups.items():
        by_lr: dict[float, list[dict]] = {}
        for r in rows:
            by_lr.setdefault(float(r["lr"]), []).append(r)
        rates = sorted(by_lr)
        centre = (default_lrs or {}).get(key) or math.exp(statistics.fmean(math.log(x) for x in rates))
        scores, losses = {}, {}
        for lr, rs in by_lr.items():
            done = [r for r in rs if r["status"] == "finished"]
            scores[lr] = _fmean(r["metrics"].get(r["metric"]) if r["metric"] else None for r in done)
            losses[lr] = _fmean(r["metrics"].get("eval_loss") for r in done)
        ok = [lr for lr in rates if not math.isnan(scores[lr])]
        first = rows[0]
        seeds = sorted({r["seed"] for r in rows})
        if not ok:
            out[key] = Choice(first["method"], first["options"], first["budget"], centre, centre, scores, losses, seeds,
                              "no search run finished; the default rate is kept")
            continue

        def rank(lr: float) -> tuple:
            loss = losses[lr]
            return (-scores[lr], loss if not math.isnan(loss) else math.inf, abs(math.log(lr / centre)), lr)

        best = min(ok, key=rank)
        out[key] = Choice(first["method"], first["options"], first["budget"], centre, best, scores, losses, seeds)
    return out


def apply(final_runs: Sequence, choices: dict[str, Choice]) -> list:
    """The final runs at their configuration's chosen rate (unchanged when there is no choice)."""
    out = []
    for r in final_runs:
        c = choices.get(config_key(r.method, r.options, r.targets))
        out.append(dataclasses.replace(r, lr=c.lr) if c is not None else r)
    return out


def default_lrs(final_runs: Sequence) -> dict[str, float]:
    return {config_key(r.method, r.options, r.targets): float(r.lr) for r in final_runs}


def describe(choices: dict[str, Choice]) -> list[str]:
    """One line per configuration: ``lora r=2: lr 4e-3 (x2) val 0.61 [5e-4 0.52, ...]``."""
    lines = []
    for c in choices.values():
        opts = " ".join(f"{k}={v}" for k, v in sorted(c.options.items()))
        grid = ", ".join(f"{lr:.3g}: {'-' if math.isnan(s) else f'{s:.4f}'}" for lr, s in sorted(c.scores.items()))
        head = f"{c.method}{' ' + opts if opts else ''}"
        if c.note:
            lines.append(f"{head}: lr {c.lr:.3g} ({c.note}) [{grid}]")
        else:
            lines.append(f"{head}: lr {c.lr:.3g} (x{c.lr / c.default_lr:.3g} the default), validation "
                         f"{c.scores[c.lr]:.4f} [{grid}]")
    return lines
