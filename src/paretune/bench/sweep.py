"""The sweep: methods x budgets x seeds (plus the baselines once per seed), each run a
``paretune train`` command run by a worker (or a subprocess) and recorded in the results store.

* The methods are whatever the registry holds (``paretune.core.registry.all_methods()``): a new
  method joins the bench by registering; nothing here lists methods. A method that cannot adapt
  the model (no layer of a kind it supports), or that cannot come near a budget, is skipped
  with a note.
* Each budget becomes options through :func:`paretune.bench.budget.plan_budget` (LoRA: the
  ``r`` whose trainable count is closest). Two budgets that give the same options are one run;
  a method of fixed size runs once per seed, like the baselines ``head`` and ``full``.
* Each run goes to an executor (:mod:`paretune.bench.executors`): by default one reusable worker
  process that loads the model and data once and gives each run a fresh copy; a run's failure,
  and a worker's death, are the run's own; each run's peak memory is measured. ``runner`` is
  injectable (tests): it takes the argv and returns a ``subprocess.CompletedProcess``.
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

from ..cli_options import parse_targets
from ..core import registry
from ..core.inject import Targets
from ..core.jsonfile import read_json
from ..errors import ParetuneError, TargetError
from ..training.trainer import BASELINES
from .budget import BudgetError, knob_of, plan_budget
from .store import Store, environment
from .tuning import tuning_of

# Default peak learning rate per method ("adapter": any registered method not listed; a method
# may also have its own ``lr`` in paretune.bench.tuning, from the search described there); --lr
# overrides them all. "head" is the head-only baseline's rate (searched: 4e-2). On a classification
# task the task head, common to every adapter run, trains at HEAD_LR in every run, so that
# differences between methods come from the methods, not from their head's rate.
DEFAULT_LR: dict[str, float] = {"full": 1e-4, "head": 4e-2, "adapter": 2e-3}
HEAD_LR: float = 5e-3

# `paretune bench --quick`: MiniLM-L6 on city-continent, every registered method that fits, one
# seed, one budget. 70,000 trainable parameters is one that every built-in method reaches within a
# factor 2 on MiniLM's 37 all-linear layers (LoRA r=2: 84,480; VeRA's largest, r=384: 35,328;
# Hydra's smallest, r=1: 126,794), so all of them meet on one plot. To keep ~35 runs under 10
# minutes on a 2-core CPU, a quick run trains 80 steps of batch 16 (1,280 examples) and scores the
# first 500 test examples (in the task's fixed hash order); the measured time is in docs/results.md
# and the arithmetic in docs/bench.md ("The quick bench").
QUICK = {"model": "minilm-l6", "task": "city-continent", "budgets": (70_000,), "seeds": (0,),
         "steps": 80, "batch_size": 16, "max_eval": 500}
DEFAULTS = {"seeds": (0,), "steps": 300, "batch_size": 32, "knob_values": (2, 8)}
STDERR_TAIL = 2000

Runner = Callable[[list], "subprocess.CompletedProcess"]


def default_lr(method: str) -> float:
    return float(tuning_of(method).lr or DEFAULT_LR.get(method, DEFAULT_LR["adapter"]))


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run. Its ``key`` (sha256 of the canonical JSON of what decides the result:
    model, task, method, options, targets, seed, steps, lr, batch_size, and when set max_eval,
    head_lr, the data id and a non-final phase) identifies it in the store; the budget that led
    to the options is a label, not part of the key, and so are the data files' paths (their
    content is: ``data_id``).

    ``data`` / ``eval_data``: the run trains on the file ``data`` and is scored on ``eval_data``
    (``paretune train --data --eval-data``) instead of the built-in ``task``'s split; ``task`` is
    then a label. ``phase``: ``final`` (reported) or ``search`` (a ``--tune`` run scored on the
    validation split)."""

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
    data: str | None = None  # training file (user data, or a search run's training-minus-validation)
    eval_data: str | None = None  # the file it is scored on (test split, or validation for a search run)
    data_id: str | None = None  # sha256 of the data content and split rule (paretune.bench.data)
    phase: str = "final"  # final | search

    def canonical(self) -> dict[str, Any]:
        out = {"model": self.model, "task": self.task, "method": self.method, "options": self.options,
               "targets": list(self.targets) if self.targets is not None else None, "seed": self.seed,
               "steps": self.steps, "lr": float(self.lr), "batch_size": self.batch_size}
        if self.max_eval is not None:
            out["max_eval"] = self.max_eval
        if self.head_lr is not None:
            out["head_lr"] = float(self.head_lr)
        if self.data_id is not None:
            out["data"] = self.data_id
        if self.phase != "final":
            out["phase"] = self.phase
        return out

    @property
    def key(self) -> str:
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def label(self) -> str:
        opts = " ".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        search = f" lr={self.lr:g} (search)" if self.phase == "search" else ""
        return f"{self.method}{' ' + opts if opts else ''} seed={self.seed}{search}"

    def argv(self, run_dir: str | os.PathLike) -> list[str]:
        """The `paretune train` command of this run, writing into ``run_dir``."""
        argv = [sys.executable, "-m", "paretune.cli", "train", "--model", self.model]
        if self.data is not None:
            argv += ["--data", str(self.data), "--eval-data", str(self.eval_data)]
        else:
            argv += ["--task", self.task]
        argv += ["--method", self.method]
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


