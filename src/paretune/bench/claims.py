"""The seed papers' headline claims, and whether our measurements reproduce them.

Every :class:`Claim` names its paper, states the claim as the paper does (numbers and setting), says
which small-scale test we run instead, and carries a function that turns the evidence into a
:class:`Verdict`. ``benchmarks/reproductions.py`` evaluates them all and writes
``docs/reproductions.md``.

Evidence
--------
* **Bench stores** (``paretune bench`` and ``paretune intrinsic-dim`` folders, their
  ``runs.sqlite``): finished, final runs. :func:`load_bench` copies each file to a temporary folder
  before opening it with :class:`~paretune.bench.store.Store` (which migrates old files in place),
  so reading never changes a bench's file. A run key seen in two folders counts once: the first
  folder given wins. Runs are compared only within one *setting*: same model, task, data, steps,
  batch size and number of evaluated examples. A *configuration* is a method with its options,
  learning rate and targets; its seeds give the 95% Student-t interval
  (:func:`paretune.bench.stats.mean_interval`).
* **Numbers of the other scripts** (compression, merging, lottery tickets): a claim measured by
  ``benchmarks/compress_smollm2.py``, ``compress_recovery_smollm2.py``, ``lottery_digits.py`` or
  ``merge_adapters_multitask.py`` reads a small dict of numbers. Rule, in order: the entry of the
  claim's id in the numbers JSON file (``benchmarks/results/reproduction-numbers.json``, filled by
  hand from those scripts' output: ``{"claim-id": {"name": value or [one value per seed]}}``);
  else the figures copied by hand from ``docs/results.md`` (:data:`DOCUMENTED`, each with its
  section; only figures that are in that file); else "not measured yet", with the command.

Verdict rules (:func:`compare`): a claim is a relation "A is better than T", where T is the
reference (another configuration, or the reference shifted by the claim's tolerance: "within a
point of full fine-tuning" is A > full − 0.01).

* both sides with two or more seeds: **reproduced** when A's interval lies above T's,
  **not reproduced** when it lies below, **inconclusive (within noise)** when they overlap;
* a side with one seed (or a single deterministic run): never reproduced or not: **one seed:
  direction holds / does not hold; run --seeds 0,1,2**;
* the runs a claim needs are absent: **not measured yet**, with the command that makes them;
* the claim cannot be tested here (LLM scale, GPU-only, a dataset we do not have): **not
  testable here**, with the reason.

When a claim is measured in several settings, the settings whose both sides have seeds decide
(the one with the most seeds); with one seed everywhere, the verdict says in which settings the
direction holds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .stats import Interval, mean_interval, overlap

# -- verdict categories ----------------------------------------------------------------------
REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
WITHIN_NOISE = "inconclusive (within noise)"
HOLDS_ONE = "one seed: direction holds"
FAILS_ONE = "one seed: direction does not hold"
MIXED_ONE = "one seed: direction holds in some settings only"
NOT_MEASURED = "not measured yet"
NOT_TESTABLE = "not testable here"
CATEGORIES = (REPRODUCED, NOT_REPRODUCED, WITHIN_NOISE, HOLDS_ONE, FAILS_ONE, MIXED_ONE, NOT_MEASURED, NOT_TESTABLE)
SEEDS_HINT = "run --seeds 0,1,2"

FAMILIES = ("Low-rank adapters", "Adapters, prompts and scaling vectors", "Sparse, spectral and subspace methods",
            "Routed and multi-task methods", "Compression", "Merging", "Measurement")

NUMBERS_FILE = "benchmarks/results/reproduction-numbers.json"


@dataclasses.dataclass(frozen=True)
class Verdict:
    category: str  # one of CATEGORIES
    text: str  # the verdict as the document prints it
    figure: str = ""  # our numbers


@dataclasses.dataclass(frozen=True)
class Claim:
    id: str
    family: str
    methods: tuple[str, ...]  # the registered methods (``paretune methods``) the claim is about; () for others
    paper: str  # authors, "title", year
    claim: str  # as the paper states it, with its numbers and setting
    test: str  # our small-scale test
    command: str  # what produces the evidence
    evaluate: Callable[["Evidence"], Verdict] | None = None
    untestable: str | None = None  # why the claim cannot be tested here

    def verdict(self, evidence: "Evidence") -> Verdict:
        if self.evaluate is None:
            return Verdict(NOT_TESTABLE, f"{NOT_TESTABLE}: {self.untestable}")
        return self.evaluate(evidence)


# -- the evidence ----------------------------------------------------------------------------
@dataclasses.dataclass
class Config:
    """One configuration of one setting, over its seeds."""

    setting: tuple
    method: str
    options: dict[str, Any]
    lr: float
    budgets: set
    values: list[float]
    trainable: list[float]
    seeds: list[int]

    @property
    def interval(self) -> Interval:
        return mean_interval(self.values)

    @property
    def params(self) -> float:
        return sum(self.trainable) / len(self.trainable) if self.trainable else math.nan

    @property
    def label(self) -> str:
        opts = " ".join(f"{k}={v}" for k, v in sorted(self.options.items())
                        if k not in ("default_task", "projection", "said", "seed"))
        return f"{self.method}{' ' + opts if opts else ''}"


def setting_of(run: dict) -> tuple:
    m = run.get("metrics") or {}
    ev = m.get("eval_examples")
    return (run["model"], run["task"], run.get("data"), run["steps"], run["batch_size"],
            int(ev) if ev is not None else None)


def setting_label(setting: tuple) -> str:
    model, task, _data, steps, batch, ev = setting
    return f"{model} {task} ({steps}×{batch}{f', {ev:,} eval' if ev else ''})"


class Evidence:
    """The finished final runs of the bench stores, and the numbers of the other scripts."""

    def __init__(self, runs: Iterable[dict] = (), numbers: dict[str, dict] | None = None,
                 documented: dict[str, dict] | None = None):
        seen: set[str] = set()
        self.runs: list[dict] = []
        for r in runs:
            if r.get("status") != "finished" or r.get("phase", "final") != "final":
                continue
            if r.get("key") in seen:
                continue
            seen.add(r.get("key"))
            self.runs.append(r)
        self.numbers = numbers or {}
        self.documented = DOCUMENTED if documented is None else documented
        self._configs: dict[tuple, dict[tuple, Config]] = {}
        for r in self.runs:
            metric = r.get("metric")
            value = (r.get("metrics") or {}).get(metric) if metric else None
            if value is None:
                continue
            s = setting_of(r)
            key = (r["method"], json.dumps(r.get("options") or {}, sort_keys=True), float(r["lr"]),
                   json.dumps(r.get("targets")))
            c = self._configs.setdefault(s, {}).get(key)
            if c is None:
                c = Config(s, r["method"], dict(r.get("options") or {}), float(r["lr"]), set(), [], [], [])
                self._configs[s][key] = c
            c.values.append(float(value))
            c.seeds.append(int(r["seed"]))
            t = (r.get("metrics") or {}).get("trainable")
            if t is not None:
                c.trainable.append(float(t))
            if r.get("budget") is not None:
                c.budgets.add(int(r["budget"]))

    @property
    def settings(self) -> list[tuple]:
        return list(self._configs)

    def configs(self, setting: tuple, method: str) -> list[Config]:
        return [c for c in self._configs.get(setting, {}).values() if c.method == method]

    def external(self, claim_id: str) -> tuple[dict | None, str]:
        """The numbers of claim ``claim_id`` and where they come from (None: not measured)."""
        if claim_id in self.numbers:
            return self.numbers[claim_id], NUMBERS_FILE
        if claim_id in self.documented:
            doc = dict(self.documented[claim_id])
            return doc, f"docs/results.md, {doc.pop('_section')}"
        return None, ""


def load_bench(dirs: Sequence[str | Path]) -> tuple[list[dict], list[dict]]:
    """The runs of every ``DIR/runs.sqlite`` (each row with ``source``: its folder), and one summary
    per folder (``dir``, ``runs``, ``rows``: the runs for :func:`reconstructed_command`). The files
    are copied before they are opened, so an old file is migrated in the copy, never in place."""
    from .store import DB_NAME, Store

    out: list[dict] = []
    summaries: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="paretune-repro-") as tmp:
        for i, d in enumerate(dirs):
            src = Path(d)
            src = src / DB_NAME if src.is_dir() else src
            if not src.is_file():
                summaries.append({"dir": str(d), "runs": 0, "rows": [], "missing": True})
                continue
            dst = Path(tmp) / f"{i}" / DB_NAME
            dst.parent.mkdir()
            shutil.copy2(src, dst)
            for suffix in ("-wal", "-shm"):
                side = src.with_name(src.name + suffix)
                if side.is_file():
                    shutil.copy2(side, dst.with_name(dst.name + suffix))
            with Store(dst) as store:
                rows = store.runs()
            for r in rows:
                r["source"] = str(d)
            out.extend(rows)
            summaries.append({"dir": str(d), "runs": len(rows), "rows": rows, "missing": False})
    return out, summaries


def reconstructed_command(rows: Sequence[dict]) -> list[str]:
    """Commands equivalent to the runs of one store (one per model/task/steps/batch group): the
    store does not record the command line, so it is rebuilt from the finished runs."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("status") == "finished":
            groups.setdefault((r["model"], r["task"], r["steps"], r["batch_size"]), []).append(r)
    cmds = []
    for (model, task, steps, batch), rs in groups.items():
        methods = list(dict.fromkeys(r["method"] for r in rs))
        seeds = ",".join(str(s) for s in sorted({r["seed"] for r in rs}))
        ev = {int(r["metrics"]["eval_examples"]) for r in rs if (r.get("metrics") or {}).get("eval_examples")}
        evtext = f"  # scored on {', '.join(f'{e:,}' for e in sorted(ev))} held-out examples" if ev else ""
        if set(methods) <= {"subspace", "full"} and any("projection" in (r.get("options") or {}) for r in rs):
            dims = ",".join(str(d) for d in sorted({int(r["options"]["dim"]) for r in rs if r["method"] == "subspace"}))
            cmds.append(f"uv run paretune intrinsic-dim --model {model} --task {task} --dims {dims} "
                        f"--steps {steps} --batch-size {batch} --seeds {seeds}{evtext}")
            continue
        baselines = [m for m in ("head", "full") if m in methods]
        meths = [m for m in methods if m not in ("head", "full")]
        budgets = sorted({r["budget"] for r in rs if r.get("budget") is not None})
        parts = [f"uv run paretune bench --model {model} --task {task}"]
        if meths:
            parts.append(f"--methods {','.join(meths)}")
        parts += [f"--budget {b}" for b in budgets]
        parts.append(f"--baselines {','.join(baselines) if baselines else 'none'}")
        parts.append(f"--seeds {seeds} --steps {steps} --batch-size {batch}")
        cmds.append(" ".join(parts) + evtext)
    return cmds


