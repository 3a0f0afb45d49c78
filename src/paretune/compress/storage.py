"""Save and load a quantised model as a folder.

A compressed folder holds:

* ``config.json`` (and ``generation_config.json`` where the model has one): the transformers config;
* the tokenizer's files, when one is given;
* ``paretune_compressed.safetensors``: the whole state dict with each quantised layer's packed codes
  (``<module>.packed``, uint8), ``<module>.scales`` / ``<module>.zeros`` (float16) and bias, every other
  tensor as it is (tied tensors once, by safetensors' ``save_model``);
* ``paretune_compress.json``: format version, library version, the model class, and per quantised
  module its bits, group size, axis, shape, bias and dtype.

The packed file is deliberately not named ``model.safetensors``: transformers cannot read packed
codes. With ``dequantized=True`` a plain ``model.safetensors`` of the dequantised float weights is
written beside it (each weight Ŵ = q·s + z, the same values the quantised model computes with), which
``transformers.AutoModel*.from_pretrained(folder)`` reads as an ordinary model of the same outputs,
at float size.

The folder is written atomically (:func:`paretune.core.atomic.atomic_dir`): a failure leaves nothing
at ``out``, or the folder that was there before. Nothing unpickles: tensors are safetensors, the rest
JSON.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.atomic import atomic_dir
from ..core.host import Host
from ..core.jsonfile import read_json
from ..errors import AdapterFileError, ParetuneError
from .quantize import quantized_modules
from .quantized import AXES, BITS, QuantizedLinear

META_FILE = "paretune_compress.json"
WEIGHTS_FILE = "paretune_compressed.safetensors"
FORMAT_VERSION = 1


def is_compressed(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a folder :func:`save_compressed` wrote."""
    return (Path(folder) / META_FILE).is_file()


def save_compressed(model: nn.Module, out: str | os.PathLike, tokenizer: Any = None, *,
                    dequantized: bool = False) -> Path:
    """Write the quantised ``model`` (and ``tokenizer``) to the folder ``out`` (module docstring);
    returns its path. ``dequantized=True`` also writes a plain float ``model.safetensors`` that
    transformers loads. Refused: a model with no quantised layer, a model without a transformers
    config, a model carrying adapters (merge or unload them first: a merged adapter is already in
    the quantised weights)."""
    from safetensors.torch import save_file, save_model

    from .. import __version__

    mods = quantized_modules(model)
    if not mods:
        raise ParetuneError("save_compressed: the model has no quantised layer; quantise it first "
                            "(paretune.compress.quantize(model, bits=4)).")
    if any(isinstance(m, Host) for m in model.modules()):
        raise ParetuneError("save_compressed: the model carries adapters; save them with paretune.save, and merge "
                            "(paretune.merge) or unload (paretune.unload) them before saving the compressed base.")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise ParetuneError("save_compressed: the model has no transformers config (model.config); only transformers "
                            "models can be saved as a compressed folder.")
    meta = {
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "model_class": type(model).__name__,
        "modules": {n: m.settings() for n, m in mods.items()},
    }
    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]  # as save_pretrained records it: the class to rebuild
    with atomic_dir(out) as tmp:
        config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None and hasattr(gen, "save_pretrained"):
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if dequantized:
            state = {}
            for k, v in model.state_dict().items():
                mod, _, leaf = k.rpartition(".")
                if mod in mods:
                    if leaf == "packed":
                        state[f"{mod}.weight"] = mods[mod].dequantized_weight().contiguous()
                    elif leaf == "bias":
                        state[k] = v.contiguous()
                    continue
                state[k] = v
            save_model_plain(state, tmp / "model.safetensors", save_file)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return Path(out)


def save_model_plain(state: dict[str, torch.Tensor], path: Path, save_file) -> None:
    """A state dict as safetensors, tied tensors kept once (the first name), as transformers writes them."""
    seen: dict[tuple, str] = {}
    out = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.device.type != "meta" else k
        if key in seen:
            continue
        seen[key] = k
        out[k] = v.detach().contiguous().clone()
    save_file(out, str(path), metadata={"format": "pt"})


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """The checked ``paretune_compress.json`` of a compressed folder."""
    folder = Path(folder)
    meta = read_json(folder / META_FILE, what="compressed-model description", error=AdapterFileError)
    if not isinstance(meta, dict) or not isinstance(meta.get("modules"), dict):
        raise AdapterFileError(f"{folder / META_FILE} has no 'modules' table; the folder was not written by "
                               "paretune.compress.save_compressed, or is damaged.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(f"{folder / META_FILE}: format_version {meta.get('format_version')!r} is not "
                               f"{FORMAT_VERSION}; upgrade paretune to read it.")
    for name, s in meta["modules"].items():
        ok = (isinstance(s, dict) and s.get("bits") in BITS and s.get("axis") in AXES
              and (s.get("group_size") is None or isinstance(s.get("group_size"), int))
              and isinstance(s.get("in_features"), int) and isinstance(s.get("out_features"), int))
        if not ok:
            raise AdapterFileError(f"{folder / META_FILE}: the entry for {name!r} is not a valid quantised-layer "
                                   "description (bits, group_size, axis, in_features, out_features).")
    return meta


