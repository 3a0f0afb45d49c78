"""Intrinsic dimension of a model on a task, measured by training in random subspaces.

Li et al. (2018), "Measuring the Intrinsic Dimension of Objective Landscapes": train only
``d`` coordinates of a random affine subspace of the weights, θ = θ0 + P·d, for increasing d;
the intrinsic dimension d_int90 is the smallest d whose solution reaches 90% of the quality of
training every parameter. Aghajanyan et al. (2020), "Intrinsic Dimensionality Explains the
Effectiveness of Language Model Fine-Tuning", measure it for fine-tuning pretrained models, where
θ0 is the pretrained model, with SAID (one learned scale per adapted layer, ``said=True``).

What :func:`intrinsic_dimension` does, with its choices stated:

* One full run (every parameter trains: the baseline; on a classification task its new head at
  the bench's head rate, 5e-3, as the bench's ``full`` baseline), then one run per ``d`` in ``dims``
  (ascending), each on a fresh copy of the same θ0 adapted with the ``subspace`` method
  (``paretune.adapt(model, "subspace", dim=d, ...)``), evaluated on the task's held-out split.
* θ0: for ``digits-mlp``, the seeded random init of the MLP (the paper trains from scratch in the
  subspace); for a text model, the pretrained weights, with the classification head initialised
  from the seed. Every run of one measurement starts from the same θ0.
* Subspace targets: every Linear layer, the output layer included (``digits-mlp``: fc1, fc2,
  fc3; a classification model: every ``nn.Linear``, the classifier head included, so the head
  trains only through the subspace, as in SAID). The adapted layers' weights and biases are in
  the subspace; embeddings and LayerNorms stay at θ0. On a generation task the output head,
  tied to the input embeddings in the bundled models, stays at θ0 too.
* d90 = the smallest *measured* d whose metric is >= 0.9 x the full run's metric. No
  interpolation between measured d: the true d_int90 lies between the previous measured d and
  d90. None when no measured d reaches the threshold (measure larger d).
* Every run is a row of the bench's results store (``OUT/runs.sqlite``, see
  :mod:`paretune.bench.store`), keyed like the bench's runs: a run already finished with the same
  settings is read back, not trained again; rerunning an interrupted measurement resumes it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..bench.sweep import RunSpec, run_dir_for
from ..errors import ParetuneError
from . import digits as _digits

METHOD = "subspace"
FRACTION = 0.9  # Li et al.'s d_int90
DEFAULT_OUT = "intrinsic-out"
PROJECTIONS = ("dense", "fastfood")

# Defaults per kind of task (stated choices; every one can be overridden).
# digits: 1,000 steps of batch 64 (about 45 epochs of the 1,438 training images); the subspace
# coordinates train at a higher rate than the full model's weights. The projection when none is
# given: dense for digits-mlp (Li et al.'s choice for small networks), Fastfood for text models
# (Li et al.'s choice for large ones, and SAID's).
DIGITS_DEFAULTS = {"steps": 1000, "batch_size": 64, "lr": 1e-2, "full_lr": 1e-3, "projection": "dense"}
# text: the bench's steps and batch; the learning rates are the bench's per-method defaults
# (paretune.bench.sweep.default_lr) for "subspace" and "full".
TEXT_DEFAULTS = {"steps": 300, "batch_size": 32, "projection": "fastfood"}


@dataclasses.dataclass(frozen=True)
class MeasureSpec(RunSpec):
    """A :class:`paretune.bench.sweep.RunSpec` that also keys on ``max_train`` (the bench always
    trains on the whole training split)."""

    max_train: int | None = None

    def canonical(self) -> dict[str, Any]:
        out = super().canonical()
        if self.max_train is not None:
            out["max_train"] = self.max_train
        return out


@dataclasses.dataclass
class RunRecord:
    """One run of a measurement: ``d`` is None for the full run."""

    d: int | None
    metric: float
    trainable: int
    seconds: float  # training seconds (as recorded when the run was trained)
    reused: bool  # read back from the store, not trained this time
    key: str
    run_dir: str | None = None


@dataclasses.dataclass
class IntrinsicResult:
    model: str
    task: str
    metric_name: str
    runs: list[RunRecord]  # the subspace runs, by increasing d
    full: RunRecord
    fraction: float
    threshold: float  # fraction x the full run's metric
    d90: int | None
    message: str  # d90 in words (or why there is none)
    settings: dict[str, Any]
    store_path: Path
    png_path: Path | None = None
    html_path: Path | None = None

    @property
    def trained(self) -> int:
        """Runs trained by this call (the others were read back from the store)."""
        return sum(not r.reused for r in [self.full, *self.runs])


# -- pure pieces ------------------------------------------------------------------------------

def parse_dims(dims: str | Iterable[Any]) -> list[int]:
    """``"10,100,1000"`` or a sequence of integers -> the sorted list of distinct dimensions.

    Empty input, a non-integer or a d < 1 is a :class:`ParetuneError` naming it."""
    if isinstance(dims, str):
        parts = [p.strip() for p in dims.split(",") if p.strip()]
        values: list[Any] = []
        for p in parts:
            try:
                values.append(int(p))
            except ValueError:
                raise ParetuneError(f"--dims {dims!r}: {p!r} is not an integer; give positive integers separated "
                                    "by commas, e.g. --dims 10,100,1000.") from None
    else:
        values = list(dims)
    if not values:
        raise ParetuneError("dims is empty; give at least one subspace dimension, e.g. --dims 10,100,1000.")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ParetuneError(f"dims: {v!r} is not a positive integer; every subspace dimension must be an "
                                "integer >= 1, e.g. --dims 10,100,1000.")
    return sorted(set(values))


def find_d90(metrics_by_d: Mapping[int, float], full: float, fraction: float = FRACTION) -> int | None:
    """The smallest measured d whose metric is >= ``fraction`` x ``full`` (Li et al.'s d_int90,
    without interpolation between measured d); None when none reaches it."""
    if not 0 < fraction <= 1:
        raise ParetuneError(f"fraction={fraction!r}: give a fraction in (0, 1], e.g. 0.9.")
    threshold = fraction * full
    for d in sorted(metrics_by_d):
        m = metrics_by_d[d]
        if m is not None and m == m and m >= threshold:
            return int(d)
    return None


def d90_message(d90: int | None, dims: Sequence[int], metric: str, threshold: float, fraction: float = FRACTION) -> str:
    pct = f"{fraction:.0%}"
    if d90 is None:
        return (f"no measured d reaches {pct} of the full run's {metric} ({threshold:.4f}); d90 is above "
                f"{max(dims):,}: measure larger dims.")
    below = [d for d in dims if d < d90]
    where = f"between {below[-1]:,} (exclusive) and {d90:,}" if below else f"at most {d90:,}"
    return (f"d90 = {d90:,}: the smallest measured d reaching {pct} of the full run's {metric} ({threshold:.4f}); "
            f"the intrinsic dimension lies {where} (no interpolation between measured d).")


def adapted_parameter_count(model: nn.Module, targets: Sequence[str]) -> int:
    """Parameters (weights and biases) of the modules ``targets`` names: the size of the space
    the subspace lives in."""
    return sum(p.numel() for t in targets for p in model.get_submodule(t).parameters())


def linear_targets(model: nn.Module, *, include_head: bool = True) -> list[str]:
    """Names of every Linear (and GPT-2 Conv1D) layer of ``model``; ``include_head=False`` leaves
    the output head out."""
    from ..core.inject import LINEAR_KINDS, iter_modules, kind_of, output_head_names

    heads = set() if include_head else output_head_names(model)
    return [n for n, m in iter_modules(model) if n and kind_of(m) in LINEAR_KINDS and n not in heads]


def check_dims(model: nn.Module, targets: Sequence[str], dims: Sequence[int], *, projection: str = "dense",
               said: bool = False, seed: int = 0) -> None:
    """Refuse, before any training, a d the subspace method would refuse on these layers: larger
    than their parameter count (weights and biases), or, with SAID, not above the number of
    layers (SAID counts one scale per layer in d). Raises the method's own ConfigError."""
    from ..core import registry
    from ..methods.subspace import check_dim

    config_cls = registry.get(METHOD).config_cls
    sizes = [sum(p.numel() for p in model.get_submodule(t).parameters()) for t in targets]
    for d in dims:
        check_dim(config_cls.from_dict({"dim": d, "projection": projection, "said": said, "seed": seed}), sizes)


