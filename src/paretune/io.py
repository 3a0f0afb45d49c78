"""Save and load adapters: a folder with ``paretune.json`` and ``adapter.safetensors``
(and ``head.safetensors`` when a trained task head is saved with the adapter).

``paretune.json`` holds the format version, the library version, the method, its config, the
adapted module names, a fingerprint of the base (each adapted module's kind and weight shape
and the SHA-256 of that list, plus ``weights_sha256``: a SHA-256 over the adapted modules' base
weights), and, with a head, ``heads`` (module names) and ``id2label`` (label names).

Loading checks, before touching the model:

* every field of ``paretune.json`` has its type (a wrong one is an :class:`AdapterFileError`
  naming the field), and every floating-point tensor in the files is finite (NaN or inf is
  refused, naming the tensor);
* the adapted modules have the saved kinds and shapes (else refused);
* the base weights hash to the saved ``weights_sha256``. On a mismatch an adapter whose saved
  tensors determine ΔW alone (LoRA, VeRA, ...) loads with a :class:`BaseWeightsWarning` (the same
  change on other weights may still be what is wanted, e.g. on a further fine-tuned copy); one
  whose ΔW depends on the base weights (the registry's ``base_dependent``: PiSSA recomputes its
  residual from the base, IA3 and Hydra scale W itself) is refused, since on other weights it is
  silently another adapter. ``check_base=False`` skips the comparison. Folders saved before the
  hash existed have none and load as before;
* the tensor files and the method options are those :func:`save` wrote (``checksums``: SHA-256
  of each file and of the config; a flipped byte or an edited ``alpha`` is refused,
  ``verify=False`` loads the folder as it is).

The weights hash covers each adapted module's parameters as stored (dtype included: the same
model in bfloat16 and in float32 hashes differently). A weight an adapter changed when it was
built (PiSSA's residual) is hashed as it was before, from the snapshot the engine takes then.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
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
from .core.digest import file_sha256
from .core.host import Host
from .core.inject import kind_of, output_head_names, weights_sha256
from .core.jsonfile import read_json
from .core.state import has_state, record_of, state_of

CONFIG_FILE = "paretune.json"
WEIGHTS_FILE = "adapter.safetensors"
HEAD_FILE = "head.safetensors"
FORMAT = "paretune-adapter"
FORMAT_VERSION = 1


class BaseWeightsWarning(UserWarning):
    """An adapter was loaded onto base weights other than those it was saved with (same shapes,
    other values; see :func:`load`)."""


def fingerprint(model: nn.Module, module_names: list[str]) -> dict[str, Any]:
    """Kind and weight shape of each named module, a hash of that list (``sha256``), and a SHA-256
    over the modules' base weights (``weights_sha256``, see :func:`base_weights_sha256`)."""
    modules: dict[str, Any] = {}
    for name in module_names:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            modules[name] = None
            continue
        if isinstance(m, Host):
            m = m.base
        w = getattr(m, "weight", None)
        modules[name] = {"kind": kind_of(m), "shape": list(w.shape) if w is not None else None}
    digest = hashlib.sha256(json.dumps(modules, sort_keys=True).encode()).hexdigest()
    return {"modules": modules, "sha256": digest, "weights_sha256": base_weights_sha256(model, module_names)}


def base_weights_sha256(model: nn.Module, module_names: list[str]) -> str:
    """One SHA-256 over the base weights of the named modules, in the given order (each module's
    own digest from :func:`paretune.core.inject.weights_sha256`, streamed piece by piece). A module
    whose weights an unmerged adapter changed when built (PiSSA) counts with the snapshot taken
    before the change; merged adapters count as part of the base."""
    snapshots = state_of(model).base_sha256 if has_state(model) else {}
    h = hashlib.sha256()
    for name in module_names:
        m = model.get_submodule(name)
        shifted = isinstance(m, Host) and any(d.shifts_base and n not in m.merged for n, d in m.deltas.items())
        digest = snapshots[name] if shifted and name in snapshots else weights_sha256(m)
        h.update(f"{name}:{digest}\n".encode())
    return h.hexdigest()