# -- the comparison rule ---------------------------------------------------------------------
def shifted(b: Interval, ratio: float = 1.0, delta: float = 0.0) -> Interval:
    """``b`` scaled by ``ratio`` and moved by ``delta`` (the claim's reference)."""
    if b.n == 0:
        return b
    hw = None if b.half_width is None else b.half_width * abs(ratio)
    std = None if b.std is None else b.std * abs(ratio)
    return Interval(b.mean * ratio + delta, hw, b.n, std)


def negated(a: Interval) -> Interval:
    return Interval(-a.mean, a.half_width, a.n, a.std)


def compare(a: Interval, target: Interval, *, strict: bool = True, lower_is_better: bool = False,
            seeds_hint: str = SEEDS_HINT) -> tuple[str, str]:
    """Whether "``a`` is better than ``target``" holds: (category, verdict text). ``strict``: the
    claim is a strict improvement (a tie in a single run does not hold); otherwise "at least"."""
    if a.n == 0 or target.n == 0:
        return NOT_MEASURED, NOT_MEASURED
    if lower_is_better:
        a, target = negated(a), negated(target)
    if a.half_width is None or target.half_width is None:
        holds = a.mean > target.mean if strict else a.mean >= target.mean
        hint = f"; {seeds_hint}" if seeds_hint else ""
        return (HOLDS_ONE, f"{HOLDS_ONE}{hint}") if holds else (FAILS_ONE, f"{FAILS_ONE}{hint}")
    if overlap(a, target):
        return WITHIN_NOISE, WITHIN_NOISE
    return (REPRODUCED, REPRODUCED) if a.mean > target.mean else (NOT_REPRODUCED, NOT_REPRODUCED)


def combine(parts: list[tuple[str, str, str, int]]) -> Verdict:
    """One verdict from per-setting ones: (category, text, figure, seeds)."""
    if not parts:
        return Verdict(NOT_MEASURED, NOT_MEASURED)
    figure = "; ".join(p[2] for p in parts)
    seeded = [p for p in parts if p[0] in (REPRODUCED, NOT_REPRODUCED, WITHIN_NOISE)]
    if seeded:
        best = max(seeded, key=lambda p: p[3])
        return Verdict(best[0], best[1], figure)
    holds = [p for p in parts if p[0] == HOLDS_ONE]
    if len(holds) == len(parts):
        return Verdict(HOLDS_ONE, f"{HOLDS_ONE}; {SEEDS_HINT}", figure)
    if not holds:
        return Verdict(FAILS_ONE, f"{FAILS_ONE}; {SEEDS_HINT}", figure)
    where = ", ".join(p[2].split(":")[0] for p in holds)
    return Verdict(MIXED_ONE, f"one seed: direction holds on {where} only; {SEEDS_HINT}", figure)


def fmt(x: float) -> str:
    if math.isnan(x):
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.2f}"
    return f"{x:.4f}"


def itext(iv: Interval) -> str:
    seeds = f"{iv.n} seed{'s' if iv.n != 1 else ''}"
    return f"{iv.text()} ({seeds})" if iv.half_width is not None else f"{fmt(iv.mean)} ({seeds})"


def bench_command(methods: Sequence[str], baselines: Sequence[str] = (), task: str | None = None) -> str:
    where = f"--task {task}" if task else "--quick"
    base = ",".join(baselines) if baselines else "none"
    return (f"uv run paretune bench {where} --methods {','.join(methods)} --baselines {base} "
            f"--seeds 0,1,2 --out DIR")


# -- bench claims ----------------------------------------------------------------------------
def _pairs(ev: Evidence, setting: tuple, a: str, b: str, pairing: str) -> list[tuple[Config, Config]]:
    cas, cbs = ev.configs(setting, a), ev.configs(setting, b)
    out = []
    for ca in cas:
        if pairing == "budget" and ca.budgets:
            same = [cb for cb in cbs if cb.budgets & ca.budgets]
            if same:
                out += [(ca, cb) for cb in same]
                continue
        near = sorted(cbs, key=lambda cb: abs(math.log(max(cb.params, 1) / max(ca.params, 1))))
        if near and (pairing == "any" or 0.5 <= near[0].params / max(ca.params, 1) <= 2):
            out.append((ca, near[0]))
    return out


