"""The trainer: ``paretune.train`` on accelerate (CPU, one GPU, or many processes through
``accelerate launch`` / ``torchrun``; bf16 on GPU), with gradient accumulation, a warm-up + decay
lr schedule, held-out evaluation, checkpoint + resume, a progress bar and per-step hooks.

Choices, stated:

* ``batch_size`` is the global batch of one optimizer step; it is split evenly across processes
  and then into ``grad_accum`` micro-batches, so a run's result does not depend on how many
  processes ran it (tested: 2 CPU processes == 1 process).
* The loss of a step is the mean over its loss units (examples for classification, completion
  tokens for generation) of the whole global batch, whatever the micro-batching.
* Data order comes from ``seed`` and the step alone, so a resumed run sees the batches an
  uninterrupted run would.
* Hooks after every optimizer step: each active adapter's ``on_step(step, total_steps)`` (method
  schedules: rank growth, freezing, alternation) while the step's gradients are still there, then
  the caller's ``on_step(step, model, optimizer)``. Parameters that appear in a hook (rank growth)
  join the optimizer as a new parameter group at the adapters' learning rate (one process only).
* Divergence: a non-finite training loss (task or auxiliary) or gradient norm stops the run
  with :class:`~paretune.errors.DivergedError` before the optimizer applies that step (so the
  last checkpoint stays finite), and so does a non-finite trained tensor or held-out metric at
  the end. The gradient norm is always computed (clipping at ``max_grad_norm``; with
  ``max_grad_norm=0`` the norm is computed and the gradients are left as they are).
* Resume: a checkpoint records the run's options (method, options, targets, name, lr, head_lr,
  batch_size, grad_accum, weight_decay, warmup, schedule, max_grad_norm, max_length, seed,
  train_head, bitnet, bitnet_targets, the model's class and a hash of the encoded training
  data); resuming with any of them changed is refused naming them. ``steps`` may be raised (the
  lr schedule and the adapters' schedules then follow the new total) but not set below the
  checkpoint's step. The number of processes and the mixed precision may differ.
* Held-out evaluation every ``eval_every`` steps (0: only at the end): ``metrics["eval_history"]``
  lists ``{"step", "eval_loss", metric}`` for each, the final evaluation included.
* Auxiliary losses: after each forward pass, the active adapters' ``aux_loss()`` (a router's load
  balance, an orthogonality penalty) are added to the task loss, averaged over micro-batches and
  processes; their value per step is ``TrainResult.aux_history`` and ``metrics["aux_loss"]``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import resource
import sys
import time
from contextlib import nullcontext
from typing import Any, Callable

import torch
from torch import nn

from ..api import adapt
from ..core.delta import Delta
from ..core.inject import hosts, output_head_names
from ..data.examples import load_data
from ..errors import ConfigError, DivergedError, ParetuneError
from .batching import Encoded, collate, encode, summed_loss
from .checkpoint import fingerprint, has_checkpoint, load_checkpoint, save_checkpoint
from .schedule import lr_factor

BASELINES = ("head", "full")  # the task head alone, full fine-tuning; the bench runs and lists them in this order


@dataclasses.dataclass
class TrainResult:
    metrics: dict[str, Any]
    history: list[float]  # training loss per optimizer step (the task loss, without auxiliary losses)
    model: nn.Module
    aux_history: list[float] = dataclasses.field(default_factory=list)  # summed auxiliary losses per step


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this run: CUDA bytes allocated on GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def head_modules(model: nn.Module) -> list[str]:
    """Names of the task head(s): the output layer a classification model adds."""
    return sorted(output_head_names(model))


def _param_groups(model: nn.Module, params: list, lr: float, head_lr: float | None) -> list[dict]:
    """One AdamW group at ``lr``, or two when the task head has its own ``head_lr``."""
    if head_lr is None:
        return [{"params": params, "peak_lr": lr}]
    if not head_lr > 0:
        raise ParetuneError(f"head_lr={head_lr!r}: give a learning rate > 0.")
    head = {id(p) for h in head_modules(model) for p in model.get_submodule(h).parameters()}
    groups = [{"params": [p for p in params if id(p) not in head], "peak_lr": lr},
              {"params": [p for p in params if id(p) in head], "peak_lr": head_lr, "lr": head_lr}]
    return [g for g in groups if g["params"]]


def _set_trainable(model: nn.Module, method: str | None, options: dict, targets, name: str, kind: str,
                   train_head: bool | str) -> None:
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return
    if method == "head":
        for p in model.parameters():
            p.requires_grad_(False)
        train_head = True
    elif method is not None:
        adapt(model, method, name=name, targets=targets, **options)
    if train_head == "auto":
        train_head = kind == "classification"
    if train_head:
        heads = head_modules(model)
        if not heads:
            raise ParetuneError("found no task head (a module named classifier / score / lm_head) to train; "
                                "pass train_head=False.")
        for h in heads:
            for p in model.get_submodule(h).parameters():
                p.requires_grad_(True)


def _aux_loss(deltas: list[Delta]) -> torch.Tensor | None:
    """The sum of the adapters' auxiliary losses from the forward pass just run (None: none)."""
    losses = [a for a in (d.aux_loss() for d in deltas) if a is not None]
    return torch.stack([a.float() for a in losses]).sum() if losses else None


