"""Whole-model folders of the compression methods that change a model's modules (BitNet's ternary
layers, recursive layer sharing): the state dict in one safetensors file, each shared tensor stored
once, and a JSON file of the method's settings, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..core.atomic import atomic_dir
from ..errors import AdapterFileError

WEIGHTS = "model.safetensors"


def read_state_meta(path: Path, meta_file: str, fmt: str, what: str, saver: str) -> dict:
    """The JSON settings file ``meta_file`` of a folder at ``path``, checked to be an object of
    format ``fmt``; an AdapterFileError naming ``what`` it should be and the ``saver`` that writes
    it otherwise."""
    from ..core.jsonfile import read_json

    meta = read_json(path / meta_file, what=what, error=AdapterFileError, hint=f"Save the model with {saver}.")
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise AdapterFileError(f"{path / meta_file} is not a {what} (format {got!r}); save one with {saver}.")
    return meta


def saved_linear(model: nn.Module, name: str, path: Path, is_linear) -> nn.Module:
    """The float Linear ``name`` of ``model`` that a saved folder at ``path`` replaces; an
    AdapterFileError when the model has no such module or it is not a Linear (``is_linear``)."""
    try:
        base = model.get_submodule(name)
    except AttributeError:
        raise AdapterFileError(f"{path}: module {name} of the saved model is not in this model; load it into "
                               "the architecture it was saved from.") from None
    if not is_linear(base):
        raise AdapterFileError(f"{path}: module {name} is a {type(base).__name__} here, not a Linear layer; load "
                               "the folder into the unconverted float model.")
    return base


def write_state_folder(model: nn.Module, path: str | os.PathLike, meta_file: str, meta: dict) -> Path:
    """Write ``model``'s state (:func:`unique_state`) as ``model.safetensors`` and ``meta`` plus the
    tensor aliases as ``meta_file`` into the folder ``path``, which appears complete or not at all."""
    from safetensors.torch import save_file

    tensors, aliases = unique_state(model)
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS))
        (tmp / meta_file).write_text(json.dumps({**meta, "aliases": aliases}, indent=2))
    return path


def unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state dict with each storage once (safetensors refuses shared tensors) and a
    map from each dropped name to the stored name that holds its tensor."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
               t.dtype)
        if t.numel() and key in first:
            aliases[name] = first[key]
            continue
        first[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    return tensors, aliases


def load_unique_state(model: nn.Module, file: Path, aliases: dict[str, str]) -> None:
    """Copy a :func:`unique_state` file into ``model``; every tensor must be present with its shape."""
    from safetensors.torch import load_file

    if not file.is_file():
        raise AdapterFileError(f"{file} is missing; the folder is incomplete. Save the model again.")
    try:
        stored = load_file(str(file))
    except Exception as e:
        raise AdapterFileError(f"{file} could not be read ({e}); the file is corrupt. Save the model again.") from None
    state = model.state_dict(keep_vars=True)
    for name, t in state.items():
        src = stored.get(name, stored.get(aliases.get(name, ""), None))
        if src is None:
            raise AdapterFileError(f"{file} has no tensor for {name}; it was saved from another architecture.")
        if tuple(src.shape) != tuple(t.shape):
            raise AdapterFileError(f"{file}: {name} has shape {tuple(src.shape)} in the file but {tuple(t.shape)} "
                                   "in the model; load it into the architecture it was saved from.")
    with torch.no_grad():
        for name, t in state.items():
            src = stored.get(name, stored.get(aliases.get(name, ""), None))
            t.copy_(src.to(t.dtype))