def _hosts_in_order(model: nn.Module, name: str) -> list[tuple[str, Any]]:
    rec = record_of(model, name)
    return [(m, model.get_submodule(m)) for m in rec.targets]


def _is_default_labels(id2label: dict) -> bool:
    """transformers' placeholder names LABEL_0, LABEL_1, ... (no real label names set)."""
    return all(str(v) == f"LABEL_{k}" for k, v in id2label.items())


def _auto_heads(model: nn.Module) -> list[str]:
    """The model's output head(s) (``paretune.training.trainer.head_modules``) that are not adapted
    and whose parameters all require grad (so they were trained beside the adapter)."""
    out = []
    for name in sorted(output_head_names(model)):
        m = model.get_submodule(name)
        params = list(m.parameters())
        if not isinstance(m, Host) and params and all(p.requires_grad for p in params):
            out.append(name)
    return out


def _head_tensors(model: nn.Module, heads: Any, adapter_targets: list[str]) -> dict[str, torch.Tensor]:
    if heads is None:
        return {}
    if heads == "auto":
        names = _auto_heads(model)
    elif isinstance(heads, (list, tuple)) and all(isinstance(h, str) and h for h in heads):
        names = list(heads)
    else:
        raise ParetuneError(f"heads={heads!r}: give 'auto', a list of module names (e.g. ['classifier']) or None.")
    tensors: dict[str, torch.Tensor] = {}
    for head in names:
        try:
            m = model.get_submodule(head)
        except AttributeError:
            raise ParetuneError(f"heads: the model has no module {head!r}; name the task head, e.g. "
                                f"{sorted(output_head_names(model)) or ['classifier']}.") from None
        if isinstance(m, Host) or head in adapter_targets:
            raise ParetuneError(f"heads: {head!r} is adapted; its adapter is saved with the adapter, not as a head. "
                                "Leave it out of heads.")
        params = dict(m.named_parameters())
        if not params:
            raise ParetuneError(f"heads: module {head!r} has no parameters to save.")
        for pname, p in params.items():
            tensors[f"{head}.{pname}"] = p.detach().to("cpu").contiguous()
    return tensors


def save(model: nn.Module, path: str | os.PathLike, name: str = "default", *, heads: Any = "auto") -> Path:
    """Write adapter ``name`` to folder ``path`` atomically; returns the path.

    The folder holds ``paretune.json`` and ``adapter.safetensors`` (only what the method
    stores: e.g. no frozen random bases, which are regenerated from a seed).

    ``heads``: task heads saved with the adapter into ``head.safetensors`` (keys: full parameter
    names, e.g. ``classifier.weight``) and listed under ``"heads"`` in ``paretune.json``. ``"auto"``
    (the default): every output head of the model (``classifier``, ``score``, ...) that is not
    adapted and whose parameters all require grad, i.e. one trained beside the adapter; a list of
    module names; or None for none. With a head, ``model.config.id2label`` is saved too unless it
    is transformers' placeholder ``LABEL_i`` names, and :func:`load` restores both."""
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
    head_tensors = _head_tensors(model, heads, rec.targets)
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
    if head_tensors:
        meta["heads"] = _head_module_names(head_tensors)
        id2label = getattr(getattr(model, "config", None), "id2label", None)
        if isinstance(id2label, dict) and id2label and not _is_default_labels(id2label):
            meta["id2label"] = {str(k): str(v) for k, v in sorted(id2label.items(), key=lambda kv: int(kv[0]))}
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "paretune_method": rec.method})
        if head_tensors:
            save_file(head_tensors, str(tmp / HEAD_FILE), metadata={"format": "pt"})
        meta["checksums"] = {"config": _config_sha256(meta["config"]),
                             **{f: file_sha256(tmp / f) for f in (WEIGHTS_FILE, HEAD_FILE) if (tmp / f).is_file()}}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return Path(path)


