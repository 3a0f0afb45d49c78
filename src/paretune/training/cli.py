"""`paretune train`: fine-tune a model on a task or data file with one method; write the adapter
(and head) and ``metrics.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import ParetuneError


def parse_options(pairs: list[str]) -> dict:
    """``["r=8", "alpha=16", "init=gaussian"]`` -> {"r": 8, "alpha": 16, "init": "gaussian"}
    (values parsed as JSON when they are JSON, else kept as text)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ParetuneError(f"option {pair!r} is not key=value (e.g. -o r=8).")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


#: Defaults shared with :func:`paretune.train` (the same run from Python and from the command line).
DEFAULT_STEPS = 100
DEFAULT_BATCH_SIZE = 16


def run_training(
    *, model: str, task: str | None, data: str | None, eval_data: str | None, method: str, options: dict,
    targets: list[str] | str | None, steps: int = DEFAULT_STEPS, lr: float = 1e-3,
    batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0, out: Path,
    max_train: int | None = None, max_eval: int | None = None, grad_accum: int = 1, max_length: int = 64,
    resume: bool = False, checkpoint_every: int = 0, save_weights: bool = True, progress: bool = True,
    head_lr: float | None = None, bitnet: bool = False, schedule: str = "linear", warmup: float = 0.06,
    weight_decay: float = 0.0, eval_every: int = 0,
) -> dict:
    """What `paretune train` does, callable from Python: returns the metrics it wrote.

    Writes into ``out``: ``adapter/`` (a method's adapter through :func:`paretune.save`, with a
    trained classification head and its label names, ``heads="auto"``), ``head/`` (``--method
    head``: ``head.safetensors`` and ``head.json`` with the head's module names and ``id2label``),
    ``model/`` (``--method full``), ``bitnet/`` (``bitnet=True``) and ``metrics.json``. Nothing is
    written when training diverges (:class:`~paretune.errors.DivergedError`): every saved tensor
    and metric is checked to be finite first. The model is loaded after ``torch.manual_seed(seed)``
    so that a new classification head, like the adapter, depends on the seed alone: the same
    seed gives the same files."""
    import math

    from safetensors.torch import save_file

    from .. import count, models, save
    from ..core.atomic import atomic_dir, atomic_write_text
    from ..core.registry import all_methods
    from ..data import get_task, load_data
    from ..errors import DivergedError
    from ..progress import phase
    from .trainer import BASELINES, _check, head_modules, train

    if method not in BASELINES:
        from ..core import registry

        registry.get(method)  # unknown method: a clear error before any work
    if (task is None) == (data is None):
        raise ParetuneError("give exactly one of --task NAME or --data FILE.")
    if task is not None:
        t = get_task(task)
        train_ds, eval_ds = t.splits()
        model = model or t.default_model
    else:
        train_ds = load_data(data)
        eval_ds = load_data(eval_data, kind=train_ds.kind) if eval_data else None
        if not model:
            raise ParetuneError("--model is required with --data.")
    train_ds, eval_ds = train_ds.head(max_train), eval_ds.head(max_eval) if eval_ds is not None else None
    kind = train_ds.kind
    if options and method in BASELINES:
        raise ParetuneError(f"--method {method} takes no -o options (got {', '.join(options)}).")
    if method not in BASELINES:  # option errors (unknown name, inf/NaN, out of range) before the model loads
        from ..core import registry

        registry.get(method).config_cls.from_dict({k: v for k, v in options.items() if k != "bits"})
    _check(steps, lr, batch_size, grad_accum, 1, weight_decay=weight_decay, warmup=warmup, schedule=schedule,
           eval_every=eval_every, head_lr=head_lr)  # run options too: before the model loads
    import torch

    torch.manual_seed(seed)  # seeded before the model loads: a new classification head depends on the seed alone
    with phase(f"load {model}", enabled=progress):
        net, tokenizer = models.load(
            model, task="classification" if kind == "classification" else "causal-lm",
            num_labels=len(train_ds.labels()) if kind == "classification" else None,
        )
    result = train(
        net, train_ds, eval_ds, tokenizer=tokenizer, method=method, options=options, targets=targets or None,
        steps=steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum, seed=seed, max_length=max_length,
        checkpoint_dir=str(out / "checkpoint") if checkpoint_every or resume else None,
        checkpoint_every=checkpoint_every, resume=resume, progress=progress, head_lr=head_lr, bitnet=bitnet,
        schedule=schedule, warmup=warmup, weight_decay=weight_decay, eval_every=eval_every,
    )
    net = result.model
    heads = head_modules(net) if kind == "classification" else []
    head_tensors = {f"{h}.{n}": p.detach().cpu().contiguous() for h in heads
                    for n, p in net.get_submodule(h).named_parameters() if p.requires_grad}
    for n, p in [*net.named_parameters(), *head_tensors.items()]:
        if (not isinstance(p, torch.nn.Parameter) or p.requires_grad) and not bool(torch.isfinite(p.detach()).all()):
            raise DivergedError(f"{n} holds non-finite values (inf or NaN) after training; nothing was saved. "
                                f"Train again with a lower --lr than {lr:g}.")
    trainable = result.metrics["trainable"]
    if method == "full":
        stored = sum(p.numel() * p.element_size() for p in net.parameters())
        adapter_trainable = 0
    elif method == "head":
        stored = sum(t.numel() * t.element_size() for t in head_tensors.values())
        adapter_trainable = 0
    else:
        c = count(net)
        adapter_trainable = c["trainable"]
        stored = c["stored_bytes"] + sum(t.numel() * t.element_size() for t in head_tensors.values())
    metrics = {
        "method": method, "options": options, "model": model, "task": task or str(data), "seed": seed, "lr": lr,
        "batch_size": batch_size, "schedule": schedule, "warmup": warmup, "weight_decay": weight_decay,
        "trainable": trainable, "adapter_trainable": adapter_trainable,
        "stored_bytes": stored, "train_examples": len(train_ds),
        "num_labels": len(train_ds.labels()) if kind == "classification" else None, "eval_examples": len(eval_ds) if eval_ds else 0,
        **result.metrics,
    }
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise DivergedError(f"the metrics {', '.join(bad)} are not finite; nothing was saved. Train again with a "
                            f"lower --lr than {lr:g}.")
    text = json.dumps(metrics, indent=2, allow_nan=False) + "\n"
    import torch.distributed as dist

    main = not dist.is_initialized() or dist.get_rank() == 0
    if save_weights and main:  # under accelerate launch / torchrun only rank 0 writes
        if bitnet:  # the trained ternary model: int8 codes in {-1, 0, 1} and a scale per matrix
            from ..compress.bitnet import freeze_ternary, save_ternary

            save_ternary(freeze_ternary(net), out / "bitnet")
        if method in all_methods():
            save(net, out / "adapter", heads="auto")  # the trained head and its label names go with the adapter
        if method == "full" and not bitnet:
            with atomic_dir(out / "model") as tmp:
                net.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
        elif method == "head" and head_tensors:
            id2label = {str(k): v for k, v in (getattr(net.config, "id2label", None) or {}).items()}
            with atomic_dir(out / "head") as tmp:
                save_file(head_tensors, str(tmp / "head.safetensors"))
                (tmp / "head.json").write_text(json.dumps({"heads": heads, "id2label": id2label}, indent=2) + "\n",
                                               encoding="utf-8")
    if main:
        atomic_write_text(out / "metrics.json", text)
    if dist.is_initialized():  # a gloo/nccl group alive at interpreter exit aborts the process
        dist.barrier()
        dist.destroy_process_group()
    return metrics