def vs(a: str, b: str, *, ratio: float = 1.0, delta: float = 0.0, strict: bool = True, pairing: str = "budget",
       max_param_ratio: float | None = None, exclude_models: Sequence[str] = ()) -> Callable[[Evidence], Verdict]:
    """Claim "method ``a`` is better than ``ratio`` × ``b`` + ``delta``" on every setting holding both.
    ``pairing``: ``budget`` (the same budget, or trainable counts within a factor 2), ``any`` (``b``'s
    configuration of the closest trainable count, e.g. a baseline). ``max_param_ratio``: the claim
    also says ``a`` trains at most that share of ``b``'s parameters (reported, checked)."""

    def evaluate(ev: Evidence) -> Verdict:
        parts = []
        for s in ev.settings:
            if s[0] in exclude_models:
                continue
            pairs = _pairs(ev, s, a, b, pairing)
            if not pairs:
                continue
            ca, cb = max(pairs, key=lambda p: (min(p[0].interval.n, p[1].interval.n), -p[0].params))
            ia, ib = ca.interval, cb.interval
            target = shifted(ib, ratio, delta)
            cat, text = compare(ia, target, strict=strict)
            ref = "" if (ratio, delta) == (1.0, 0.0) else f" (target {fmt(target.mean)})"
            share = ca.params / cb.params if cb.params else math.nan
            extra = ""
            if max_param_ratio is not None:
                extra = f", {share:.2%} of its parameters"
                if share > max_param_ratio:
                    text += f" (but with {share:.2%} of the parameters, above the claim's {max_param_ratio:.2%})"
            fig = (f"{setting_label(s)}: {ca.label} {itext(ia)} vs {cb.label} {itext(ib)}{ref}; "
                   f"{fmt(ca.params)} vs {fmt(cb.params)} trainable{extra}")
            parts.append((cat, text, fig, min(ia.n, ib.n)))
        if not parts:
            return Verdict(NOT_MEASURED, f"{NOT_MEASURED}: {bench_command(_cmd_methods(a, b), _cmd_base(a, b))}")
        return combine(parts)

    return evaluate


def _cmd_methods(a: str, b: str) -> list[str]:
    return [m for m in (a, b) if m not in ("head", "full")]


def _cmd_base(a: str, b: str) -> list[str]:
    return [m for m in (a, b) if m in ("head", "full")]


def d90(*, max_fraction: float | None = None, max_d: int | None = None, exclude_models: Sequence[str] = (),
        only_models: Sequence[str] = ()) -> Callable[[Evidence], Verdict]:
    """Intrinsic dimension: d90 is the smallest measured ``subspace`` dim whose mean metric reaches
    90% of full fine-tuning's. The claim holds when d90 ≤ ``max_d`` or d90 ≤ ``max_fraction`` of the
    full run's trainable count. With seeds on both sides, "beyond noise" means the d90 run's interval
    lies above 90% of full's interval, or (failure) every admissible d's interval lies below it."""

    def evaluate(ev: Evidence) -> Verdict:
        parts = []
        for s in ev.settings:
            if s[0] in exclude_models or (only_models and s[0] not in only_models):
                continue
            fulls = ev.configs(s, "full")
            subs = [c for c in ev.configs(s, "subspace") if "dim" in c.options]
            if not fulls or not subs:
                continue
            full = max(fulls, key=lambda c: c.interval.n)
            fi = full.interval
            limit = max_d if max_d is not None else max_fraction * full.params
            target = shifted(fi, 0.9)
            subs.sort(key=lambda c: int(c.options["dim"]))
            reach = [c for c in subs if c.interval.mean >= target.mean]
            d = int(reach[0].options["dim"]) if reach else None
            curve = ", ".join(f"d={int(c.options['dim']):,}: {fmt(c.interval.mean)}" for c in subs)
            d90_text = f"{d:,}" if d else f"above {int(subs[-1].options['dim']):,}"
            lim = f"d ≤ {limit:,.0f}" + (f" ({max_fraction:.0%} of {full.params:,.0f})" if max_d is None else "")
            fig = (f"{setting_label(s)}: full {itext(fi)}, 90% = {fmt(target.mean)}; "
                   f"d90 = {d90_text} (claim: {lim}); {curve}")
            n = min([fi.n] + [c.interval.n for c in subs])
            admissible = [c for c in subs if int(c.options["dim"]) <= limit]
            if n < 2:
                holds = d is not None and d <= limit
                parts.append((HOLDS_ONE if holds else FAILS_ONE, "", fig, n))
                continue
            if d is not None and d <= limit and not overlap(reach[0].interval, target) \
                    and reach[0].interval.mean > target.mean:
                parts.append((REPRODUCED, REPRODUCED, fig, n))
            elif admissible and all(c.interval.high < target.low for c in admissible):
                parts.append((NOT_REPRODUCED, NOT_REPRODUCED, fig, n))
            else:
                parts.append((WITHIN_NOISE, WITHIN_NOISE, fig, n))
        if not parts:
            return Verdict(NOT_MEASURED, f"{NOT_MEASURED}: uv run paretune intrinsic-dim --task digits "
                                         "--dims 10,25,50,100,200,300,400,500,750,1000,2000 --seeds 0,1,2 --out DIR")
        return combine(parts)

    return evaluate


# -- claims measured by other scripts ----------------------------------------------------------
def _interval(v: Any) -> Interval:
    if isinstance(v, (list, tuple)):
        return mean_interval(v)
    return mean_interval([v])


def _vtext(v: Any, iv: Interval, seeds: int | None, unit: str) -> str:
    if isinstance(v, (list, tuple)):
        body = iv.text() if iv.half_width is not None else fmt(iv.mean)
        return f"{body}{unit} ({iv.n} seed{'s' if iv.n != 1 else ''})"
    if seeds:
        return f"{fmt(iv.mean)}{unit} (mean of {seeds} seeds)"
    return f"{fmt(iv.mean)}{unit}"


def external(claim_id: str, a: str, refs: Sequence[str], *, lower_is_better: bool = False, ratio: float = 1.0,
             delta: float = 0.0, strict: bool = True, unit: str = "", command: str = "",
             single: str = "one run", hint: str = "") -> Callable[[Evidence], Verdict]:
    """Claim "number ``a`` is better than the best of ``refs``" (scaled by ``ratio``, moved by
    ``delta``) over the claim's numbers (:meth:`Evidence.external`). A value is a number (one run,
    or, with ``_seeds: n`` among the numbers, the mean of n seeds whose values are not given) or a
    list (one value per seed: intervals). ``single`` names a verdict without intervals ("one run"),
    ``hint`` says how to get intervals."""

    def evaluate(ev: Evidence) -> Verdict:
        nums, source = ev.external(claim_id)
        if nums is None or a not in nums or not any(r in nums for r in refs):
            return Verdict(NOT_MEASURED, f"{NOT_MEASURED}: {command}" if command else NOT_MEASURED)
        nums = dict(nums)
        seeds = nums.pop("_seeds", None)
        ia = _interval(nums[a])
        present = [r for r in refs if r in nums]
        ivs = {r: _interval(nums[r]) for r in present}
        best = (min if lower_is_better else max)(present, key=lambda r: ivs[r].mean)
        target = shifted(ivs[best], ratio, delta)
        cat, text = compare(ia, target, strict=strict, lower_is_better=lower_is_better, seeds_hint=hint)
        if cat in (HOLDS_ONE, FAILS_ONE):
            text = text.replace("one seed", f"{seeds} seeds, means only" if seeds else single, 1)
        ref = "" if (ratio, delta) == (1.0, 0.0) else f" (target {fmt(target.mean)}{unit})"
        others = ", ".join(f"{r} {_vtext(nums[r], ivs[r], seeds, unit)}" for r in present)
        fig = f"{a} {_vtext(nums[a], ia, seeds, unit)} vs {others}{ref} [{source}]"
        return Verdict(cat, text, fig)

    return evaluate