def _config_sha256(config: Any) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def verify_checksums(path: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Refuse a folder whose tensor files or options changed since :func:`save` wrote it (SHA-256
    recorded under ``checksums``; folders saved before checksums were recorded are not checked).
    Bit flips inside a tensor keep a safetensors file readable, and an edited ``alpha`` keeps a
    description valid: both would otherwise load as a different adapter without a word."""
    sums = meta.get("checksums")
    if not sums:
        return
    path = Path(path)
    fix = "Save the adapter again from its source, or pass verify=False to load it as it is now."
    if sums.get("config") is not None and _config_sha256(meta["config"]) != sums["config"]:
        raise AdapterFileError(f"{path / CONFIG_FILE}: the method options (config) were changed after the adapter was "
                               f"saved, so they no longer match the trained tensors. {fix}")
    for f in (WEIGHTS_FILE, HEAD_FILE):
        if sums.get(f) is not None and (path / f).is_file() and file_sha256(path / f) != sums[f]:
            raise AdapterFileError(f"{path / f} changed after it was saved (its SHA-256 differs from the one in "
                                   f"{CONFIG_FILE}): the file is damaged or was edited. {fix}")


def _head_module_names(head_tensors: dict[str, torch.Tensor]) -> list[str]:
    """The module names of ``{"<module>.<param>": t}`` in first-seen order."""
    names: list[str] = []
    for key in head_tensors:
        module = key.rsplit(".", 1)[0]
        if module not in names:
            names.append(module)
    return names


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_fields(meta: dict[str, Any], cfg: Path) -> None:
    """Refuse a ``paretune.json`` whose fields have the wrong types, naming the field."""

    def bad(field: str, what: str) -> AdapterFileError:
        return AdapterFileError(f"{cfg}: {field} {what}; the file is corrupt or was edited by hand. "
                                "Save the adapter again.")

    if not _is_int(meta.get("format_version", 1)) or meta.get("format_version", 1) < 1:
        raise bad("format_version", f"is {meta['format_version']!r}, not an integer >= 1")
    sums = meta.get("checksums")
    if sums is not None and (not isinstance(sums, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for k, v in sums.items())):
        raise bad("checksums", f"is {sums!r}, not an object of file names to SHA-256 hex digests")
    if not isinstance(meta["method"], str) or not meta["method"]:
        raise bad("method", f"is {meta['method']!r}, not a method name")
    if not isinstance(meta["config"], dict):
        raise bad("config", f"is a {type(meta['config']).__name__}, not an object of options")
    targets = meta["targets"]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise bad("targets", f"is {targets!r}, not a non-empty list of module names")
    if len(set(targets)) != len(targets):
        raise bad("targets", "names a module twice")
    if "name" in meta and meta["name"] is not None and (not isinstance(meta["name"], str) or not meta["name"]):
        raise bad("name", f"is {meta['name']!r}, not an adapter name")
    if meta.get("bits") is not None and not _is_int(meta["bits"]):
        raise bad("bits", f"is {meta['bits']!r}, not an integer")
    if meta.get("base_model") is not None and not isinstance(meta["base_model"], str):
        raise bad("base_model", f"is {meta['base_model']!r}, not a string")
    fp = meta["fingerprint"]
    if not isinstance(fp, dict) or "modules" not in fp:
        raise bad("fingerprint", f"is {fp!r}, not an object with 'modules'")
    modules = fp["modules"]
    if not isinstance(modules, dict):
        raise bad("fingerprint.modules", f"is a {type(modules).__name__}, not an object by module name")
    for module, entry in modules.items():
        ok = (isinstance(entry, dict) and (entry.get("kind") is None or isinstance(entry.get("kind"), str))
              and (entry.get("shape") is None or (isinstance(entry.get("shape"), list)
                                                  and all(_is_int(d) for d in entry["shape"]))))
        if not ok:
            raise bad(f"fingerprint.modules[{module!r}]", f"is {entry!r}, not {{'kind': ..., 'shape': [...]}}")
    if set(modules) != set(targets):
        raise bad("fingerprint.modules", "does not list exactly the targets")
    digest = fp.get("weights_sha256")
    if digest is not None and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise bad("fingerprint.weights_sha256", f"is {digest!r}, not a SHA-256 hex digest")
    heads = meta.get("heads")
    if heads is not None and (not isinstance(heads, list) or not heads
                              or not all(isinstance(h, str) and h for h in heads)):
        raise bad("heads", f"is {heads!r}, not a non-empty list of module names")
    id2label = meta.get("id2label")
    if id2label is not None:
        if not isinstance(id2label, dict) or not id2label or not all(
                isinstance(k, str) and re.fullmatch(r"\d+", k) and isinstance(v, str) for k, v in id2label.items()):
            raise bad("id2label", f"is {id2label!r}, not an object of label ids ('0', '1', ...) to names")
        if sorted(int(k) for k in id2label) != list(range(len(id2label))):
            raise bad("id2label", "does not number its labels 0, 1, ..., n-1")


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``paretune.json`` of an adapter folder: clear errors when absent, corrupt, or
    when a field has the wrong type (:class:`AdapterFileError` naming the field). A folder whose
    writer was killed between its two renames is first put back (:func:`paretune.core.atomic.recover`)."""
    from .core.atomic import recover

    path = Path(path)
    recover(path)
    cfg = path / CONFIG_FILE
    if not path.is_dir():
        raise AdapterFileError(f"{path} is not an adapter folder (it does not exist or is a file).")
    if not cfg.is_file():
        hint = " It looks like a PEFT adapter: use paretune.import_peft." if (path / "adapter_config.json").exists() else ""
        if (path / "adapter" / CONFIG_FILE).is_file():
            hint += f" It holds one in {path / 'adapter'}: give that folder."
        raise AdapterFileError(f"{path} has no {CONFIG_FILE}; it was not written by paretune.save.{hint}")
    meta = read_json(cfg, what="adapter description", error=AdapterFileError, hint="Save the adapter again.")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterFileError(f"{cfg} is not a paretune adapter description (format != {FORMAT!r}).")
    version = meta.get("format_version", 0)
    if _is_int(version) and version > FORMAT_VERSION:
        raise AdapterFileError(
            f"{cfg} has format version {meta['format_version']}; this paretune ({__version__}) reads up to "
            f"{FORMAT_VERSION}. Upgrade paretune."
        )
    for key in ("method", "config", "targets", "fingerprint"):
        if key not in meta:
            raise AdapterFileError(f"{cfg} is missing {key!r}; the file is corrupt.")
    _check_fields(meta, cfg)
    return meta


def _check_finite(tensors: dict[str, torch.Tensor], f: Path) -> None:
    for key, t in tensors.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise AdapterFileError(
                f"{f}: tensor {key!r} holds {bad} NaN or infinite value(s); the adapter is damaged or its training "
                "diverged (retrain with a lower learning rate). Refused, since it would turn outputs into NaN."
            )


def _read_safetensors(f: Path) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{f} is corrupt or truncated ({e}); save the adapter again.") from None
    _check_finite(tensors, f)
    return tensors


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter.safetensors`` (refused when missing, corrupt, or holding NaN/inf)."""
    f = Path(path) / WEIGHTS_FILE
    if not f.is_file():
        raise AdapterFileError(f"{Path(path)} has no {WEIGHTS_FILE}; the adapter folder is incomplete.")
    return _read_safetensors(f)


def read_heads(path: str | os.PathLike, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The task-head tensors of an adapter folder (``head.safetensors``), {} when it saved none;
    every tensor must belong to a module the description lists under ``heads``."""
    heads = meta.get("heads")
    f = Path(path) / HEAD_FILE
    if not heads:
        return {}
    if not f.is_file():
        raise AdapterFileError(f"{Path(path)} lists heads {heads} but has no {HEAD_FILE}; the adapter folder is "
                               "incomplete. Save the adapter again.")
    tensors = _read_safetensors(f)
    for key in tensors:
        if not any(key.startswith(h + ".") for h in heads):
            raise AdapterFileError(f"{f}: tensor {key!r} belongs to none of the heads {heads}; the file is corrupt.")
    for h in heads:
        if not any(key.startswith(h + ".") for key in tensors):
            raise AdapterFileError(f"{f} holds no tensor of head {h!r}; the file is corrupt. Save the adapter again.")
    return tensors


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
        if have != {"kind": want.get("kind"), "shape": want.get("shape")}:
            problems.append(f"{name}: saved {want.get('kind')} {want.get('shape')}, model has {have['kind']} "
                            f"{have['shape']}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
        raise AdapterFileError(
            f"the adapter in {path} was made for another base model ({meta.get('base_model') or 'unknown'}): "
            f"{shown}. Load it onto the model it was trained on."
        )


def _saved_config(spec: registry.MethodSpec, meta: dict[str, Any], path: Any):
    from .errors import ConfigError

    try:
        return spec.config_cls.from_dict(spec.config_cls.upgrade(dict(meta["config"])))
    except ConfigError as e:
        raise AdapterFileError(f"{Path(path) / CONFIG_FILE}: the saved config is invalid ({e}); the file was edited "
                               "or written by another version. Save the adapter again.") from None


def check_base_weights(model: nn.Module, meta: dict[str, Any], path: Any, *, config: Any = None) -> None:
    """Compare the model's base weights at the saved targets with the saved ``weights_sha256``
    (nothing to compare for a folder saved before it existed). A mismatch is an
    :class:`AdapterFileError` for a method whose ΔW depends on the base weights (the registry's
    ``base_dependent``), a :class:`BaseWeightsWarning` otherwise."""
    want = meta["fingerprint"].get("weights_sha256")
    if want is None:
        return
    have = base_weights_sha256(model, meta["targets"])
    if have == want:
        return
    spec = registry.get(meta["method"])
    config = config if config is not None else _saved_config(spec, meta, path)
    base = meta.get("base_model") or "unknown"
    if spec.depends_on_base_weights(config):
        raise AdapterFileError(
            f"the {spec.name} adapter in {path} was saved on other base weights (same shapes, other values; saved "
            f"from {base}): a {spec.name} adapter's change depends on the base weights themselves, so here it would "
            "silently be another adapter. Load it onto the exact model it was trained on (same weights and dtype), "
            "or pass check_base=False to load it anyway."
        )
    warnings.warn(BaseWeightsWarning(
        f"the {spec.name} adapter in {path} was saved on other base weights (same shapes, other values; saved from "
        f"{base}, or the same model in another dtype); its saved change is applied unchanged to these weights. "
        "Pass check_base=False to silence this."), stacklevel=3)


def _check_heads(model: nn.Module, heads: dict[str, torch.Tensor], path: Any) -> dict[str, torch.Tensor]:
    """The model's parameter for every saved head tensor, checked for presence and shape."""
    targets: dict[str, torch.Tensor] = {}
    for key, t in heads.items():
        try:
            p = model.get_parameter(key)
        except AttributeError:
            raise AdapterFileError(f"{path}: the saved head tensor {key!r} has no parameter of that name on this "
                                   "model; load it onto the architecture it was trained with.") from None
        if tuple(p.shape) != tuple(t.shape):
            raise AdapterFileError(
                f"{path}: head tensor {key!r} has shape {tuple(t.shape)}, the model's has {tuple(p.shape)}; the head "
                "was trained for another number of labels. Build the model with that many labels (num_labels=...)."
            )
        targets[key] = p
    return targets


@torch.no_grad()
def _restore_heads(model: nn.Module, params: dict[str, torch.Tensor], heads: dict[str, torch.Tensor],
                   meta: dict[str, Any]) -> None:
    for key, p in params.items():
        p.copy_(heads[key].to(p.dtype))
    id2label = meta.get("id2label")
    config = getattr(model, "config", None)
    if id2label and config is not None:
        config.id2label = {int(k): v for k, v in id2label.items()}
        config.label2id = {v: int(k) for k, v in id2label.items()}


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


def adapter_folder(path: str | os.PathLike) -> Path:
    """The local folder of an adapter: ``path`` itself when it exists or looks like a path (then
    :func:`read_meta` says what is wrong with it), else a Hugging Face Hub id fetched as
    transformers fetches models (:func:`paretune.hub.resolve_adapter`: ``paretune.json`` and the
    tensor files only; offline without a cached copy is a clear error)."""
    from .core.atomic import recover
    from .hub import resolve_adapter
    from .models import _looks_local

    local = Path(os.path.expanduser(os.fspath(path)))
    recover(local)
    if local.exists() or _looks_local(os.fspath(path)):
        return local
    return resolve_adapter(path, [CONFIG_FILE, WEIGHTS_FILE, HEAD_FILE], f"paretune adapter folder (with {CONFIG_FILE})")


def load(model: nn.Module, path: str | os.PathLike, name: str | None = None, *, trainable: bool = False,
         check_base: bool = True, verify: bool = True) -> nn.Module:
    """Add the adapter saved in folder ``path`` (or on the Hugging Face Hub under that id) to
    ``model`` (in place) and return the model.

    ``name`` defaults to the saved name. The adapter is active; its parameters are trainable only
    with ``trainable=True``. A saved task head (``heads`` in ``paretune.json``) is copied into the
    model's head parameters and its label names into ``model.config.id2label`` / ``label2id``.
    Nothing changes on the model if a file is corrupt, the base differs in shape, or (for a method
    whose ΔW depends on the base weights) in weights; ``check_base=False`` skips the weights
    comparison (see the module docstring). A folder whose files or options changed after it was
    saved is refused (:func:`verify_checksums`); ``verify=False`` loads it as it is.
    """

    path = adapter_folder(path)  # a Hugging Face Hub id works too
    meta = read_meta(path)
    tensors = read_tensors(path)
    heads = read_heads(path, meta)
    if verify:
        verify_checksums(path, meta)
    spec = registry.get(meta["method"])
    config = _saved_config(spec, meta, path)
    check_fingerprint(model, meta, path)
    head_params = _check_heads(model, heads, path)
    if check_base:
        check_base_weights(model, meta, path, config=config)
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
    _restore_heads(model, head_params, heads, meta)
    for p in model.parameters():
        p.requires_grad_(grad.get(id(p), trainable))
    return model


def hot_swap(model: nn.Module, path: str | os.PathLike, name: str = "default", *,
             check_base: bool = True, verify: bool = True) -> nn.Module:
    """Load the adapter saved in ``path`` into the slots of adapter ``name`` in place: the same
    modules and the same parameter tensors get the new values (``copy_``), so a ``torch.compile``d
    model runs the new adapter without recompiling, and an optimizer holding the parameters keeps
    them. The saved adapter must have the same method, targets and shape-deciding options
    (everything in its config but values that only affect initialisation); otherwise this is a
    clear error and nothing changes. The base weights and checksums are compared as by :func:`load`
    (``check_base=False``, ``verify=False`` skip them); a saved task head is not swapped."""
    rec = record_of(model, name)
    path = adapter_folder(path)
    meta = read_meta(path)
    tensors = read_tensors(path)
    if verify:
        verify_checksums(path, meta)
    check_fingerprint(model, meta, path)
    if meta["method"] != rec.method:
        raise AdapterFileError(f"{path} holds a {meta['method']} adapter; adapter {name!r} is {rec.method}. "
                               "Hot-swap needs the same method: use paretune.load to add it as a new adapter.")
    if list(meta["targets"]) != list(rec.targets):
        raise AdapterFileError(f"{path} adapts other modules than adapter {name!r}; hot-swap needs the same targets.")
    if check_base:
        check_base_weights(model, meta, path)
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

