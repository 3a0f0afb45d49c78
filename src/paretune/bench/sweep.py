"""The sweep: methods x budgets x seeds (plus the baselines once per seed), each run trained in
its own ``paretune train`` subprocess and recorded in the results store.

* The methods are whatever the registry holds (``paretune.core.registry.all_methods()``): a new
  method joins the bench by registering; nothing here lists methods. A method that cannot adapt
  the model (no layer of a kind it supports), or that cannot come near a budget, is skipped
  with a note.
* Each budget becomes options through :func:`paretune.bench.budget.plan_budget` (LoRA: the
  ``r`` whose trainable count is closest). Two budgets that give the same options are one run;
  a method of fixed size runs once per seed, like the baselines ``head`` and ``full``.
* A subprocess per run isolates it (peak memory is the run's own; a crash is the run's own).
  ``runner`` is injectable: it takes the argv and returns a ``subprocess.CompletedProcess``.
* A run that fails is recorded with its stderr tail and the sweep goes on. Interrupting the
  sweep leaves the current run ``running``; the next sweep on the same folder redoes it and skips
  every run already finished (see :mod:`paretune.bench.store`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

from ..core import registry
from ..core.jsonfile import read_json
from ..errors import ParetuneError, TargetError
from ..training.trainer import BASELINES
from .budget import BudgetError, knob_of, plan_budget
from .store import Store, environment
from .tuning import tuning_of

# Default peak learning rate per method ("adapter": any registered method not listed; a method
# may also have its own ``lr`` in paretune.bench.tuning). Chosen for short runs (~150 steps
# of batch 32) on the small bundled models; --lr overrides them all. On a classification task the
# task head, common to every run, trains at the "head" rate in every run (the head-only baseline's
# rate), so that differences between methods come from the methods, not from their head's rate.
DEFAULT_LR: dict[str, float] = {"full": 1e-4, "head": 5e-3, "adapter": 2e-3}

# `paretune bench --quick`: MiniLM-L6 on city-continent, every method that fits, one seed, one
# budget. 70,000 trainable parameters is one that every built-in method reaches within a factor 2
# on MiniLM's 37 all-linear layers (LoRA r=2: 84,480; VeRA's largest, r=384: 35,328; Hydra's
# smallest, r=1: 126,794), so all of them meet on one plot; the held-out accuracy is taken on the
# first 2,000 test examples (in the task's fixed hash order) to keep the whole run under 10 minutes.
QUICK = {"model": "minilm-l6", "task": "city-continent", "budgets": (70_000,), "seeds": (0,),
         "steps": 150, "batch_size": 32, "max_eval": 2000}
DEFAULTS = {"seeds": (0,), "steps": 300, "batch_size": 32, "knob_values": (2, 8)}
STDERR_TAIL = 2000

Runner = Callable[[list], "subprocess.CompletedProcess"]


def default_lr(method: str) -> float:
    return float(tuning_of(method).lr or DEFAULT_LR.get(method, DEFAULT_LR["adapter"]))


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run. Its ``key`` (sha256 of the canonical JSON of what decides the result:
    model, task, method, options, targets, seed, steps, lr, batch_size) identifies it in the
    store; the budget that led to the options is a label, not part of the key."""

    model: str
    task: str
    method: str
    options: dict[str, Any]
    budget: int | None
    seed: int
    steps: int
    lr: float
    batch_size: int
    targets: tuple[str, ...] | None = None
    trainable_planned: int | None = None  # the budget planner's count (adapter parameters only)
    max_eval: int | None = None  # evaluate on the first N held-out examples (None: all)
    head_lr: float | None = None  # the task head's own learning rate (classification)

    def canonical(self) -> dict[str, Any]:
        out = {"model": self.model, "task": self.task, "method": self.method, "options": self.options,
               "targets": list(self.targets) if self.targets is not None else None, "seed": self.seed,
               "steps": self.steps, "lr": float(self.lr), "batch_size": self.batch_size}
        if self.max_eval is not None:
            out["max_eval"] = self.max_eval
        if self.head_lr is not None:
            out["head_lr"] = float(self.head_lr)
        return out

    @property
    def key(self) -> str:
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def label(self) -> str:
        opts = " ".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.method}{' ' + opts if opts else ''} seed={self.seed}"

    def argv(self, run_dir: str | os.PathLike) -> list[str]:
        """The `paretune train` command of this run, writing into ``run_dir``."""
        argv = [sys.executable, "-m", "paretune.cli", "train", "--model", self.model, "--task", self.task,
                "--method", self.method]
        for k, v in sorted(self.options.items()):
            argv += ["-o", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
        for t in self.targets or ():
            argv += ["--targets", t]
        argv += ["--steps", str(self.steps), "--lr", repr(float(self.lr)), "--batch-size", str(self.batch_size),
                 "--seed", str(self.seed), "--no-save", "--out", str(run_dir)]
        if self.max_eval is not None:
            argv += ["--max-eval", str(self.max_eval)]
        if self.head_lr is not None:
            argv += ["--head-lr", repr(float(self.head_lr))]
        return argv


@dataclasses.dataclass
class Plan:
    runs: list[RunSpec]
    notes: list[str]  # methods and budgets skipped, and why


def resolve_methods(methods: Sequence[str] | None) -> list[str]:
    """Registered method names (all of them for None); an unknown name is a ParetuneError."""
    if methods is None:
        return list(registry.all_methods())
    out: list[str] = []
    for m in methods:
        name = m.strip().lower()
        if not name:
            continue
        if name not in BASELINES:
            name = registry.get(name).name
        if name not in out:
            out.append(name)
    if not out:
        raise ParetuneError("--methods is empty; give method names such as lora,pissa (`paretune methods`).")
    return out


def plan_runs(net: nn.Module, *, model: str, task: str, methods: Sequence[str] | None, budgets: Sequence[int],
              seeds: Sequence[int], steps: int, batch_size: int, lr: float | None = None,
              targets: Sequence[str] | None = None, baselines: Sequence[str] = BASELINES,
              max_eval: int | None = None, head_lr: float | None = None) -> Plan:
    """The run list: every method at every budget and seed, then the baselines once per seed.
    ``net`` is the model, used only to count parameters per method and budget."""
    names = resolve_methods(methods)
    adapters = [m for m in names if m not in BASELINES]
    base_runs = [m for m in names if m in BASELINES] + [b for b in baselines if b not in names]
    for b in base_runs:
        if b not in BASELINES:
            raise ParetuneError(f"unknown baseline {b!r}; the baselines are {', '.join(BASELINES)}.")
    if not budgets and any(knob_of(registry.get(m)) for m in adapters):
        raise ParetuneError("no budget given; pass --budget N (trainable parameters), repeatable.")
    tgt = tuple(targets) if targets else None
    runs: list[RunSpec] = []
    notes: list[str] = []
    seen: set[str] = set()

    def add(spec: RunSpec) -> None:
        if spec.key not in seen:
            seen.add(spec.key)
            runs.append(spec)

    for method in adapters:
        spec = registry.get(method)
        m_lr = float(lr) if lr is not None else default_lr(method)
        method_budgets: list[int | None] = list(budgets) if knob_of(spec) else [None]
        chosen: list[tuple[int | None, dict, int]] = []
        for budget in method_budgets:
            try:
                match = plan_budget(net, method, budget, list(tgt) if tgt else None)
            except TargetError as e:
                notes.append(f"skipped {method}: it cannot adapt this model ({e})")
                break
            except BudgetError as e:
                notes.append(f"skipped {method} at budget {budget:,}: {e}")
                continue
            except ParetuneError as e:  # e.g. a config that needs options the bench cannot guess
                notes.append(f"skipped {method}: {e}")
                break
            same = [b for b, o, _ in chosen if o == match.options]
            if same:
                notes.append(f"{method}: budget {budget:,} gives the same {match.options} as budget {same[0]:,}; "
                             "run once")
                continue
            chosen.append((budget, match.options, match.trainable))
        for seed in seeds:
            for budget, options, count in chosen:
                add(RunSpec(model, task, method, dict(options), budget, int(seed), steps, m_lr, batch_size, tgt,
                            count, max_eval, head_lr))
    for seed in seeds:
        for b in base_runs:
            b_lr = float(lr) if lr is not None else default_lr(b)
            add(RunSpec(model, task, b, {}, None, int(seed), steps, b_lr, batch_size, None, None, max_eval,
                        head_lr if b == "full" else None))
    return Plan(runs, notes)


# -- running --------------------------------------------------------------------------------

def subprocess_runner(argv: list) -> subprocess.CompletedProcess:
    """Run one `paretune train` in a child process, capturing its output."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return subprocess.run(argv, capture_output=True, text=True, env=env)


def run_dir_for(out: Path, spec: RunSpec) -> Path:
    return out / "runs" / f"{spec.method}-{spec.key[:12]}"


def _tail(text: str | bytes | None, n: int = STDERR_TAIL) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    text = (text or "").strip()
    return text if len(text) <= n else "..." + text[-n:]


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """The run's metrics.json, checked for what the report needs; ParetuneError if unusable."""
    path = run_dir / "metrics.json"
    metrics = read_json(path, what="the run's metrics", hint="The run exited 0 but wrote no usable metrics.")
    if not isinstance(metrics, dict):
        raise ParetuneError(f"{path} is not a JSON object")
    name = metrics.get("metric")
    missing = [k for k in ("trainable", "stored_bytes", "metric") if k not in metrics]
    if isinstance(name, str) and name not in metrics:
        missing.append(name)
    if missing:
        raise ParetuneError(f"{path} lacks {', '.join(missing)}")
    return metrics


def describe(spec: RunSpec, metrics: dict[str, Any], wall: float) -> str:
    name = metrics.get("metric")
    value = metrics.get(name) if isinstance(name, str) else None
    quality = f"{name}={value:.4f}" if isinstance(value, (int, float)) else "no metric"
    secs = metrics.get("train_seconds")
    train = f"{secs:.1f} s train, " if isinstance(secs, (int, float)) else ""
    return f"{spec.label}: {quality}, trainable={int(metrics.get('trainable', 0)):,}, {train}{wall:.1f} s wall"


@dataclasses.dataclass
class SweepResult:
    ran: int = 0  # runs executed this time (finished or failed)
    finished: int = 0
    failed: list[tuple[RunSpec, str]] = dataclasses.field(default_factory=list)
    skipped: int = 0  # already finished before this sweep


def run_sweep(runs: Sequence[RunSpec], store: Store, out: str | os.PathLike, *,
              runner: Runner | None = None, progress: bool = True,
              log: Callable[[str], None] | None = None, env: dict[str, str] | None = None) -> SweepResult:
    """Run every planned run not already finished, recording each in ``store``."""
    from tqdm.auto import tqdm

    runner = runner or subprocess_runner
    out = Path(out)
    env = env if env is not None else environment()
    result = SweepResult()
    planned = [(spec, *store.plan(spec)) for spec in runs]
    todo = [(spec, run_id) for spec, run_id, status in planned if status != "finished"]
    result.skipped = len(planned) - len(todo)
    bar = tqdm(total=len(todo), unit="run", desc="bench", disable=not progress, file=sys.stderr)
    say = log or (lambda line: tqdm.write(line, file=sys.stdout))
    if result.skipped:
        say(f"{result.skipped} run(s) already finished in {store.path}; not redone")
    try:
        for i, (spec, run_id) in enumerate(todo, 1):
            bar.set_postfix_str(spec.label)
            run_dir = run_dir_for(out, spec)
            if run_dir.exists():  # a leftover of an interrupted or failed attempt
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True)
            store.start(run_id, run_dir)
            t0 = time.perf_counter()
            try:
                proc = runner(spec.argv(run_dir))
                if proc.returncode != 0:
                    raise ParetuneError(f"exit status {proc.returncode}: {_tail(proc.stderr) or '(no stderr)'}")
                metrics = read_metrics(run_dir)
                if spec.trainable_planned is not None:
                    metrics.setdefault("trainable_planned", spec.trainable_planned)
            except Exception as e:  # noqa: BLE001 - any failure of one run is recorded, the sweep goes on
                message = str(e) if isinstance(e, ParetuneError) else f"{type(e).__name__}: {e}"
                store.fail(run_id, message, env)
                result.failed.append((spec, message))
                result.ran += 1
                first = message.strip().splitlines()[-1] if message.strip() else message
                say(f"[{i}/{len(todo)}] FAILED {spec.label}: {first[:300]}")
            else:
                store.finish(run_id, metrics, env)
                result.ran += 1
                result.finished += 1
                say(f"[{i}/{len(todo)}] {describe(spec, metrics, time.perf_counter() - t0)}")
            bar.update(1)
    finally:
        bar.close()
    return result


# -- the whole bench ------------------------------------------------------------------------

def load_model_for(model: str, task_kind: str) -> nn.Module:
    """The model the runs will train, loaded once here to count parameters per budget."""
    from .. import models

    if task_kind == "classification":
        net, _ = models.load(model, task="classification", num_labels=2)  # the head is not a target
    else:
        net, _ = models.load(model, task="causal-lm")
    return net
