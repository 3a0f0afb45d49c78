"""Save and load adapters: a folder with ``paretune.json`` and ``adapter.safetensors``.

``paretune.json`` holds the format version, the library version, the method, its config, the
adapted module names and a fingerprint of the base (each adapted module's kind and weight
shape, plus their SHA-256). Loading onto a model whose fingerprint differs is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .errors import AdapterFileError, ParetuneError
from .api import adapt, remove
from .core import quant, registry
from .core.atomic import atomic_dir
from .core.host import Host
from .core.inject import kind_of
from .core.jsonfile import read_json
from .core.state import record_of, state_of

CONFIG_FILE = "paretune.json"
WEIGHTS_FILE = "adapter.safetensors"
FORMAT = "paretune-adapter"
FORMAT_VERSION = 1


def fingerprint(model: nn.Module, module_names: list[str]) -> dict[str, Any]:
    """Kind and weight shape of each named module, and a hash of the whole list."""
    modules: dict[str, Any] = {}
    for name in module_names:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            modules[name] = None
            continue
        w = getattr(m, "weight", None)
        modules[name] = {"kind": kind_of(m), "shape": list(w.shape) if w is not None else None}
    digest = hashlib.sha256(json.dumps(modules, sort_keys=True).encode()).hexdigest()
    return {"modules": modules, "sha256": digest}


def _hosts_in_order(model: nn.Module, name: str) -> list[tuple[str, Any]]:
    rec = record_of(model, name)
    return [(m, model.get_submodule(m)) for m in rec.targets]


def save(model: nn.Module, path: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter ``name`` to folder ``path`` atomically; returns the path.

    The folder holds ``paretune.json`` and ``adapter.safetensors`` (only what the method
    stores: e.g. no frozen random bases, which are regenerated from a seed)."""
    rec = record_of(model, name)
    if state_of(model).is_merged(name):
        raise ParetuneError(
            f"adapter {name!r} is merged into the base weights; unmerge it before saving, or save the merged model "
            "with model.save_pretrained."
        )
    tensors: dict[str, torch.Tensor] = {}
    for module_name, host in _hosts_in_order(model, name):
        for key, t in quant.file_tensors(host.deltas[name], rec.bits).items():
            tensors[f"{module_name}.{key}"] = t.detach().to("cpu").contiguous()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "name": name,
        "method": rec.method,
        "config": rec.config.to_dict(),
        "targets": rec.targets,
        **({"bits": rec.bits} if rec.bits is not None else {}),
        "base_model": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "fingerprint": fingerprint(model, rec.targets),
    }
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "paretune_method": rec.method})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return Path(path)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``paretune.json`` of an adapter folder (clear errors when absent or corrupt)."""
    path = Path(path)
    cfg = path / CONFIG_FILE
    if not path.is_dir():
        raise AdapterFileError(f"{path} is not an adapter folder (it does not exist or is a file).")
    if not cfg.is_file():
        hint = " It looks like a PEFT adapter: use paretune.import_peft." if (path / "adapter_config.json").exists() else ""
        raise AdapterFileError(f"{path} has no {CONFIG_FILE}; it was not written by paretune.save.{hint}")
    meta = read_json(cfg, what="adapter description", error=AdapterFileError, hint="Save the adapter again.")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterFileError(f"{cfg} is not a paretune adapter description (format != {FORMAT!r}).")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterFileError(
            f"{cfg} has format version {meta['format_version']}; this paretune ({__version__}) reads up to "
            f"{FORMAT_VERSION}. Upgrade paretune."
        )
    for key in ("method", "config", "targets", "fingerprint"):
        if key not in meta:
            raise AdapterFileError(f"{cfg} is missing {key!r}; the file is corrupt.")
    return meta


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    f = Path(path) / WEIGHTS_FILE
    if not f.is_file():
        raise AdapterFileError(f"{Path(path)} has no {WEIGHTS_FILE}; the adapter folder is incomplete.")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{f} is corrupt or truncated ({e}); save the adapter again.") from None


def check_fingerprint(model: nn.Module, meta: dict[str, Any], path: Any) -> None:
    """Raise if the model's modules at the saved targets differ from the saved fingerprint."""

    saved = meta["fingerprint"]["modules"]
    problems = []
    for name, want in saved.items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            problems.append(f"{name}: no such module")
            continue
        if isinstance(m, Host):
            m = m.base
        w = getattr(m, "weight", None)
        have = {"kind": kind_of(m), "shape": list(w.shape) if w is not None else None}
        if have != want:
            problems.append(f"{name}: saved {want['kind']} {want['shape']}, model has {have['kind']} {have['shape']}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
        raise AdapterFileError(
            f"the adapter in {path} was made for another base model ({meta.get('base_model') or 'unknown'}): "
            f"{shown}. Load it onto the model it was trained on."
        )


def _split_by_module(tensors: dict[str, torch.Tensor], targets: list[str], path: Any) -> dict[str, dict[str, torch.Tensor]]:
    """``{"<module>.<tensor>": t}`` -> ``{module: {tensor: t}}`` (module names may hold dots)."""
    per_module: dict[str, dict[str, torch.Tensor]] = {t: {} for t in targets}
    for key, t in tensors.items():
        module_name, _, tensor_name = key.rpartition(".")
        while module_name and module_name not in per_module and "." in module_name:
            module_name, _, head = module_name.rpartition(".")
            tensor_name = f"{head}.{tensor_name}"
        if module_name not in per_module:
            raise AdapterFileError(f"{path}: tensor {key!r} belongs to no adapted module; the file is corrupt.")
        per_module[module_name][tensor_name] = t
    return per_module


def load(model: nn.Module, path: str | os.PathLike, name: str | None = None, *, trainable: bool = False) -> nn.Module:
    """Add the adapter saved in folder ``path`` to ``model`` (in place) and return the model.

    ``name`` defaults to the saved name. The adapter is active; its parameters are trainable only
    with ``trainable=True``. Nothing changes on the model if the file is corrupt or the base differs.
    """

    meta = read_meta(path)
    tensors = read_tensors(path)
    spec = registry.get(meta["method"])
    check_fingerprint(model, meta, path)
    name = name or meta.get("name") or "default"
    per_module = _split_by_module(tensors, meta["targets"], path)
    grad = {id(p): p.requires_grad for p in model.parameters()}
    exact = "|".join(re.escape(t) for t in meta["targets"])
    bits = meta.get("bits")
    adapt(model, spec.name, name=name, targets=exact, bits=bits, **spec.config_cls.upgrade(dict(meta["config"])))
    try:
        for module_name, state in per_module.items():
            quant.load_file_tensors(model.get_submodule(module_name).deltas[name], state, bits, module_name)
    except Exception:
        remove(model, name)
        raise
    for p in model.parameters():
        p.requires_grad_(grad.get(id(p), trainable))
    return model


def hot_swap(model: nn.Module, path: str | os.PathLike, name: str = "default") -> nn.Module:
    """Load the adapter saved in ``path`` into the slots of adapter ``name`` in place: the same
    modules and the same parameter tensors get the new values (``copy_``), so a ``torch.compile``d
    model runs the new adapter without recompiling, and an optimizer holding the parameters keeps
    them. The saved adapter must have the same method, targets and shape-deciding options
    (everything in its config but values that only affect initialisation); otherwise this is a
    clear error and nothing changes."""
    rec = record_of(model, name)
    meta = read_meta(path)
    tensors = read_tensors(path)
    check_fingerprint(model, meta, path)
    if meta["method"] != rec.method:
        raise AdapterFileError(f"{path} holds a {meta['method']} adapter; adapter {name!r} is {rec.method}. "
                               "Hot-swap needs the same method: use paretune.load to add it as a new adapter.")
    if list(meta["targets"]) != list(rec.targets):
        raise AdapterFileError(f"{path} adapts other modules than adapter {name!r}; hot-swap needs the same targets.")
    spec = registry.get(rec.method)
    saved = spec.config_cls.from_dict(spec.config_cls.upgrade(dict(meta["config"]))).to_dict()
    have = rec.config.to_dict()
    init_only = set(spec.config_cls.INIT_ONLY)
    differ = sorted(k for k in have if k not in init_only and saved.get(k) != have.get(k))
    if differ:
        shown = ", ".join(f"{k}: {saved.get(k)!r} vs {have.get(k)!r}" for k in differ)
        raise AdapterFileError(
            f"{path} was made with other options than adapter {name!r} ({shown}); hot-swap keeps the compiled "
            "shapes and scaling, so these must match. Use paretune.load to add it as a new adapter."
        )
    if meta.get("bits") != rec.bits:
        raise AdapterFileError(f"{path} holds a {meta.get('bits') or 'full-precision'}-bit adapter; adapter {name!r} "
                               f"is {rec.bits or 'full-precision'}-bit. Use paretune.load to add it as a new adapter.")
    per_module = _split_by_module(tensors, rec.targets, path)
    hosts = {m: model.get_submodule(m) for m in rec.targets}
    if rec.bits is None:
        for module_name, host in hosts.items():  # check everything before changing anything
            host.deltas[name].check_stored(per_module[module_name], where=module_name)
    else:
        for module_name, host in hosts.items():
            quant.check_state(host.deltas[name], per_module[module_name], rec.bits, module_name)
    for module_name, host in hosts.items():
        quant.load_file_tensors(host.deltas[name], per_module[module_name], rec.bits, module_name)
    return model

