"""`paretune export` and `paretune import`: convert between paretune adapter folders and PEFT ones.

    paretune export ADAPTER_DIR --model M --out DIR [--task-type T] [--peft-type P] [--base-model ID]
    paretune import PEFT_DIR_OR_HUB_ID --model M --out DIR [--name N]

Both load the base model ``M`` (a bundled name, a local folder or a Hub id, as
``paretune.models.load``), put the adapter on it and write the other format. The base is loaded
as a classifier when the adapter carries a head: a paretune folder with ``heads`` in
``paretune.json`` (its class count from ``id2label``, else the head's first weight's rows), a PEFT
folder with ``modules_to_save`` tensors and task type ``SEQ_CLS`` (or none) (the count from their
first weight's rows). Export writes exactly the heads ``paretune.json`` lists as PEFT
``modules_to_save`` (a freshly loaded base trains every parameter, so "trains" cannot tell a
head there).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from .errors import AdapterFileError

_TASK = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "classification", "FEATURE_EXTRACTION": "encoder"}


def _head_rows(weights: Path, names: list[str]) -> int | None:
    """Rows of the first ``<head>.weight`` (or ``<head>...weight``) tensor in ``weights``."""
    from safetensors import safe_open

    if not weights.is_file():
        return None
    with safe_open(str(weights), framework="pt") as f:
        for key in sorted(f.keys()):
            if key.endswith(".weight") and any(f"{n}." in key for n in names):
                return int(f.get_slice(key).get_shape()[0])
    return None


def _paretune_task(adapter_dir: Path) -> tuple[str, int | None]:
    from .io import read_meta

    meta = read_meta(adapter_dir)
    heads = meta.get("heads") or []
    if not heads:
        return "auto", None
    labels = meta.get("id2label")
    n = len(labels) if isinstance(labels, dict) and labels else _head_rows(adapter_dir / "head.safetensors", heads)
    if n is None:
        raise AdapterFileError(f"{adapter_dir} names heads {heads} but holds no head tensors; the folder is incomplete.")
    return "classification", n


def _peft_task(folder: Path) -> tuple[str, int | None]:
    from .peft_io import PEFT_WEIGHTS, read_peft

    cfg, _ = read_peft(folder)
    heads = cfg.get("modules_to_save") or []
    task_type = cfg.get("task_type")
    if task_type in ("SEQ_CLS", None) and heads:
        n = _head_rows(folder / PEFT_WEIGHTS, heads)
        if n is not None:
            return "classification", n
    task = _TASK.get(task_type or "", "auto")
    return ("auto" if task == "classification" else task), None


def _load_model(model: str, task: str, num_labels: int | None) -> Any:
    from . import models

    net, _ = models.load(model, task=task, num_labels=num_labels)
    return net


def export_command(
    adapter_dir: Path = typer.Argument(..., help="A paretune adapter folder (paretune.save)."),
    model: str = typer.Option(..., "--model", help="The base model: a bundled name, a local folder or a Hub id."),
    out: Path = typer.Option(..., "--out", help="The PEFT folder to write."),
    task_type: Optional[str] = typer.Option(
        "auto", "--task-type", help="PEFT task type: auto (from the model), CAUSAL_LM, SEQ_CLS, TOKEN_CLS, "
        "QUESTION_ANS, SEQ_2_SEQ_LM, FEATURE_EXTRACTION or none."),
    peft_type: Optional[str] = typer.Option(
        None, "--peft-type", help="LORA to write any LoRA-form method as LoRA; default: the method's own format."),
    base_model: Optional[str] = typer.Option(
        None, "--base-model", help="base_model_name_or_path to record (default: where the base loads from)."),
) -> None:
    """Write a paretune adapter folder as a PEFT adapter folder (PeftModel / AutoPeftModel load it)."""
    from . import io
    from .peft_io import export_peft

    task, num_labels = _paretune_task(adapter_dir)
    net = _load_model(model, task, num_labels)
    meta = io.read_meta(adapter_dir)
    name = meta.get("name") or "default"
    io.load(net, adapter_dir, name=name)
    tt = None if (task_type or "").lower() == "none" else task_type
    export_peft(net, out, name=name, task_type=tt, peft_type=peft_type, base_model_name_or_path=base_model,
                heads=list(meta.get("heads") or []) or None)
    cfg = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    typer.echo(f"wrote {out} (PEFT {cfg['peft_type']}, task_type {cfg.get('task_type')}, "
               f"base {cfg.get('base_model_name_or_path')})")


def import_command(
    peft_dir: str = typer.Argument(..., help="A PEFT adapter folder or a Hugging Face Hub id."),
    model: str = typer.Option(..., "--model", help="The base model: a bundled name, a local folder or a Hub id."),
    out: Path = typer.Option(..., "--out", help="The paretune adapter folder to write."),
    name: str = typer.Option("default", "--name", help="The adapter's name."),
) -> None:
    """Write a PEFT adapter folder (LoRA, VeRA, RandLoRA, LoKr) as a paretune adapter folder."""
    import inspect

    from . import io
    from .peft_io import import_peft_with_heads, resolve

    folder = resolve(peft_dir)
    task, num_labels = _peft_task(folder)
    net = _load_model(model, task, num_labels)
    heads = import_peft_with_heads(net, folder, name=name)
    if "heads" in inspect.signature(io.save).parameters:
        io.save(net, out, name=name, heads=heads or None)
    elif heads:
        raise AdapterFileError(f"{peft_dir} holds a trained head ({', '.join(heads)}), which this paretune's adapter "
                               "folders cannot hold yet; use it with PEFT directly.")
    else:
        io.save(net, out, name=name)
    typer.echo(f"wrote {out} ({len(heads)} head module(s) kept)")