# Figures copied by hand from docs/results.md (only figures that are in it now), by claim id.
DOCUMENTED: dict[str, dict[str, Any]] = {
    "adadim": {"_section": '"SmolLM2-135M quantised or pruned, before any retraining" (perplexity)',
               "RTN 4-bit, input-channel groups": 251.26, "RTN 4-bit, output-row groups": 176.17},
    "wanda": {"_section": '"SmolLM2-135M quantised or pruned, before any retraining" (perplexity)',
              "50% Wanda": 230.98, "50% magnitude": 2776.0},
    "lottery": {"_section": '"Lottery tickets: iterative magnitude pruning of a digits MLP" (3 seeds, means)',
                "_seeds": 3, "ticket at 16.8% of the weights": 0.9740, "dense network": 0.9694},
    "ties": {"_section": '"Two LoRA adapters merged into one" (mean exact match of the two tasks)',
             "TIES": 0.4483, "task arithmetic": 0.3879, "weighted average": 0.4754},
    "pcb": {"_section": '"Two LoRA adapters merged into one" (mean exact match of the two tasks)',
            "PCB": 0.4569, "TIES": 0.4483, "task arithmetic": 0.3879, "weighted average": 0.4754},
    "dare": {"_section": '"Two LoRA adapters merged into one" (mean exact match of the two tasks)',
             "DARE-TIES": 0.4052, "TIES": 0.4483},
    "int21": {"_section": '"SmolLM2-135M compressed, then recovered by a short retraining" (perplexity)',
              "RTN 4-bit + LREC": 71.90, "RTN 4-bit": 176.17},
    "glowq": {"_section": '"SmolLM2-135M compressed, then recovered by a short retraining" (perplexity)',
              "RTN 4-bit + GlowQ": 118.53, "RTN 4-bit": 176.17},
    "perp": {"_section": '"SmolLM2-135M compressed, then recovered by a short retraining" (perplexity, norms only)',
             "50% magnitude + PERP": 63.37, "50% magnitude": 2775.66},
    "recursive": {"_section": '"SmolLM2-135M compressed, then recovered by a short retraining" (perplexity)',
                  "recursive, uptrained": 833.98, "recursive": 915596.1},
    "shira-switch": {"_section": '"Sparse and spectral methods: switching and training steps" (LoRA time / SHiRA '
                                 'time, median of 14 switches)',
                     "SHiRA speed-up": 4.25, "claimed lower end": 5.0},
}


def _paper(authors: str, title: str, year: int) -> str:
    return f'{authors}, "{title}", {year}'


RECOVERY = "uv run python benchmarks/compress_recovery_smollm2.py"
MERGE = "uv run python benchmarks/merge_adapters_multitask.py --out DIR --table TABLE.md --ranks 16"
LOWRANK, ADAPTERS, SPARSE, ROUTED = FAMILIES[:4]
COMPRESSION, MERGING, MEASUREMENT = FAMILIES[4:]
DETERMINISTIC = "a deterministic method, scored on one held-out text"
MERGE_HINT = "one training seed of the two adapters; rerun with others for intervals"
ONE_POINT = 0.01  # "on par" / "comparable": within one point of the metric (accuracy or exact match)


def _bench(id, family, methods, paper, claim, test, evaluate, task=None, extra=()) -> Claim:
    ms = [m for m in methods] + list(extra)
    return Claim(id, family, tuple(methods), paper, claim, test,
                 bench_command([m for m in ms if m not in ("head", "full")],
                               [m for m in ms if m in ("head", "full")], task), evaluate)