def _adopt_new_parameters(model: nn.Module, optimizer, params: list, lr: float, world: int) -> None:
    """Parameters that a schedule created (rank growth) join the optimizer as one new group."""
    known = {id(p) for g in optimizer.param_groups for p in g["params"]}
    new = [p for p in model.parameters() if p.requires_grad and id(p) not in known]
    if not new:
        return
    if world > 1:
        raise ParetuneError("an adapter grew new parameters during a multi-process run, which the "
                            "processes' gradient synchronisation cannot follow; train it in one process.")
    optimizer.add_param_group({"params": new, "lr": lr, "peak_lr": lr})
    params.extend(new)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(steps: int, lr: float, batch_size: int, grad_accum: int, world: int, *, weight_decay: float = 0.0,
           warmup: float = 0.0, schedule: str = "linear", max_grad_norm: float = 0.0, eval_every: int = 0,
           head_lr: float | None = None) -> None:
    """Refuse run options out of range (every number must be finite) before any work."""
    from .schedule import SCHEDULES

    if not (isinstance(steps, int) and steps >= 1):
        raise ParetuneError(f"steps={steps!r}: give an integer >= 1.")
    if not (_finite(lr) and lr > 0):
        raise ConfigError(f"lr={lr!r}: give a finite learning rate > 0 (e.g. 1e-3).")
    if head_lr is not None and not (_finite(head_lr) and head_lr > 0):
        raise ConfigError(f"head_lr={head_lr!r}: give a finite learning rate > 0.")
    if not (_finite(weight_decay) and weight_decay >= 0):
        raise ConfigError(f"weight_decay={weight_decay!r}: give a finite number >= 0.")
    if not (_finite(warmup) and warmup >= 0):
        raise ConfigError(f"warmup={warmup!r}: give a fraction of the steps in [0, 1) or a number of steps >= 1.")
    if not (_finite(max_grad_norm) and max_grad_norm >= 0):
        raise ConfigError(f"max_grad_norm={max_grad_norm!r}: give a finite number >= 0 (0: no clipping).")
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown lr schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}.")
    if not (isinstance(eval_every, int) and not isinstance(eval_every, bool) and eval_every >= 0):
        raise ConfigError(f"eval_every={eval_every!r}: give an integer >= 0 (0: evaluate only at the end).")
    if not (isinstance(batch_size, int) and batch_size >= 1 and grad_accum >= 1):
        raise ParetuneError(f"batch_size={batch_size!r}, grad_accum={grad_accum!r}: give integers >= 1.")
    if batch_size % (world * grad_accum):
        raise ParetuneError(
            f"batch_size={batch_size} must divide evenly over {world} process(es) x grad_accum={grad_accum}; "
            f"use a multiple of {world * grad_accum}."
        )


def _data_hash(enc: Encoded) -> str:
    """A short SHA-256 of the encoded training data (token ids, labels, prompt lengths)."""
    text = json.dumps([enc.kind, enc.ids, enc.labels, enc.prompt_lens, enc.label_names])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_finite(step: int, loss: float, aux: float, grad_norm: float, lr: float) -> None:
    """DivergedError when the step's loss, auxiliary loss or gradient norm is inf or NaN."""
    for what, v in (("loss", loss), ("auxiliary loss", aux), ("gradient norm", grad_norm)):
        if not math.isfinite(v):
            raise DivergedError(f"step {step}: the {what} is {v} (training diverged); nothing of this step was "
                                f"applied or saved. Train again with a lower learning rate (--lr) than {lr:g}.")