# -- the two kinds of problem -----------------------------------------------------------------

@dataclasses.dataclass
class _Problem:
    model: str
    task: str
    metric: str
    base: nn.Module  # θ0
    targets: list[str]
    defaults: dict[str, Any]
    train: Callable[[nn.Module, str, dict, Sequence[str] | None, dict], dict]  # (copy, method, options, targets, hp)
    max_eval: int | None = None
    max_train: int | None = None
    full_head_lr: float | None = None  # the full run's task-head rate (the bench's full baseline recipe)


def _digits_problem(seed: int) -> _Problem:
    split = _digits.load_split()

    def train(net, method, options, targets, hp):
        return _digits.train_digits(net, split, method=method, options=options, targets=targets or _digits.TARGETS,
                                    steps=hp["steps"], lr=hp["lr"], batch_size=hp["batch_size"], seed=hp["seed"],
                                    progress=hp["progress"])

    return _Problem(_digits.MODEL_NAME, _digits.TASK_NAME, "accuracy", _digits.make_mlp(seed),
                    list(_digits.TARGETS), dict(DIGITS_DEFAULTS), train)


def _text_problem(model: str, task: str, seed: int, max_train: int | None, max_eval: int | None) -> _Problem:
    from .. import models
    from ..bench.sweep import HEAD_LR, default_lr
    from ..data.tasks import get_task
    from ..training.trainer import train as train_text

    t = get_task(task)
    for flag, v in (("--max-train", max_train), ("--max-eval", max_eval)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ParetuneError(f"{flag} {v!r} is invalid; give a number of examples >= 1.")
    train_ds, eval_ds = t.splits()
    train_ds, eval_ds = train_ds.head(max_train), eval_ds.head(max_eval)
    classification = t.kind == "classification"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the new classification head's init
        net, tokenizer = models.load(model, task="classification" if classification else "causal-lm",
                                     num_labels=len(train_ds.labels()) if classification else None)
    targets = linear_targets(net, include_head=classification)

    def train(copy_, method, options, targets_, hp):
        result = train_text(copy_, train_ds, eval_ds, tokenizer=tokenizer, method=method, options=options,
                            targets=list(targets_) if targets_ else None, train_head=False, steps=hp["steps"],
                            lr=hp["lr"], head_lr=hp.get("head_lr"), batch_size=hp["batch_size"], seed=hp["seed"],
                            progress=hp["progress"])
        return dict(result.metrics, train_examples=len(train_ds), eval_examples=len(eval_ds))

    defaults = dict(TEXT_DEFAULTS, lr=default_lr(METHOD), full_lr=default_lr("full"))
    head_lr = HEAD_LR if classification else None
    return _Problem(model, task, t.metric, net, targets, defaults, train, max_eval, max_train, head_lr)


def _problem(model: str | None, task: str | None, seed: int, max_train: int | None, max_eval: int | None) -> _Problem:
    digits_model, digits_task = _digits.MODEL_NAME, _digits.TASK_NAME
    if task is None:
        raise ParetuneError(f"give a task: {digits_task!r} (scikit-learn's digits, with model {digits_model!r}) or a "
                            "built-in text task such as 'city-continent'.")
    if task == digits_task or model == digits_model:
        if model not in (None, digits_model) or task != digits_task:
            raise ParetuneError(f"model {digits_model!r} trains only on task {digits_task!r} and task {digits_task!r} "
                                f"only with model {digits_model!r}; got model {model!r} and task {task!r}.")
        if max_train is not None or max_eval is not None:
            raise ParetuneError(f"--max-train / --max-eval apply to text tasks; the {digits_task} split is fixed.")
        return _digits_problem(seed)
    from ..data.tasks import get_task

    model = model or get_task(task).default_model
    return _text_problem(model, task, seed, max_train, max_eval)


# -- the measurement --------------------------------------------------------------------------

def _check_method(dims: Sequence[int], projection: str, said: bool, seed: int) -> None:
    """The subspace method is registered and accepts these options (its own checks, before any
    training)."""
    from ..core import registry

    spec = registry.get(METHOD)
    for d in dims:
        spec.config_cls.from_dict({"dim": d, "projection": projection, "said": said, "seed": seed})


def _stored_bytes(net: nn.Module, method: str) -> int:
    """Bytes a run's result takes to store: every parameter for the full run, the adapter's
    tensors (θ_d, SAID's scales) for a subspace run, as ``paretune train`` counts them."""
    if method == "full":
        return sum(p.numel() * p.element_size() for p in net.parameters())
    from ..core.accounting import count

    return int(count(net)["stored_bytes"])


def _fresh(base: nn.Module) -> nn.Module:
    return copy.deepcopy(base)


def _finished_metrics(store, key: str) -> dict[str, Any] | None:
    row = store.conn.execute("SELECT id FROM runs WHERE key = ? AND status = 'finished'", (key,)).fetchone()
    if row is None:
        return None
    return dict(store.conn.execute("SELECT name, value FROM metrics WHERE run_id = ?", (row["id"],)).fetchall())


def intrinsic_dimension(
    model: str | None,
    task: str | None,
    dims: str | Iterable[int],
    *,
    out: str | Path = DEFAULT_OUT,
    steps: int | None = None,
    lr: float | None = None,
    full_lr: float | None = None,
    batch_size: int | None = None,
    projection: str | None = None,
    said: bool = False,
    seed: int = 0,
    max_train: int | None = None,
    max_eval: int | None = None,
    store_path: str | Path | None = None,
    report: bool = True,
    quiet: bool = False,
    echo: Callable[[str], None] | None = None,
) -> IntrinsicResult:
    """Measure d90 of ``model`` on ``task`` over the subspace dimensions ``dims``.

    ``model`` / ``task``: ``"digits-mlp"`` / ``"digits"`` (scikit-learn's digits, see
    :mod:`paretune.measure.digits`), or a text model (a bundled name such as ``"minilm-l6"`` or a
    local folder; default: the task's model) and a built-in task (``"city-continent"``).
    ``dims``: positive integers (or ``"10,100,1000"``); duplicates are dropped and they run in
    increasing order. ``lr`` is the subspace runs' peak learning rate, ``full_lr`` the full run's;
    ``steps`` / ``batch_size`` are shared by every run (defaults per kind: ``DIGITS_DEFAULTS``,
    ``TEXT_DEFAULTS``). ``projection`` / ``said`` / ``seed`` go to the subspace method; ``seed``
    also fixes θ0 and the data order. ``max_train`` / ``max_eval`` (text tasks) keep the first N
    examples of each split.

    Writes ``out/runs.sqlite`` (or ``store_path``), ``out/intrinsic-dim.png`` and
    ``out/intrinsic-dim.html``. Returns an :class:`IntrinsicResult`.
    """
    from ..bench.store import Store, environment
    from ..core.atomic import atomic_write_text

    say = echo if echo is not None else (lambda line: print(line, flush=True))
    if quiet:
        say = lambda line: None  # noqa: E731
    dims = parse_dims(dims)
    if projection is not None and projection not in PROJECTIONS:
        raise ParetuneError(f"projection={projection!r}: choose one of {', '.join(PROJECTIONS)} (or leave it unset: "
                            "dense for digits-mlp, fastfood for text models).")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ParetuneError(f"seed={seed!r}: give an integer.")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ParetuneError(f"--out {out} is a file; give a folder (it will hold runs.sqlite and the report).")
    _check_method(dims, projection or PROJECTIONS[0], said, seed)  # before loading anything
    prob = _problem(model, task, seed, max_train, max_eval)
    projection = projection or prob.defaults["projection"]
    steps = steps if steps is not None else prob.defaults["steps"]
    batch_size = batch_size if batch_size is not None else prob.defaults["batch_size"]
    lr = float(lr) if lr is not None else float(prob.defaults["lr"])
    full_lr = float(full_lr) if full_lr is not None else float(prob.defaults["full_lr"])
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise ParetuneError(f"--steps {steps!r} is invalid; give an integer >= 1.")
    if not (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1):
        raise ParetuneError(f"--batch-size {batch_size!r} is invalid; give an integer >= 1.")
    for flag, v in (("--lr", lr), ("--full-lr", full_lr)):
        if not v > 0:
            raise ParetuneError(f"{flag} {v!r} is invalid; give a learning rate > 0.")
    adapted = adapted_parameter_count(prob.base, prob.targets)
    check_dims(prob.base, prob.targets, dims, projection=projection, said=said, seed=seed)

    targets = tuple(prob.targets)
    full_spec = MeasureSpec(prob.model, prob.task, "full", {}, None, seed, steps, full_lr, batch_size, None, None,
                            prob.max_eval, prob.full_head_lr, prob.max_train)
    sub_specs = [MeasureSpec(prob.model, prob.task, METHOD,
                             {"dim": d, "projection": projection, "said": said, "seed": seed}, d, seed, steps, lr,
                             batch_size, targets, d, prob.max_eval, None, prob.max_train) for d in dims]
    hp_common = {"steps": steps, "batch_size": batch_size, "seed": seed,
                 "progress": not quiet and sys.stderr.isatty()}
    say(f"intrinsic-dim: {prob.model} on {prob.task}; full run + subspace dims {', '.join(f'{d:,}' for d in dims)} "
        f"over {len(targets)} layer(s) ({adapted:,} parameters); {steps} steps, batch {batch_size}; results in "
        f"{Path(store_path) if store_path else out / 'runs.sqlite'}")
    out.mkdir(parents=True, exist_ok=True)
    env = None
    records: list[RunRecord] = []
    with Store(Path(store_path) if store_path else out) as store:
        total = 1 + len(sub_specs)
        for i, (rs, d) in enumerate([(full_spec, None), *((s, s.options["dim"]) for s in sub_specs)], 1):
            label = "full" if d is None else f"subspace d={d:,}"
            run_id, status = store.plan(rs)
            run_dir = run_dir_for(out, rs)
            metrics = _finished_metrics(store, rs.key) if status == "finished" else None
            reused = metrics is not None
            if metrics is None:
                env = env or environment()
                store.start(run_id, run_dir)
                hp = dict(hp_common, lr=full_lr if d is None else lr)
                if d is None and prob.full_head_lr is not None:
                    hp["head_lr"] = prob.full_head_lr
                try:
                    net = _fresh(prob.base)
                    t0 = time.perf_counter()
                    metrics = prob.train(net, rs.method, dict(rs.options), None if d is None else targets, hp)
                    metrics.setdefault("train_seconds", time.perf_counter() - t0)
                    metrics.setdefault("stored_bytes", _stored_bytes(net, rs.method))
                    del net
                except Exception as e:
                    store.fail(run_id, str(e) if isinstance(e, ParetuneError) else f"{type(e).__name__}: {e}", env)
                    raise
                metrics = dict(metrics, metric=prob.metric)
                if d is not None:
                    metrics["dim"] = d
                run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(run_dir / "metrics.json", json.dumps(
                    {"method": rs.method, "options": rs.options, "model": prob.model, "task": prob.task,
                     "seed": seed, "lr": rs.lr, "batch_size": batch_size, **metrics}, indent=2, default=str) + "\n")
                store.finish(run_id, metrics, env)
            value = float(metrics[prob.metric])
            rec = RunRecord(d, value, int(metrics.get("trainable", 0)), float(metrics.get("train_seconds") or 0.0),
                            reused, rs.key, str(run_dir))
            records.append(rec)
            tail = "reused from the store" if reused else f"{rec.seconds:.1f} s train"
            say(f"[{i}/{total}] {label}: {prob.metric}={value:.4f}, trainable={rec.trainable:,}, {tail}")
        db = store.path
    full, runs = records[0], records[1:]
    threshold = FRACTION * full.metric
    d90 = find_d90({r.d: r.metric for r in runs}, full.metric)
    message = d90_message(d90, dims, prob.metric, threshold)
    settings = {"model": prob.model, "task": prob.task, "dims": dims, "targets": list(targets),
                "adapted_parameters": adapted, "steps": steps, "batch_size": batch_size, "lr": lr,
                "full_lr": full_lr, "projection": projection, "said": said, "seed": seed,
                "max_train": prob.max_train, "max_eval": prob.max_eval}
    result = IntrinsicResult(prob.model, prob.task, prob.metric, runs, full, FRACTION, threshold, d90, message,
                             settings, db)
    if report:
        from .report import write_report

        result.png_path, result.html_path = write_report(result, out)
    say(message)
    if report:
        say(f"plot:    {result.png_path}")
        say(f"report:  {result.html_path}")
    return result