def summary(metrics: dict, out: Path, saved: bool) -> str:
    """What `paretune train` prints at the end: every metric, where the weights are and how to
    load them (a short Python snippet)."""
    shown = ["train_loss", "eval_loss", "accuracy", "exact_match", "aux_loss"]
    parts = [f"{k}={metrics[k]:.4f}" for k in shown if metrics.get(k) is not None]
    parts += [f"trainable={metrics['trainable']:,}", f"stored={metrics['stored_bytes']:,} B",
              f"train_seconds={metrics['train_seconds']:.1f}", f"peak_memory={metrics['peak_memory_bytes']:,} B"]
    lines = [f"{metrics['method']} after {metrics['steps']} steps: " + ", ".join(parts)]
    for row in metrics.get("eval_history", [])[:-1]:
        lines.append("  step {step}: ".format(**row) + ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "step"))
    lines.append(f"metrics: {out / 'metrics.json'}")
    if not saved:
        return "\n".join(lines)
    n = metrics.get("num_labels")
    q = json.dumps  # a Python string literal in double quotes
    load_args = q(str(metrics["model"])) + (f', task="classification", num_labels={n}' if n else "")
    method = metrics["method"]
    if method == "full":
        where, code = out / "model", [f"model, tok = paretune.models.load({q(str(out / 'model'))})"]
    elif method == "head":
        where = out / "head"
        code = [f"model, tok = paretune.models.load({load_args})",
                f"model.load_state_dict(safetensors.torch.load_file({q(str(where / 'head.safetensors'))}), strict=False)"]
        lines.append(f"head: {where} (label names in head.json)")
        lines.append("load it:\n  import paretune.models, safetensors.torch\n" + "\n".join(f"  {c}" for c in code))
        return "\n".join(lines)
    else:
        where = out / "adapter"
        code = [f"model, tok = paretune.models.load({load_args})", f"paretune.load(model, {q(str(where))})"]
    if (out / "bitnet").exists():
        lines.append(f"bitnet model: {out / 'bitnet'}")
    with_head = " (with the classification head and its label names)" if n and method != "full" else ""
    lines.append(f"{'model' if method == 'full' else 'adapter'}: {where}{with_head}")
    lines.append("load it:\n  import paretune, paretune.models\n" + "\n".join(f"  {c}" for c in code))
    return "\n".join(lines)


