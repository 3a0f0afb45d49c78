"""`paretune train`: fine-tune a model on a task or data file with one method; write the adapter
(and head) and ``metrics.json``."""

from __future__ import annotations

import json
import sys
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


def run_training(
    *, model: str, task: str | None, data: str | None, eval_data: str | None, method: str, options: dict,
    targets: list[str] | None, steps: int, lr: float, batch_size: int, seed: int, out: Path,
    max_train: int | None = None, max_eval: int | None = None, grad_accum: int = 1, max_length: int = 64,
    resume: bool = False, checkpoint_every: int = 0, save_weights: bool = True, progress: bool = True,
    head_lr: float | None = None, bitnet: bool = False,
) -> dict:
    """What `paretune train` does, callable from Python: returns the metrics it wrote."""
    from safetensors.torch import save_file

    from .. import count, models, save
    from ..core.atomic import atomic_dir, atomic_write_text
    from ..core.registry import all_methods
    from ..data import get_task, load_data
    from .trainer import BASELINES, head_modules, train

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
    import torch

    torch.manual_seed(seed)  # seeded before the model loads: a new classification head depends on the seed alone
    net, tokenizer = models.load(
        model, task="classification" if kind == "classification" else "causal-lm",
        num_labels=len(train_ds.labels()) if kind == "classification" else None,
    )
    result = train(
        net, train_ds, eval_ds, tokenizer=tokenizer, method=method, options=options, targets=targets or None,
        steps=steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum, seed=seed, max_length=max_length,
        checkpoint_dir=str(out / "checkpoint") if checkpoint_every or resume else None,
        checkpoint_every=checkpoint_every, resume=resume, progress=progress, head_lr=head_lr, bitnet=bitnet,
    )
    net = result.model
    heads = head_modules(net) if kind == "classification" else []
    head_tensors = {f"{h}.{n}": p.detach().cpu().contiguous() for h in heads
                    for n, p in net.get_submodule(h).named_parameters() if p.requires_grad}
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
        "batch_size": batch_size, "trainable": trainable, "adapter_trainable": adapter_trainable,
        "stored_bytes": stored, "train_examples": len(train_ds),
        "num_labels": len(train_ds.labels()) if kind == "classification" else None, "eval_examples": len(eval_ds) if eval_ds else 0,
        **result.metrics,
    }
    import torch.distributed as dist

    main = not dist.is_initialized() or dist.get_rank() == 0
    if save_weights and main:  # under accelerate launch / torchrun only rank 0 writes
        if bitnet:  # the trained ternary model: int8 codes in {-1, 0, 1} and a scale per matrix
            from ..compress.bitnet import freeze_ternary, save_ternary

            save_ternary(freeze_ternary(net), out / "bitnet")
        if method in all_methods():
            save(net, out / "adapter")
        if method == "full" and not bitnet:
            with atomic_dir(out / "model") as tmp:
                net.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
        elif head_tensors:
            with atomic_dir(out / "head") as tmp:
                save_file(head_tensors, str(tmp / "head.safetensors"))
    if main:
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    if dist.is_initialized():  # a gloo/nccl group alive at interpreter exit aborts the process
        dist.barrier()
        dist.destroy_process_group()
    return metrics


def train_command(
    model: Optional[str] = typer.Option(None, help="minilm-l6 | smollm2-135m | a local path or Hub id (default: the task's model)"),
    task: Optional[str] = typer.Option(None, help="built-in task: city-continent, city-country, country-capital, country-currency"),
    data: Optional[str] = typer.Option(None, help="training data: CSV/JSONL with text,label or prompt,completion"),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="held-out data, same columns"),
    method: str = typer.Option("lora", help="a method (paretune methods), or 'head' / 'full' baselines"),
    option: List[str] = typer.Option([], "-o", "--option", help="method option key=value, repeatable (-o r=8)"),
    targets: List[str] = typer.Option([], "--targets", help="module names/suffixes to adapt (default all-linear)"),
    steps: int = typer.Option(200, help="optimizer steps"),
    lr: float = typer.Option(1e-3, help="peak learning rate"),
    head_lr: Optional[float] = typer.Option(None, "--head-lr", help="peak learning rate of the task head (default: --lr)"),
    batch_size: int = typer.Option(32, "--batch-size", help="global batch per optimizer step"),
    grad_accum: int = typer.Option(1, "--grad-accum", help="micro-batches per step"),
    seed: int = typer.Option(0),
    max_train: Optional[int] = typer.Option(None, "--max-train", help="use only the first N training examples"),
    max_eval: Optional[int] = typer.Option(None, "--max-eval", help="evaluate on the first N held-out examples"),
    max_length: int = typer.Option(64, "--max-length", help="tokens per example"),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="save a resumable checkpoint every N steps"),
    resume: bool = typer.Option(False, help="resume from OUT/checkpoint if present"),
    no_save: bool = typer.Option(False, "--no-save", help="write metrics only, no weights"),
    bitnet: bool = typer.Option(False, "--bitnet", help="train BitNet b1.58 layers (ternary weights, 8-bit activations) "
                                "in place of every Linear but the head; writes OUT/bitnet (use with --method full)"),
    out: Path = typer.Option(..., "--out", help="output folder: adapter/, head/ or model/, and metrics.json"),
) -> None:
    """Fine-tune a model with one method and write the adapter and metrics.json."""
    metrics = run_training(
        model=model, task=task, data=data, eval_data=eval_data, method=method, options=parse_options(option),
        targets=list(targets) or None, steps=steps, lr=lr, batch_size=batch_size, seed=seed, out=out,
        max_train=max_train, max_eval=max_eval, grad_accum=grad_accum, max_length=max_length, resume=resume,
        checkpoint_every=checkpoint_every, save_weights=not no_save, progress=sys.stderr.isatty(), head_lr=head_lr,
        bitnet=bitnet,
    )
    name = metrics.get("metric")
    shown = f"{name}={metrics[name]:.4f}, " if name else ""
    typer.echo(f"{metrics['method']}: {shown}trainable={metrics['trainable']:,}, stored={metrics['stored_bytes']:,} B, "
               f"{metrics['train_seconds']:.1f} s -> {out / 'metrics.json'}")