def target_values(targets: Sequence[str] | str | None) -> tuple[tuple[str, ...] | None, Targets]:
    """``targets`` as :func:`paretune.cli_options.parse_targets` returns them (None, a list of
    names, ``"all-linear"`` or a regular expression without its ``re:``) -> (the ``--targets``
    values of each run's `paretune train` command, the selection to count parameters with). A
    list is first passed through ``parse_targets`` (comma-separated values are split)."""
    if targets is None:
        return None, None
    if isinstance(targets, str):
        if targets == "all-linear":
            return ("all-linear",), "all-linear"
        return ("re:" + targets,), targets
    parsed = parse_targets(list(targets))
    if parsed is None:
        return None, None
    if isinstance(parsed, str):
        return target_values(parsed)
    return tuple(parsed), list(parsed)


def plan_runs(net: nn.Module, *, model: str, task: str, methods: Sequence[str] | None, budgets: Sequence[int],
              seeds: Sequence[int], steps: int, batch_size: int, lr: float | None = None,
              targets: Sequence[str] | str | None = None, baselines: Sequence[str] = BASELINES,
              max_eval: int | None = None, head_lr: float | None = None, data: str | None = None,
              eval_data: str | None = None, data_id: str | None = None) -> Plan:
    """The run list: every method at every budget and seed, then the baselines once per seed.
    ``net`` is the model, used only to count parameters per method and budget. ``data`` /
    ``eval_data`` / ``data_id``: the user's split files (see :class:`RunSpec`). ``targets``: as
    :func:`paretune.cli_options.parse_targets` returns them (see :func:`target_values`)."""
    if (data is None) != (eval_data is None):
        raise ParetuneError("plan_runs: give both data and eval_data, or neither.")
    files = {"data": str(data) if data is not None else None,
             "eval_data": str(eval_data) if eval_data is not None else None, "data_id": data_id}
    names = resolve_methods(methods)
    adapters = [m for m in names if m not in BASELINES]
    base_runs = [m for m in names if m in BASELINES] + [b for b in baselines if b not in names]
    for b in base_runs:
        if b not in BASELINES:
            raise ParetuneError(f"unknown baseline {b!r}; the baselines are {', '.join(BASELINES)}.")
    if not budgets and any(knob_of(registry.get(m)) for m in adapters):
        raise ParetuneError("no budget given; pass --budget N (trainable parameters), repeatable.")
    tgt, count_targets = target_values(targets)
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
                match = plan_budget(net, method, budget, count_targets)
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
                            count, max_eval, head_lr, **files))
    for seed in seeds:
        for b in base_runs:
            b_lr = float(lr) if lr is not None else default_lr(b)
            add(RunSpec(model, task, b, {}, None, int(seed), steps, b_lr, batch_size, None, None, max_eval,
                        head_lr if b == "full" else None, **files))
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
    check_finite(metrics)
    return metrics