def train_command(
    model: Optional[str] = typer.Option(None, help="minilm-l6 | smollm2-135m | a local path or Hub id (default: the task's model)"),
    task: Optional[str] = typer.Option(None, help="built-in task: city-continent, city-country, country-capital, country-currency"),
    data: Optional[str] = typer.Option(None, help="training data: CSV/JSONL with text,label or prompt,completion"),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="held-out data, same columns"),
    method: str = typer.Option("lora", help="a method (paretune methods), or 'head' / 'full' baselines"),
    option: List[str] = typer.Option([], "-o", "--option", help="method option key=value, repeatable (-o r=8)"),
    targets: List[str] = typer.Option([], "--targets", help="modules to adapt: names or suffixes, repeatable and/or "
                                      "comma-separated (q_proj,v_proj), 'all-linear', or one re:PATTERN "
                                      "(default: the method's targets)"),
    steps: int = typer.Option(DEFAULT_STEPS, help="optimizer steps (the same default as paretune.train)"),
    lr: float = typer.Option(1e-3, help="peak learning rate"),
    head_lr: Optional[float] = typer.Option(None, "--head-lr", help="peak learning rate of the task head (default: --lr)"),
    batch_size: int = typer.Option(DEFAULT_BATCH_SIZE, "--batch-size",
                                   help="global batch per optimizer step (the same default as paretune.train)"),
    grad_accum: int = typer.Option(1, "--grad-accum", help="micro-batches per step"),
    scheduler: str = typer.Option("linear", "--scheduler", help="lr after warm-up: linear (decay to 0), cosine, constant"),
    warmup: float = typer.Option(0.06, "--warmup", help="linear warm-up as a FRACTION of the steps in [0, 1) "
                                 "(a number >= 1: that many steps)"),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay"),
    eval_every: int = typer.Option(0, "--eval-every", help="also evaluate on the held-out split every N steps "
                                   "(history in metrics.json; 0: only at the end)"),
    seed: int = typer.Option(0, help="seed of the adapter, the new head and the data order (same seed, same files)"),
    max_train: Optional[int] = typer.Option(None, "--max-train", help="use only the first N training examples"),
    max_eval: Optional[int] = typer.Option(None, "--max-eval", help="evaluate on the first N held-out examples"),
    max_length: int = typer.Option(64, "--max-length", help="tokens per example"),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="save a resumable checkpoint in OUT/checkpoint every N steps"),
    resume: bool = typer.Option(False, help="resume from OUT/checkpoint if present (the same options; --steps may grow)"),
    no_save: bool = typer.Option(False, "--no-save", help="write metrics only, no weights"),
    bitnet: bool = typer.Option(False, "--bitnet", help="train BitNet b1.58 layers (ternary weights, 8-bit activations) "
                                "in place of every Linear but the head; writes OUT/bitnet (use with --method full)"),
    out: Path = typer.Option(..., "--out", help="output folder: adapter/ (with the head), head/ or model/, and metrics.json"),
) -> None:
    """Fine-tune a model with one method and write the adapter (with a trained classification head)
    and metrics.json. Defaults: 100 steps of batch 16, lr 1e-3, linear schedule with 6% warm-up,
    as paretune.train."""
    from ..cli_options import parse_targets

    metrics = run_training(
        model=model, task=task, data=data, eval_data=eval_data, method=method, options=parse_options(option),
        targets=parse_targets(list(targets)), steps=steps, lr=lr, batch_size=batch_size, seed=seed, out=out,
        max_train=max_train, max_eval=max_eval, grad_accum=grad_accum, max_length=max_length, resume=resume,
        checkpoint_every=checkpoint_every, save_weights=not no_save, progress=True, head_lr=head_lr,
        bitnet=bitnet, schedule=scheduler, warmup=warmup, weight_decay=weight_decay, eval_every=eval_every,
    )
    typer.echo(summary(metrics, out, saved=not no_save))