def load_if_compressed(folder: str | os.PathLike, *, task: str = "auto", num_labels: int | None = None,
                       dtype: Any = None) -> tuple[Any, Any] | None:
    """``(model, tokenizer)`` if ``folder`` is a compressed folder, else None (for a loader that
    tries it first)."""
    if not is_compressed(folder):
        return None
    return load_compressed(folder, task=task, num_labels=num_labels, dtype=dtype)


def load_compressed(folder: str | os.PathLike, *, task: str = "auto", num_labels: int | None = None,
                    dtype: Any = None) -> tuple[Any, Any]:
    """Rebuild a model saved by :func:`save_compressed`: the model class from its config, each listed
    module replaced by an empty QuantizedLinear of the recorded settings, then every tensor read
    from the packed file (strictly: a missing or unexpected tensor is an error). Returns
    ``(model, tokenizer)`` (tokenizer None when the folder has none), the model in eval mode.
    ``dtype`` is the dtype of the non-quantised tensors (default: as saved)."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoTokenizer

    from ..models import _auto_class, _check_task, _finish, _is_causal, _resolve_dtype

    folder = Path(folder)
    meta = read_meta(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterFileError(f"{folder} has {META_FILE} but no {WEIGHTS_FILE}; the folder is incomplete. Save the "
                               "model again with paretune.compress.save_compressed.")
    task = _check_task(task, num_labels)
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise AdapterFileError(f"{folder}: its config.json could not be read ({e}).") from None
    if task == "auto":
        task = "causal-lm" if _is_causal(getattr(config, "architectures", None)) else "encoder"
    extra = {"num_labels": num_labels} if task == "classification" else {}
    for k, v in extra.items():
        setattr(config, k, v)
    model = _auto_class(task).from_config(config)
    try:
        for name, s in meta["modules"].items():
            q = QuantizedLinear(s["in_features"], s["out_features"], bits=s["bits"], group_size=s["group_size"],
                                axis=s["axis"], bias=bool(s.get("bias")),
                                dtype=getattr(torch, s.get("dtype", "float32")))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, q)
    except AttributeError as e:
        raise AdapterFileError(f"{folder}: a quantised module of {META_FILE} is not in the model its config builds "
                               f"({e}).") from None
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (RuntimeError, OSError, ValueError) as e:
        raise AdapterFileError(f"{weights} could not be read into the model ({e}); the file is damaged or does not "
                               "belong to this config.") from None
    if missing or unexpected:
        raise AdapterFileError(f"{weights} does not fit the model: missing {sorted(missing)[:8] or 'none'}, unexpected "
                               f"{sorted(unexpected)[:8] or 'none'}.")
    if dtype is not None:
        d = _resolve_dtype(dtype)
        for m in model.modules():
            if not isinstance(m, QuantizedLinear):
                for p in m._parameters.values():
                    if p is not None and p.is_floating_point():
                        p.data = p.data.to(d)
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None
    return _finish(model, tokenizer, task)  # pad token as paretune.models.load gives it; eval mode


def info(folder: str | os.PathLike) -> dict[str, Any]:
    """What a compressed folder holds (for ``paretune info``): settings, modules, and the bytes of
    the packed file against the float size of the quantised layers."""
    folder = Path(folder)
    meta = read_meta(folder)
    mods = meta["modules"]
    settings = sorted({(s["bits"], s["group_size"], s["axis"]) for s in mods.values()}, key=str)
    float_bytes = sum(s["in_features"] * s["out_features"] * torch.empty((), dtype=getattr(torch, s.get("dtype",
                      "float32"))).element_size() for s in mods.values())
    from .quantize import expected_bytes

    packed = sum(expected_bytes(s["out_features"], s["in_features"], s["bits"], s["group_size"], s["axis"])
                 for s in mods.values())
    return {
        "format": "paretune-compressed",
        "path": str(folder),
        "model_class": meta.get("model_class"),
        "settings": [{"bits": b, "group_size": g, "axis": a} for b, g, a in settings],
        "quantized_modules": len(mods),
        "quantized_weight_bytes": packed,
        "float_weight_bytes": float_bytes,
        "file_bytes": (folder / WEIGHTS_FILE).stat().st_size if (folder / WEIGHTS_FILE).is_file() else None,
        "dequantized_copy": (folder / "model.safetensors").is_file(),
        "library_version": meta.get("library_version"),
    }