def _check_metrics(step: int, metrics: dict[str, float], lr: float) -> None:
    """DivergedError when a held-out metric is inf or NaN."""
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        raise DivergedError(f"step {step}: held-out {', '.join(f'{k}={v}' for k, v in bad.items())} (training "
                            f"diverged). Train again with a lower learning rate (--lr) than {lr:g}.")


class _EpochOrder:
    """The example indices of each optimizer step: a fresh permutation per epoch, drawn from
    (seed, epoch) alone, so any step's batch is known without replaying the run."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.cache = n, seed, {}

    def rows(self, step: int, batch_size: int) -> list[int]:
        out = []
        for pos in range(step * batch_size, (step + 1) * batch_size):
            epoch, k = divmod(pos, self.n)
            if epoch not in self.cache:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self.cache = {epoch: torch.randperm(self.n, generator=g).tolist()}
            out.append(self.cache[epoch][k])
        return out


@torch.no_grad()
def evaluate(model: nn.Module, enc: Encoded, pad_id: int, device: torch.device, batch_size: int = 64,
             autocast: Callable | None = None, progress: bool = False) -> dict[str, float]:
    """Held-out loss (mean per unit) and the task metric: accuracy (classification) or exact
    match of the whole completion under greedy decoding (generation; computed in one forward
    pass: greedy decoding reproduces the completion iff every completion token is the argmax
    given the true prefix). ``progress`` shows a bar over the evaluation batches."""
    from ..progress import bar

    was_training = model.training
    model.eval()
    total_loss, units, right = 0.0, 0, 0
    starts = range(0, len(enc), batch_size)
    try:
        for start in bar(starts, desc="evaluate", unit="batch", leave=False, enabled=progress):
            rows = list(range(start, min(start + batch_size, len(enc))))
            batch = collate(enc, rows, pad_id, device)
            with autocast() if autocast else nullcontext():
                loss, correct = summed_loss(model, batch, enc.kind)
            total_loss += float(loss)
            units += enc.loss_units(rows)
            right += int(correct.all(dim=-1).sum()) if enc.kind == "generation" else int(correct.sum())
    finally:
        model.train(was_training)
    name = "accuracy" if enc.kind == "classification" else "exact_match"
    return {"eval_loss": total_loss / max(1, units), name: right / max(1, len(enc))}


def train(
    model: nn.Module,
    train_data: Any,
    eval_data: Any = None,
    *,
    tokenizer,
    method: str | None = None,
    options: dict | None = None,
    targets=None,
    name: str = "default",
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int = 16,
    grad_accum: int = 1,
    weight_decay: float = 0.0,
    warmup: float = 0.06,
    schedule: str = "linear",
    max_grad_norm: float = 1.0,
    max_length: int = 64,
    eval_batch_size: int = 64,
    seed: int = 0,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    eval_every: int = 0,
    mixed_precision: str = "auto",
    train_head: bool | str = "auto",
    head_lr: float | None = None,
    on_step: Callable[[int, nn.Module, torch.optim.Optimizer], None] | None = None,
    progress: bool = True,
    bitnet: bool = False,
    bitnet_targets=None,
) -> TrainResult:
    """Fine-tune ``model`` on ``train_data`` and evaluate on ``eval_data``.

    Data: a CSV/JSONL path, a list of dicts or a ``datasets.Dataset`` with ``text,label``
    (classification; the model must output ``len(labels)`` logits) or ``prompt,completion``
    (generation with a causal LM). ``method``: ``None`` trains what is already trainable (e.g.
    after ``paretune.adapt``), a method name adapts first with ``options`` and ``targets``,
    ``"head"`` trains the task head only (frozen base) and ``"full"`` every parameter.
    ``train_head="auto"`` also trains a classification head with any adapter method;
    ``head_lr`` gives the task head its own peak learning rate (default: ``lr``), so that runs
    of different methods can train their common head alike.
    ``bitnet=True`` trains BitNet b1.58 layers (:func:`paretune.compress.bitnet.to_bitnet`: ternary
    weights, 8-bit activations, straight-through gradients) in place of the Linears of
    ``bitnet_targets`` (default every Linear but the output head), usually with ``method="full"`` as
    the paper trains the whole model; :func:`paretune.compress.freeze_ternary` stores the result.
    ``eval_every=N`` also evaluates on ``eval_data`` every N steps (``metrics["eval_history"]``).
    ``checkpoint_dir`` / ``checkpoint_every`` / ``resume``: see the module docstring (a resumed
    run equals an uninterrupted one bit for bit).
    Returns a :class:`TrainResult` whose ``metrics`` hold train_seconds, peak_memory_bytes,
    train_loss, eval_loss and the task metric. Raises :class:`~paretune.errors.DivergedError`
    when the loss, the gradient norm or a trained tensor becomes non-finite.
    """
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    if mixed_precision == "auto":
        mixed_precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    acc = Accelerator(mixed_precision=mixed_precision, cpu=not cuda)
    world, rank = acc.num_processes, acc.process_index
    _check(steps, lr, batch_size, grad_accum, world, weight_decay=weight_decay, warmup=warmup, schedule=schedule,
           max_grad_norm=max_grad_norm, eval_every=eval_every, head_lr=head_lr)
    train_ds = load_data(train_data)
    eval_ds = load_data(eval_data, kind=train_ds.kind) if eval_data is not None else None
    if tokenizer is None:
        raise ParetuneError("train needs the model's tokenizer (tokenizer=...).")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    labels = train_ds.labels() if train_ds.kind == "classification" else None
    enc = encode(train_ds, tokenizer, labels=labels, max_length=max_length)
    enc_eval = encode(eval_ds, tokenizer, labels=labels, max_length=max_length) if eval_ds is not None else None
    if labels is not None:
        n_out = getattr(getattr(model, "config", None), "num_labels", None)
        if n_out is not None and n_out != len(labels):
            raise ParetuneError(f"the model has {n_out} output labels but the data has {len(labels)} "
                                f"({', '.join(labels[:8])}...); load it with num_labels={len(labels)}.")
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {v: k for k, v in enumerate(labels)}

    torch.manual_seed(seed)  # the same adapter init on every process
    if bitnet:
        from ..compress.bitnet import prepare_bitnet_training

        prepare_bitnet_training(model, bitnet_targets)
    _set_trainable(model, method, dict(options or {}), targets, name, train_ds.kind, train_head)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ParetuneError("nothing to train: no parameter requires grad. Adapt the model or pass method=.")
    optimizer = torch.optim.AdamW(_param_groups(model, params, lr, head_lr), lr=lr, weight_decay=weight_decay)
    model.train()
    start_step, history, aux_history, eval_history = 0, [], [], []
    run = fingerprint(method=method, options=dict(options or {}), targets=targets, name=name, lr=lr, head_lr=head_lr,
                      batch_size=batch_size, grad_accum=grad_accum, weight_decay=weight_decay, warmup=warmup,
                      schedule=schedule, max_grad_norm=max_grad_norm, max_length=max_length, seed=seed,
                      train_head=train_head, bitnet=bitnet, bitnet_targets=bitnet_targets,
                      model=type(model).__name__, data=_data_hash(enc))
    if resume and checkpoint_dir and has_checkpoint(checkpoint_dir):
        state = load_checkpoint(checkpoint_dir, model, optimizer, run=run, steps=steps)
        start_step, history, aux_history = state["step"], state["history"], state.get("aux_history", [])
        eval_history = state.get("eval_history", [])
        params = [p for g in optimizer.param_groups for p in g["params"]]  # with any grown ones
    model, optimizer = acc.prepare(model, optimizer)
    raw = acc.unwrap_model(model)
    deltas = [d for _, h in hosts(raw) for d in h.active_deltas()]  # on_step: schedules over training
    for d in deltas if start_step else ():  # a resumed run: schedules pick up where they were
        d.on_step(start_step, steps)
    if cuda:
        torch.cuda.reset_peak_memory_stats(acc.device)

    order = _EpochOrder(len(enc), seed)
    per_rank = batch_size // world
    micro = per_rank // grad_accum
    warmup_steps = int(math.ceil(warmup * steps)) if warmup < 1 else int(warmup)
    bar = None
    show = progress and acc.is_main_process
    if show:
        from ..progress import bar as progress_bar

        bar = progress_bar(total=steps, desc=f"train {method or 'model'}", unit="step", leave=True)
        bar.update(start_step)
    t0 = time.perf_counter()
    for step in range(start_step, steps):
        rows = order.rows(step, batch_size)
        units = enc.loss_units(rows)
        mine = rows[rank * per_rank:(rank + 1) * per_rank]
        for g in optimizer.param_groups:
            g["lr"] = g["peak_lr"] * lr_factor(step, steps, warmup_steps, schedule)
        step_loss, step_aux = 0.0, 0.0
        for k in range(grad_accum):
            part = mine[k * micro:(k + 1) * micro]
            batch = collate(enc, part, pad_id, acc.device)
            sync = k == grad_accum - 1
            with (acc.no_sync(model) if not sync and world > 1 else nullcontext()), acc.autocast():
                loss_sum, _ = summed_loss(model, batch, enc.kind)
                loss = loss_sum / units * world
                aux = _aux_loss(deltas)
                if aux is not None:
                    loss = loss + aux / grad_accum
                    step_aux += float(aux.detach()) / grad_accum
            acc.backward(loss)
            step_loss += float(loss_sum.detach()) / units
        # max_norm inf: the norm alone (the gradients are multiplied by exactly 1.0)
        norm = acc.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
        if world > 1:
            t = torch.tensor([step_loss, step_aux / world], device=acc.device)
            step_loss, step_aux = (float(v) for v in acc.reduce(t, reduction="sum"))
        _check_finite(step + 1, step_loss, step_aux, float(norm) if norm is not None else 0.0, lr)
        optimizer.step()
        for d in deltas:
            d.on_step(step + 1, steps)
        _adopt_new_parameters(raw, optimizer, params, lr, world)
        optimizer.zero_grad(set_to_none=True)
        history.append(step_loss)
        if any(type(d).aux_loss is not Delta.aux_loss for d in deltas):
            aux_history.append(step_aux)
        if on_step is not None:
            on_step(step + 1, raw, optimizer)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
        if enc_eval is not None and eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            row = evaluate(raw, enc_eval, pad_id, acc.device, eval_batch_size, acc.autocast, progress=show)
            _check_metrics(step + 1, row, lr)
            eval_history.append({"step": step + 1, **row})
            if bar is not None:
                bar.set_postfix(loss=f"{step_loss:.4f}", **{k: f"{v:.4f}" for k, v in row.items()})
        if checkpoint_dir and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            acc.wait_for_everyone()
            if acc.is_main_process:
                save_checkpoint(checkpoint_dir, raw, optimizer, step + 1, history, aux_history, run=run,
                                eval_history=eval_history)
    train_seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    for n, p in raw.named_parameters():
        if p.requires_grad and not bool(torch.isfinite(p.detach()).all()):
            raise DivergedError(f"after {steps} steps {n} holds non-finite values (inf or NaN): training diverged. "
                                f"Train again with a lower learning rate (--lr) than {lr:g}.")
    metrics: dict[str, Any] = {
        "steps": steps,
        "train_loss": sum(history[-10:]) / max(1, len(history[-10:])),
        "train_seconds": train_seconds,
        "peak_memory_bytes": peak_memory_bytes(acc.device),
        "world_size": world,
        "device": str(acc.device),
        "mixed_precision": mixed_precision,
        # what the optimizer trained (a schedule may have frozen some of it since, e.g. LaMDA's B)
        "trainable": sum(p.numel() for p in params),
    }
    if aux_history:
        metrics["aux_loss"] = sum(aux_history[-10:]) / len(aux_history[-10:])
    if enc_eval is not None:
        final = evaluate(raw, enc_eval, pad_id, acc.device, eval_batch_size, acc.autocast, progress=show)
        _check_metrics(steps, final, lr)
        metrics.update(final)
        metrics["metric"] = "accuracy" if enc.kind == "classification" else "exact_match"
        if eval_every:
            metrics["eval_history"] = [*eval_history, {"step": steps, **final}]
    return TrainResult(metrics, history, raw, aux_history)