CLAIMS: list[Claim] = [
    # ---- low-rank adapters
    _bench("lora", LOWRANK, ("lora",),
           _paper("Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang and Chen",
                  "LoRA: Low-Rank Adaptation of Large Language Models", 2021),
           "LoRA performs on par with or better than full fine-tuning on RoBERTa, DeBERTa, GPT-2 and GPT-3 175B "
           "while reducing the trainable parameters by 10,000× and GPU memory by 3× (GPT-3).",
           "LoRA at the smallest bench budget (r=2, <1% of the parameters) reaches full fine-tuning's metric minus "
           "one point.",
           vs("lora", "full", delta=-ONE_POINT, strict=False, pairing="any", max_param_ratio=0.01), extra=("full",)),
    _bench("pissa", LOWRANK, ("pissa",),
           _paper("Meng, Wang and Zhang",
                  "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language Models", 2024),
           "PiSSA, LoRA initialised from W's principal singular triplets, converges faster and consistently "
           "outperforms LoRA at the same number of trainable parameters (e.g. Mistral-7B on GSM8K: 72.86% "
           "against LoRA's 67.7%), across 12 models from 184M to 70B.",
           "PiSSA's metric > LoRA's at the same budget.", vs("pissa", "lora"), extra=("lora",)),
    _bench("adalora", LOWRANK, ("adalora",),
           _paper("Zhang, Chen, Bukharin, He, Cheng, Chen and Zhao",
                  "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (AdaLoRA)", 2023),
           "AdaLoRA, which allocates the rank budget across matrices by importance, improves over LoRA and "
           "other baselines on GLUE, SQuAD and summarisation with DeBERTaV3-base and BART-large, most in the "
           "low-budget settings.",
           "AdaLoRA's metric > LoRA's at the same budget.", vs("adalora", "lora"), extra=("lora",)),
    _bench("increlora", LOWRANK, ("increlora",),
           _paper("Zhang, Li, Chen, Jiang, Wang and Qian",
                  "IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient Fine-tuning", 2023),
           "IncreLoRA, which grows the rank of the most important modules during training, is more parameter-"
           "efficient than LoRA and AdaLoRA on GLUE (DeBERTaV3-base), especially in low-resource settings.",
           "IncreLoRA's metric > LoRA's at a trainable count within a factor 2.", vs("increlora", "lora"),
           extra=("lora",)),
    _bench("lamda", LOWRANK, ("lamda",),
           _paper("Azizi, Kundu and Pedram",
                  "LaMDA: Large Model Fine-Tuning via Spectrally Decomposed Low-Dimensional Adaptation", 2024),
           "LaMDA matches or surpasses existing alternatives with up to 17.7× fewer parameter updates and up to "
           "1.32× lower peak GPU memory (GLUE with DeBERTa-V3, summarisation, LLaMA2-7B/13B reasoning).",
           "LaMDA's metric ≥ LoRA's minus one point at the same budget.",
           vs("lamda", "lora", delta=-ONE_POINT, strict=False), extra=("lora",)),
    _bench("hydra", LOWRANK, ("hydra",),
           _paper("Kim, Lee and Kwak", "Hydra: Multi-head Low-rank Adaptation for Parameter Efficient Fine-tuning",
                  2024),
           "Hydra, a parallel plus a sequential LoRA branch, is more expressive than single-branch LoRA and "
           "superior on VTAB-1K, GLUE and ELEVATER (ViT-B, RoBERTa, CLIP).",
           "Hydra's metric > LoRA's at the same budget.", vs("hydra", "lora"), extra=("lora",)),
    _bench("block-lora", LOWRANK, ("block-lora",),
           _paper("Zhou et al.",
                  "One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based Few-Shot Learning",
                  2025),
           "Block-LoRA, whose down projection is one block shared by the input chunks, trains fewer parameters "
           "than LoRA and stays competitive with the state of the art on 11 few-shot CLIP benchmarks; ImageNet "
           "few-shot fine-tuning fits one 24 GB GPU.",
           "Block-LoRA's metric ≥ LoRA's minus one point at the same budget.",
           vs("block-lora", "lora", delta=-ONE_POINT, strict=False), extra=("lora",)),
    _bench("kronecker", LOWRANK, ("kronecker",),
           _paper("Marjit, Singh, Mathur, Roy, Kumar and Banerjee (DiffuseKronA); Yeh et al. (LoKr)",
                  "DiffuseKronA: A Parameter Efficient Fine-tuning Method for Personalized Diffusion Models; "
                  "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation", 2024),
           "Kronecker-product adapters on Stable Diffusion XL need 35% fewer parameters than LoRA-DreamBooth "
           "(99.947% fewer than DreamBooth) with comparable or better subject-driven images.",
           "Proxy (no diffusion model here): Kronecker's metric ≥ LoRA's minus one point at the same budget.",
           vs("kronecker", "lora", delta=-ONE_POINT, strict=False), extra=("lora",)),
    _bench("vera", LOWRANK, ("vera",),
           _paper("Kopiczko, Blankevoort and Asano", "VeRA: Vector-based Random Matrix Adaptation", 2024),
           "VeRA, frozen shared random matrices with trainable scaling vectors, matches LoRA with 10× fewer "
           "trainable parameters (GLUE with RoBERTa, E2E with GPT-2, instruction tuning of LLaMA 7B/13B).",
           "VeRA's metric ≥ LoRA's minus one point, VeRA at its largest size within the budget (fewer "
           "parameters than LoRA).",
           vs("vera", "lora", delta=-ONE_POINT, strict=False, max_param_ratio=1.0), extra=("lora",)),
    _bench("nola", LOWRANK, ("nola",),
           _paper("Koohpayegani, Navaneet, Nooralinejad, Kolouri and Pirsiavash",
                  "NOLA: Compressing LoRA using Linear Combination of Random Basis", 2024),
           "NOLA matches LoRA with far fewer parameters (GPT-2 on E2E) and halves the parameters of rank-1 "
           "LoRA without loss on LLaMA-2 70B; also on ViT.",
           "NOLA's metric ≥ LoRA's minus one point at the same budget.",
           vs("nola", "lora", delta=-ONE_POINT, strict=False), extra=("lora",)),
    _bench("randlora", LOWRANK, ("randlora",),
           _paper("Albert, Zhang, Saratchandran, Rodriguez-Opazo, van den Hengel and Abbasnejad",
                  "RandLoRA: Full-rank parameter-efficient fine-tuning of large models", 2025),
           "RandLoRA, a full-rank update from frozen random bases with trainable diagonal scalings, reduces and "
           "sometimes removes the gap between LoRA and full fine-tuning at the same parameter count (vision, "
           "language and vision-language, notably CLIP).",
           "RandLoRA's metric > LoRA's at the same budget.", vs("randlora", "lora"), extra=("lora",)),
    _bench("mos", LOWRANK, ("mos",),
           _paper("Wang, Chen, Chen, Dong, Xue, Jiang, Kong and Wu",
                  "MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with Mixture of Shards", 2025),
           "MoS, LoRA whose rank vectors are shards from pools shared across layers, saves about 8× the "
           "parameters of standard LoRA at equal quality (LLaMA2-7B/13B, LLaMA3.2-3B instruction tuning).",
           "At LoRA's budget MoS reaches rank 64; if it matches LoRA at 1/8 of the parameters it must beat "
           "LoRA at the same budget: MoS's metric > LoRA's at the same budget.",
           vs("mos", "lora"), extra=("lora",)),
    _bench("flylora", LOWRANK, ("flylora",),
           _paper("Zou et al.",
                  "FlyLoRA: Boosting Task Decoupling and Parameter Efficiency via Implicit Rank-Wise "
                  "Mixture-of-Experts", 2025),
           "FlyLoRA, a frozen sparse random down projection that routes the ranks (top-k), gives consistent gains "
           "over LoRA on general knowledge (MMLU), scientific QA, maths (GSM8K) and code (HumanEval) with "
           "LLMs, and less interference when merged (no numbers in the abstract).",
           "FlyLoRA's metric > LoRA's at the same budget.", vs("flylora", "lora"), extra=("lora",)),
    # ---- adapters, prompts, scaling vectors
    _bench("bottleneck", ADAPTERS, ("bottleneck",),
           _paper("Houlsby, Giurgiu, Jastrzebski, Morrone, de Laroussilhe, Gesmundo, Attariyan and Gelly",
                  "Parameter-Efficient Transfer Learning for NLP", 2019),
           "Bottleneck adapters come within 0.4% of full fine-tuning on GLUE (BERT-Large) while adding 3.6% "
           "parameters per task.",
           "Bottleneck's metric ≥ 99.6% of full fine-tuning's, with < 3.6% of its parameters.",
           vs("bottleneck", "full", ratio=0.996, strict=False, pairing="any", max_param_ratio=0.036),
           extra=("full",)),
    _bench("compacter", ADAPTERS, ("compacter",),
           _paper("Karimi Mahabadi, Henderson and Ruder", "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers",
                  2021),
           "Compacter trains 0.047% of T5-base's parameters and performs on par with full fine-tuning on GLUE, "
           "and better on SuperGLUE and in low-resource settings.",
           "Compacter's metric ≥ full fine-tuning's minus one point, with < 0.05% of its parameters "
           "(our count includes the task head).",
           vs("compacter", "full", delta=-ONE_POINT, strict=False, pairing="any", max_param_ratio=0.0005),
           extra=("full",)),
    _bench("mam", ADAPTERS, ("mam",),
           _paper("He, Zhou, Ma, Berg-Kirkpatrick and Neubig",
                  "Towards a Unified View of Parameter-Efficient Transfer Learning", 2022),
           "The MAM adapter (prefix tuning on attention + a scaled parallel adapter on the FFN) is comparable to "
           "full fine-tuning on XSum, WMT16 En-Ro, MNLI and SST-2 while tuning 6.7% of the parameters, and "
           "better than its parts.",
           "MAM's metric ≥ full fine-tuning's minus one point, with < 6.7% of its parameters.",
           vs("mam", "full", delta=-ONE_POINT, strict=False, pairing="any", max_param_ratio=0.067),
           extra=("full",)),
    _bench("mosa", ADAPTERS, ("mosa",),
           _paper("Zhang, Zou, An, Liu and Zhang", "MoSA: Mixture of Sparse Adapters for Visual Efficient Tuning",
                  2023),
           "MoSA (an adapter split into sparse parts trained stochastically, merged back) consistently beats "
           "other adapter-tuning methods on 27 visual tasks, including low-resource and multi-task settings.",
           "MoSA's metric > the dense bottleneck adapter's at the same budget.", vs("mosa", "bottleneck"),
           extra=("bottleneck",)),
    _bench("prefix-tuning", ADAPTERS, ("prefix-tuning",),
           _paper("Li and Liang", "Prefix-Tuning: Optimizing Continuous Prompts for Generation", 2021),
           "Prefix tuning, learning 0.1% of the parameters, obtains performance comparable to fine-tuning in the "
           "full-data setting and outperforms it in low-data settings (GPT-2 table-to-text, BART summarisation).",
           "Prefix tuning's metric ≥ full fine-tuning's minus one point.",
           vs("prefix-tuning", "full", delta=-ONE_POINT, strict=False, pairing="any"), extra=("full",)),
    _bench("prompt-tuning", ADAPTERS, ("prompt-tuning",),
           _paper("Lester, Al-Rfou and Constant", "The Power of Scale for Parameter-Efficient Prompt Tuning", 2021),
           "Prompt tuning becomes competitive with full model tuning as models exceed billions of parameters "
           "(T5-XXL, 11B, on SuperGLUE) and trails it on small models.",
           "The small-model half of the claim (the scale half needs >1B models): full fine-tuning's metric > "
           "prompt tuning's on our 22M-135M models.",
           vs("full", "prompt-tuning", pairing="any"), extra=("full",)),
    _bench("ia3", ADAPTERS, ("ia3",),
           _paper("Liu, Tam, Muqeeth, Mohta, Huang, Bansal and Raffel",
                  "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", 2022),
           "(IA)³, learned vectors rescaling keys, values and FFN inputs, trains 0.01% of T0-3B's parameters and "
           "outperforms LoRA and other PEFT methods in few-shot fine-tuning; T-Few beats GPT-3 in-context "
           "learning by 6% and is super-human on RAFT.",
           "(IA)³'s metric > LoRA's at the smallest LoRA budget ((IA)³ has a fixed, smaller size).",
           vs("ia3", "lora", pairing="any"), extra=("lora",)),
    _bench("bitfit", ADAPTERS, ("bitfit",),
           _paper("Ben Zaken, Ravfogel and Goldberg",
                  "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked Language-models", 2022),
           "Training only the bias terms (about 0.08% of BERT's parameters) is competitive with fine-tuning the "
           "whole model on GLUE with small-to-medium training data.",
           "BitFit's metric ≥ full fine-tuning's minus one point.",
           vs("bitfit", "full", delta=-ONE_POINT, strict=False, pairing="any"), extra=("full",)),
    _bench("ln-tuning", ADAPTERS, ("ln-tuning",),
           _paper("Qi, Ruan, Zuo and Li",
                  "Parameter-Efficient Tuning on Layer Normalization for Pre-trained Language Models", 2022),
           "Tuning only the LayerNorm gains and biases (0.03% of the parameters) performs comparably to "
           "prefix tuning and adapters on GLUE (BERT), and combined with them sets the state of the art.",
           "LN tuning's metric ≥ prefix tuning's (with far fewer parameters).",
           vs("ln-tuning", "prefix-tuning", strict=False, pairing="any"), extra=("prefix-tuning",)),
    # ---- sparse, spectral, subspace
    _bench("shira", SPARSE, ("shira",),
           _paper("Bhardwaj et al.", "Sparse High Rank Adapters", 2024),
           "SHiRA, training 1-2% of the base weights through a fixed sparse mask, outperforms LoRA on LLaMA-7B "
           "and Stable Diffusion, and cuts peak GPU memory by up to 16%.",
           "SHiRA's metric > LoRA's at the same budget (LoRA-matched mask size).", vs("shira", "lora"),
           extra=("lora",)),
    Claim("shira-switch", SPARSE, ("shira",), _paper("Bhardwaj et al.", "Sparse High Rank Adapters", 2024),
          "Switching a merged SHiRA adapter is 5×-16× faster than fusing LoRA weights on a CPU.",
          "Switch a merged SmolLM2-135M from adapter a to b (SHiRA and LoRA, same count): LoRA time / SHiRA "
          "time ≥ 5.",
          "uv run python benchmarks/speed.py --only switching --out FILE.json",
          external("shira-switch", "SHiRA speed-up", ["claimed lower end"], strict=False, unit="×",
                   single="one run (a median of 14 switches)",
                   command="uv run python benchmarks/speed.py --only switching --out FILE.json")),
    _bench("neuroada", SPARSE, ("neuroada",),
           _paper("Zhang, Shen, Cao and Shutova",
                  "NeuroAda: Activating Each Neuron's Potential for Parameter-Efficient Fine-Tuning", 2025),
           "NeuroAda, a trainable bypass on each neuron's top-k input weights, reaches state-of-the-art results "
           "on 23+ generation and understanding tasks with ≤ 0.02% trainable parameters and up to 60% less CUDA "
           "memory.",
           "NeuroAda's metric > LoRA's at the same budget.", vs("neuroada", "lora"), extra=("lora",)),
    _bench("lt-sft", SPARSE, ("lt-sft",),
           _paper("Ansell, Ponti, Korhonen and Vulić", "Composable Sparse Fine-Tuning for Cross-Lingual Transfer",
                  2022),
           "Lottery-ticket sparse fine-tuning (LT-SFT), composed from language and task parts, beats adapters by "
           "a large margin in zero-shot cross-lingual transfer (UD parsing, MasakhaNER, AmericasNLI; mBERT, "
           "XLM-R).",
           "Proxy (we have no multilingual data, so no cross-lingual composition): LT-SFT's metric > the "
           "bottleneck adapter's on one monolingual task.",
           vs("lt-sft", "bottleneck", pairing="any"), extra=("bottleneck",)),
    _bench("random-sparse", SPARSE, ("random-sparse",),
           _paper("Su et al.",
                  "Arbitrary Few Parameters are Good Enough for Adapting Large-scale Pre-trained Language Models",
                  2023),
           "At tens of billions of parameters, trainable deltas at arbitrary (random) positions perform like "
           "designed PET methods and full fine-tuning, with about the same number of trainable parameters; "
           "the design matters less as models grow.",
           "Random sparse deltas' metric ≥ LoRA's minus one point at the same budget (the small-model end "
           "of the claim).",
           vs("random-sparse", "lora", delta=-ONE_POINT, strict=False), extra=("lora",)),
    _bench("fourierft", SPARSE, ("fourierft",),
           _paper("Gao, Wang, Chen, Liu, Chen and Li", "Parameter-Efficient Fine-Tuning with Discrete Fourier "
                  "Transform", 2024),
           "FourierFT matches or beats LoRA with far fewer parameters, e.g. 0.064M against LoRA's 33.5M on "
           "LLaMA2-7B instruction tuning; also on GLUE (RoBERTa), E2E (GPT-2) and ViT.",
           "FourierFT's metric ≥ LoRA's minus one point at the same budget.",
           vs("fourierft", "lora", delta=-ONE_POINT, strict=False), extra=("lora",)),
    _bench("loca", SPARSE, ("loca",),
           _paper("Du, Min, Li, Lu, Zou, Peng, Chu and Gong",
                  "LoCA: Location-Aware Cosine Adaptation for Parameter-Efficient Fine-Tuning", 2025),
           "LoCA, a sparse inverse-DCT update with learnable locations, is more parameter-efficient than "
           "low-rank methods at comparable compute (GLUE with RoBERTa, instruction tuning of LLaMA, ViT).",
           "LoCA's metric > LoRA's at the same budget.", vs("loca", "lora"), extra=("lora",)),
    _bench("said", SPARSE, ("subspace",),
           _paper("Aghajanyan, Zettlemoyer and Gupta",
                  "Intrinsic Dimensionality Explains the Effectiveness of Language Model Fine-Tuning", 2020),
           "Optimising 200 parameters randomly projected into RoBERTa reaches 90% of full fine-tuning on MRPC; "
           "larger and longer-pretrained models have lower intrinsic dimension.",
           "Some subspace size d ≤ 1,000 reaches 90% of full fine-tuning on a pretrained model "
           "(d90 ≤ 1,000).",
           d90(max_d=1000, exclude_models=("digits-mlp",))),
    # ---- routed, multi-task
    _bench("mixlora", ROUTED, ("mixlora",),
           _paper("Li et al.", "MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA-based Mixture of "
                  "Experts", 2024),
           "MixLoRA (LoRA experts in the FFN with a top-2 router) improves accuracy by about 9% over "
           "state-of-the-art PEFT in multi-task learning, with 40% less GPU memory and 30% less latency "
           "(with m-LoRA, LLaMA-2 7B).",
           "MixLoRA's metric > LoRA's at the same budget (single task).", vs("mixlora", "lora"), extra=("lora",)),
    _bench("lora-mixer", ROUTED, ("lora-mixer",),
           _paper("Li et al.", "LoRA-Mixer: Coordinate Modular LoRA Experts Through Serial Attention Routing",
                  2025),
           "LoRA-Mixer improves over the base model by 7.61/4.88/3.08 points on GSM8K/HumanEval/MedQA and over "
           "state-of-the-art methods by 1.09/1.45/1.68 with 48% of their parameters.",
           "LoRA-Mixer's metric > LoRA's at the same budget.", vs("lora-mixer", "lora"), extra=("lora",)),
    Claim("poly", ROUTED, ("poly",),
          _paper("Ponti, Sordoni, Bengio and Reddy (Poly); Caccia, Ponti, Su, Mittal, Liu, Courville and Sordoni "
                 "(MHR)", "Combining Parameter-efficient Modules for Task-level Generalisation; Multi-Head Adapter "
                 "Routing for Cross-Task Generalization", 2023),
          "Multi-head routing (MHR) of an inventory of LoRA modules beats Poly at equal budget, and Poly beats "
          "single-task adapters, in multi-task training and few-shot adaptation (T0 tasks, SuperNI); MHR-z "
          "(only the routing trained) is competitive at extreme parameter efficiency.",
          "-", "-", None,
          untestable="the claim is about multi-task training and few-shot transfer over many tasks (T0, "
                     "Super-NaturalInstructions); the bench trains one task at a time, and our two generation "
                     "tasks are not a task distribution"),
    Claim("scalearn", ROUTED, ("scalearn",),
          _paper("Frohmann, Holtermann, Masoudian, Lauscher and Rekabsaz",
                 "ScaLearn: Simple and Highly Parameter-Efficient Task Transfer by Learning to Scale", 2024),
          "ScaLearn, learned scalings of frozen source-task adapters' outputs, is competitive with "
          "AdapterFusion using 0.35% of its transfer parameters, and still with 8 transfer parameters "
          "(GLUE, SuperGLUE, HumSet; RoBERTa, XLM-R).",
          "-", "-", None,
          untestable="it needs adapters trained on several source tasks and a target task (GLUE/SuperGLUE); the "
                     "bench skips ScaLearn, and our built-in tasks give two related pairs at most"),
    # ---- compression
    Claim("adadim", COMPRESSION, (),
          _paper("Heo, Kim, Kwon, Kim, Park and Lee",
                 "Rethinking Channel Dimensions to Isolate Outliers for Low-bit Weight Quantization of Large "
                 "Language Models (per-IC quantisation, AdaDim)", 2024),
          "Grouping weights along input channels (per-IC) isolates activation outliers; AdaDim, choosing per-IC "
          "or per-OC per layer, improves round-to-nearest and GPTQ by up to +4.7% MMLU on base LLMs and +10% "
          "HumanEval on instruction-tuned ones.",
          "SmolLM2-135M, RTN 4-bit, group 64: perplexity with input-channel groups < with output-row groups "
          "(lower is better).",
          "uv run python benchmarks/compress_smollm2.py",
          external("adadim", "RTN 4-bit, input-channel groups", ["RTN 4-bit, output-row groups"],
                   lower_is_better=True, command="uv run python benchmarks/compress_smollm2.py",
                   hint=DETERMINISTIC)),
    Claim("int21", COMPRESSION, (),
          _paper("Chai, Gkountouras, Ko, Chen, Jiang and Jin",
                 "INT2.1: Towards Fine-Tunable Quantized Large Language Models with Error Correction through "
                 "Low-Rank Adaptation", 2023),
          "A LoRA trained to correct the quantisation error (LREC) makes an INT2 LLM work at 1.05× its size "
          "and restores INT3/4/8 models, with up to 5.6× less fine-tuning memory (7B on a laptop).",
          "SmolLM2-135M RTN 4-bit: perplexity with the error-correcting LoRA < without (numbers: "
          '"RTN 4-bit + LREC", "RTN 4-bit").',
          RECOVERY,
          external("int21", "RTN 4-bit + LREC", ["RTN 4-bit"], lower_is_better=True, command=RECOVERY)),
    Claim("glowq", COMPRESSION, (),
          _paper("An, Suh and Kim", "GlowQ: Group-Shared LOw-Rank Approximation for Quantized LLMs", 2026),
          "Sharing one low-rank right factor per input-sharing group lowers time-to-first-byte by 5.6% and "
          "raises throughput by 9.6%, with WikiText-2 perplexity -0.17% and +0.42 points downstream; GlowQ-S: "
          "TTFB -23.4%, throughput +37.4%, within 0.2 points.",
          "The accuracy half (the speed half needs LLM serving on a GPU): SmolLM2-135M RTN 4-bit with GlowQ "
          'rank-32 corrections has lower perplexity than plain RTN 4-bit (numbers: "RTN 4-bit + GlowQ", '
          '"RTN 4-bit").',
          RECOVERY,
          external("glowq", "RTN 4-bit + GlowQ", ["RTN 4-bit"], lower_is_better=True, command=RECOVERY)),
    Claim("perp", COMPRESSION, (),
          _paper("Zimmer, Andoni, Spiegel and Pokutta", "PERP: Rethinking the Prune-Retrain Paradigm in the Era "
                 "of LLMs", 2023),
          "Retraining only 0.27%-0.35% of the parameters (biases, norms, or LoRA) after magnitude pruning "
          "recovers the quality of full retraining on OPT-2.7B to 30B, and makes magnitude pruning competitive "
          "with Wanda and SparseGPT.",
          "SmolLM2-135M, 50% magnitude pruning: perplexity after PERP retraining of the norms < before "
          '(numbers: "50% magnitude + PERP", "50% magnitude").',
          RECOVERY,
          external("perp", "50% magnitude + PERP", ["50% magnitude"], lower_is_better=True, command=RECOVERY)),
    Claim("wanda", COMPRESSION, (),
          _paper("Sun, Liu, Bair and Kolter", "A Simple and Effective Pruning Approach for Large Language Models "
                 "(Wanda)", 2024),
          "Pruning by |weight| × input-activation norm, per output row, without retraining, significantly "
          "outperforms magnitude pruning and is competitive with SparseGPT on LLaMA and LLaMA-2 (7B-70B).",
          "SmolLM2-135M at 50% sparsity: perplexity with Wanda < with per-layer magnitude pruning.",
          "uv run python benchmarks/compress_smollm2.py",
          external("wanda", "50% Wanda", ["50% magnitude"], lower_is_better=True,
                   command="uv run python benchmarks/compress_smollm2.py", hint=DETERMINISTIC)),
    Claim("lottery", COMPRESSION, (),
          _paper("Frankle and Carbin", "The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural Networks",
                 2019),
          "Iterative magnitude pruning with rewinding to the initial weights finds winning tickets under "
          "10-20% of the size of fully connected and convolutional networks (MNIST, CIFAR-10); above that "
          "size they learn faster and reach higher test accuracy than the original network.",
          "Digits MLP (64-200-200-10): the rewound ticket at 16.8% of the weights reaches a test accuracy ≥ "
          "the dense network's.",
          "uv run python benchmarks/lottery_digits.py --rounds 15 --fraction 0.2 --epochs 20 --lr 0.0012 "
          "--seeds 3 --out DIR",
          external("lottery", "ticket at 16.8% of the weights", ["dense network"], strict=False,
                   hint=f"per-seed values (in {NUMBERS_FILE}) give intervals",
                   command="uv run python benchmarks/lottery_digits.py --rounds 15 --fraction 0.2 --epochs 20 "
                           "--lr 0.0012 --seeds 3 --out DIR")),
    Claim("pela", COMPRESSION, (),
          _paper("Guo, Wang and Kankanhalli", "PELA: Learning Parameter-Efficient Models with Low-Rank "
                 "Approximation", 2024),
          "Low-rank factorisation with feature-distillation pre-training cuts a third to two thirds of the "
          "parameters of vision and vision-language transformers (DeiT, Swin, ALBEF) at about 0.6 points of "
          "accuracy.",
          "SmolLM2-135M factorised to 1/2 of its Linear parameters, then distilled: perplexity within 10% of "
          'float (numbers: "PELA", "float32"; lower is better, target 1.1 × float).',
          "no script measures it yet: add a factorize(...) + distill(...) row to "
          "benchmarks/compress_recovery_smollm2.py",
          external("pela", "PELA", ["float32"], lower_is_better=True, ratio=1.1, strict=False,
                   command="no script measures it yet (a factorize + distill row in "
                           "benchmarks/compress_recovery_smollm2.py would)")),
    Claim("recursive", COMPRESSION, (),
          _paper("Bae, Fisch, Harutyunyan, Ji, Kim and Schuster",
                 "Relaxed Recursive Transformers: Effective Parameter Sharing with Layer-wise LoRA", 2025),
          "A recursive Gemma 1B (layers tied, with per-depth LoRA, uptrained) beats TinyLlama 1.1B, Pythia 1B "
          "and distillation baselines and recovers most of Gemma 2B's performance; depth-wise batching gives "
          "a theoretical 2-3× throughput.",
          "SmolLM2-135M tied into 15 blocks with rank-64 per-depth LoRA: after uptraining, the perplexity is "
          "lower than before it (numbers: \"recursive, uptrained\", \"recursive\"); the throughput half needs "
          "depth-wise batching on a GPU.",
          RECOVERY,
          external("recursive", "recursive, uptrained", ["recursive"], lower_is_better=True, command=RECOVERY)),
    Claim("bitnet", COMPRESSION, (),
          _paper("Nielsen and Schneider-Kamp", "BitNet b1.58 Reloaded: State-of-the-art Performance Also on "
                 "Smaller Networks", 2024),
          "For 100K-48M-parameter models, 1.58-bit (ternary) quantisation-aware training matches the float "
          "baseline for small language models when the hidden size is doubled, and for small vision models at "
          "the same size.",
          "Digits MLP trained with to_bitnet at the same size: test accuracy ≥ the float network's minus one "
          'point (numbers: "ternary", "float").',
          "no script measures it yet (train the digits MLP of paretune.measure.digits with and without "
          "paretune.compress.to_bitnet)",
          external("bitnet", "ternary", ["float"], delta=-ONE_POINT, strict=False,
                   command="no script measures it yet (the digits MLP trained with and without "
                           "paretune.compress.to_bitnet would)")),
    # ---- merging
    Claim("ties", MERGING, (),
          _paper("Yadav, Tam, Choshen, Raffel and Bansal", "TIES-Merging: Resolving Interference When Merging "
                 "Models", 2023),
          "TIES-Merging (trim, elect sign, disjoint mean) outperforms existing merging methods (averaging, task "
          "arithmetic, Fisher, RegMean) across modalities, domains, numbers of tasks, model sizes (T5, ViT) and "
          "fine-tuning settings.",
          "Two SmolLM2-135M LoRAs (country -> capital, country -> currency) merged at rank 16: TIES's mean "
          "exact match > the best of task arithmetic and the weighted average.",
          MERGE, external("ties", "TIES", ["task arithmetic", "weighted average"],
                                   command=MERGE, hint=MERGE_HINT)),
    Claim("pcb", MERGING, (),
          _paper("Du et al.", "Parameter Competition Balancing for Model Merging", 2024),
          "PCB-Merging (intra- and inter-task balancing of parameter competition) beats existing merging "
          "methods across tasks, domains, modalities and model sizes, LLMs included.",
          "The same two merged LoRAs: PCB's mean exact match > the best of TIES, task arithmetic and the "
          "weighted average.",
          MERGE, external("pcb", "PCB", ["TIES", "task arithmetic", "weighted average"],
                                   command=MERGE, hint=MERGE_HINT)),
    Claim("dare", MERGING, (),
          _paper("Yu, Yu, Yu, Huang and Li", "Language Models are Super Mario: Absorbing Abilities from Homologous "
                 "Models as a Free Lunch", 2024),
          "DARE drops 90% (even 99%) of the delta parameters of an SFT model and rescales the rest without "
          "losing its abilities, and as a plug-in improves merging (e.g. WizardLM + WizardMath).",
          "The same two merged LoRAs: DARE-TIES (density 0.5) mean exact match ≥ TIES's (the plug-in does not "
          "hurt).",
          MERGE, external("dare", "DARE-TIES", ["TIES"], strict=False,
                                   command=MERGE, hint=MERGE_HINT)),
    # ---- measurement
    Claim("intrinsic-dimension", MEASUREMENT, (),
          _paper("Li, Farkhoor, Liu and Yosinski", "Measuring the Intrinsic Dimension of Objective Landscapes",
                 2018),
          "Many problems have a small intrinsic dimension, stable across model sizes (MNIST FC: d_int90 about "
          "750); solving in a random subspace compresses networks by more than 100× in some cases.",
          "d90 (smallest subspace size reaching 90% of training every parameter) ≤ 1% of the parameters, i.e. "
          "a compression > 100× (digits MLP, MiniLM).",
          "uv run paretune intrinsic-dim --task digits --dims 10,25,50,100,200,300,400,500,750,1000,2000 "
          "--out DIR",
          d90(max_fraction=0.01)),
]


def claims_by_method() -> dict[str, list[Claim]]:
    out: dict[str, list[Claim]] = {}
    for c in CLAIMS:
        for m in c.methods:
            out.setdefault(m, []).append(c)
    return out


def evaluate_all(evidence: Evidence, claims: Sequence[Claim] = ()) -> list[tuple[Claim, Verdict]]:
    return [(c, c.verdict(evidence)) for c in (claims or CLAIMS)]


def load_numbers(path: str | Path | None) -> dict[str, dict]:
    """The numbers JSON (``{claim id: {name: value or [values]}}``), or {} when absent."""
    if path is None or not Path(path).is_file():
        return {}
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object {{claim id: {{name: value}}}}")
    return {k: dict(v) for k, v in data.items() if isinstance(v, dict)}