def check_finite(metrics: dict[str, Any]) -> None:
    """A run whose quality metric, or any numeric metric, is NaN or infinite (a diverged training:
    NaN weights score at chance, or the loss is NaN) is a failed run, never a point of the Pareto
    front: raise a ParetuneError naming the values."""
    import math

    bad = {k: v for k, v in metrics.items()
           if isinstance(v, float) and not math.isfinite(v) and not isinstance(v, bool)}
    name = metrics.get("metric")
    value = metrics.get(name) if isinstance(name, str) else None
    if isinstance(name, str) and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        raise ParetuneError(f"the run's {name} is {value!r}, not a number; the run is counted as failed.")
    if bad:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
        raise ParetuneError(f"the training diverged: non-finite metrics ({shown}); the run is counted as failed. "
                            "Rerun with a lower --lr.")


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


def _record(i: int, n: int, spec: RunSpec, run_id: int, metrics: dict[str, Any] | None, error: str | None,
            wall: float, store: Store, env: dict[str, str], result: SweepResult, say: Callable[[str], None]) -> None:
    """Record one run's outcome in the store and the log."""
    result.ran += 1
    if error is None:
        store.finish(run_id, metrics, env)
        result.finished += 1
        say(f"[{i}/{n}] {describe(spec, metrics, wall)}")
        return
    store.fail(run_id, error, env)
    result.failed.append((spec, error))
    first = error.strip().splitlines()[-1] if error.strip() else error
    say(f"[{i}/{n}] FAILED {spec.label}: {first[:300]}")


def _fresh_run_dir(out: Path, spec: RunSpec) -> Path:
    run_dir = run_dir_for(out, spec)
    if run_dir.exists():  # a leftover of an interrupted or failed attempt
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    return run_dir


def _metrics_of_reply(spec: RunSpec, run_dir: Path, reply: dict[str, Any]) -> dict[str, Any]:
    """The run's metrics from a worker's reply, written to the run folder's metrics.json by the
    driver (the worker's memory fields replace the trainer's), then checked like a subprocess's."""
    from ..core.atomic import atomic_write_text

    if not reply.get("ok"):
        raise ParetuneError(reply.get("error") or "the run failed (no error message)")
    atomic_write_text(run_dir / "metrics.json", json.dumps(reply["metrics"], indent=2) + "\n")
    metrics = read_metrics(run_dir)
    if spec.trainable_planned is not None:
        metrics.setdefault("trainable_planned", spec.trainable_planned)
    return metrics


def run_sweep(runs: Sequence[RunSpec], store: Store, out: str | os.PathLike, *,
              runner: Runner | None = None, progress: bool = True,
              log: Callable[[str], None] | None = None, env: dict[str, str] | None = None,
              executor: str | Any = "sequential", workers: int = 1, address: str | None = None) -> SweepResult:
    """Run every planned run not already finished, recording each in ``store``.

    ``runner`` given (tests): each run is ``runner(spec.argv(run_dir))``, one after another, as a
    ``paretune train`` subprocess would be. Else the runs go to ``executor``
    (:mod:`paretune.bench.executors`): ``"sequential"`` (one reusable worker process, the default),
    ``"pool"`` (``workers`` worker processes) or ``"ray"`` (``workers`` Ray actors on the cluster at
    ``address``; None starts a local Ray), or an executor object (kept open after the sweep, for
    the caller's next sweep and to close; closed if the sweep is interrupted). Only this process writes the
    store and the run folders' metrics.json. Interrupting (Ctrl-C) kills the workers, leaves every
    finished run finished and the runs in flight ``running`` (the next sweep redoes them)."""
    from ..progress import bar as progress_bar

    out = Path(out)
    env = env if env is not None else environment()
    result = SweepResult()
    planned = [(spec, *store.plan(spec)) for spec in runs]
    todo = [(spec, run_id) for spec, run_id, status in planned if status != "finished"]
    result.skipped = len(planned) - len(todo)
    bar = progress_bar(total=len(todo), unit="run", desc="bench", enabled=progress)
    say = log or (lambda line: bar.write(line, file=sys.stdout))
    if result.skipped:
        say(f"{result.skipped} run(s) already finished in {store.path}; not redone")
    try:
        if runner is not None:
            _run_with_runner(todo, runner, store, out, env, result, say, bar)
        elif todo:
            _run_with_executor(todo, executor, workers, address, store, out, env, result, say, bar)
    finally:
        bar.close()
    return result


def _run_with_runner(todo, runner: Runner, store: Store, out: Path, env, result: SweepResult, say, bar) -> None:
    for i, (spec, run_id) in enumerate(todo, 1):
        bar.set_postfix_str(spec.label)
        run_dir = _fresh_run_dir(out, spec)
        store.start(run_id, run_dir)
        t0 = time.perf_counter()
        metrics, error = None, None
        try:
            proc = runner(spec.argv(run_dir))
            if proc.returncode != 0:
                raise ParetuneError(f"exit status {proc.returncode}: {_tail(proc.stderr) or '(no stderr)'}")
            metrics = read_metrics(run_dir)
            if spec.trainable_planned is not None:
                metrics.setdefault("trainable_planned", spec.trainable_planned)
        except Exception as e:  # noqa: BLE001 - any failure of one run is recorded, the sweep goes on
            error = str(e) if isinstance(e, ParetuneError) else f"{type(e).__name__}: {e}"
        _record(i, len(todo), spec, run_id, metrics, error, time.perf_counter() - t0, store, env, result, say)
        bar.update(1)


def _run_with_executor(todo, executor, workers: int, address: str | None, store: Store, out: Path, env,
                       result: SweepResult, say, bar) -> None:
    from collections import deque

    from .executors import make_executor

    owned = isinstance(executor, str)
    ex = make_executor(executor, workers, address) if owned else executor
    pending = deque(todo)
    inflight: dict[int, tuple[RunSpec, int, Path, float]] = {}
    done = 0
    try:
        while pending or inflight:
            for slot in range(ex.slots):
                if slot in inflight or not pending:
                    continue
                spec, run_id = pending.popleft()
                run_dir = _fresh_run_dir(out, spec)
                store.start(run_id, run_dir)
                inflight[slot] = (spec, run_id, run_dir, time.perf_counter())
                ex.submit(slot, spec.argv(run_dir))
                bar.set_postfix_str(spec.label)
            got = ex.wait(timeout=0.5)  # a timeout keeps Ctrl-C prompt
            if got is None:
                continue
            slot, reply = got
            spec, run_id, run_dir, t0 = inflight.pop(slot)
            metrics, error = None, None
            try:
                metrics = _metrics_of_reply(spec, run_dir, reply)
            except Exception as e:  # noqa: BLE001 - any failure of one run is recorded, the sweep goes on
                error = str(e) if isinstance(e, ParetuneError) else f"{type(e).__name__}: {e}"
            done += 1
            _record(done, len(todo), spec, run_id, metrics, error, time.perf_counter() - t0, store, env, result, say)
            bar.update(1)
    except BaseException:
        ex.close()  # kills the workers: no training outlives an interrupted or failed sweep
        raise
    if owned:
        ex.close()


# -- the whole bench ------------------------------------------------------------------------

def load_model_for(model: str, task_kind: str) -> nn.Module:
    """The model the runs will train, loaded once here to count parameters per budget. A model
    that cannot do ``task_kind`` (generation on an encoder-only model) is a ParetuneError naming
    what is supported (:func:`paretune.bench.data.check_model_kind`)."""
    from .. import models
    from .data import check_model_kind

    check_model_kind(model, task_kind)
    try:
        if task_kind == "classification":
            net, _ = models.load(model, task="classification", num_labels=2)  # the head is not a target
        else:
            net, _ = models.load(model, task="causal-lm")
    except ParetuneError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise ParetuneError(f"{model} could not be loaded for {task_kind} ({type(e).__name__}: {e}); "
                            "classification runs on encoder models and causal LMs, generation on causal LMs.") from None
    return net
