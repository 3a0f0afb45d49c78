"""Save and load a quantised and/or pruned model as a folder.

A compressed folder holds:

* ``config.json`` (and ``generation_config.json`` where the model has one): the transformers config;
* the tokenizer's files, when one is given;
* ``paretune_compressed.safetensors``: for a model with quantised layers, the whole state dict with
  each quantised layer's packed codes (``<module>.packed``, uint8), ``<module>.scales`` /
  ``<module>.zeros`` (float16) and bias, every other tensor as it is (tied tensors once, by
  safetensors' ``save_model``); and for every pruned module its mask, ``<module>.prune_mask_packed``;
* ``paretune_compress.json``: format version, library version, the model class, per quantised
  module its bits, group size, axis, shape, bias and dtype (``modules``), per pruned module its
  mask's shape, weights, pruned weights and sparsity (``pruned``), and which file holds the
  weights (``weights_file``).

Masks. A prune mask (True = kept; :mod:`paretune.compress.pruning`) is stored as packed bits,
uint8, eight mask entries per byte, entry i of the flattened mask (row-major, in the module's own
weight layout: (out, in) for Linear and QuantizedLinear, (in, out) for GPT-2 Conv1D) at bit i mod 8
of byte i // 8 (least significant bit first, numpy's ``packbits(..., bitorder="little")``; the last
byte is padded with zero bits). Its shape is in the JSON. On loading, a float layer gets its mask
back with pruning's hook (the weight stays zero where pruned through training and merging); a
quantised layer gets it as its ``prune_mask`` buffer, which ``QuantizedLinear.dequantized_weight``
applies.

Pruned and quantised. Round-to-nearest with a zero point does not reproduce an exact zero
(x̂ = q·s + z is zero only by accident), so a quantised layer keeps its mask and the effective
weight is ``Ŵ ⊙ M``: ``QuantizedLinear.dequantized_weight`` (and so its forward pass, merging and
the float copy) zeroes the pruned positions exactly. The codes of the pruned positions are stored
as they are (dense). The two orders: :func:`paretune.compress.quantize` of a pruned model moves
each mask onto the new QuantizedLinear (the float weight is masked first, so its groups' ranges
are those of the pruned weight); :func:`paretune.compress.prune` of a quantised model calls
:func:`prune_quantized`, which prunes it, scoring the
dequantised weight Ŵ (each QuantizedLinear stands in as a float Linear of weight Ŵ for the time
of :func:`paretune.compress.prune`, then gets the new mask; its codes are not changed).

Float weights. A pruned model without any quantised layer is stored as a plain transformers
``model.safetensors`` (pruned weights are zeros in it; tied tensors once, under their first name)
that ``transformers.AutoModel*.from_pretrained(folder)`` reads directly; its
``paretune_compressed.safetensors`` then holds the packed masks only. The packed file of a
quantised model is deliberately not named ``model.safetensors``: transformers cannot read packed
codes. With ``dequantized=True`` a plain ``model.safetensors`` of the dequantised float weights
(masked: pruned positions zero) is written beside it, which transformers reads as an ordinary model
with the same outputs, at float size. Storage is dense throughout: the zeros of pruned weights take
as much room as any other weight (no sparse format).

Version 1 folders (quantised only, written before masks were stored) are still read.

The folder is written atomically (:func:`paretune.core.atomic.atomic_dir`): a failure leaves nothing
at ``out``, or the folder that was there before. Nothing unpickles: tensors are safetensors, the rest
JSON.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ..core.atomic import atomic_dir
from ..core.host import Host
from ..core.jsonfile import read_json
from ..errors import AdapterFileError, ParetuneError
from .quantize import Targets, quantized_modules
from .quantized import AXES, BITS, QuantizedLinear

META_FILE = "paretune_compress.json"
WEIGHTS_FILE = "paretune_compressed.safetensors"
FLOAT_FILE = "model.safetensors"
MASK_SUFFIX = "prune_mask_packed"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MASK = "prune_mask"  # the buffer name of paretune.compress.pruning (True = kept)

__all__ = ["save_compressed", "load_compressed", "is_compressed", "info", "read_meta", "pack_bits", "unpack_bits",
           "install_mask", "prune_quantized"]


def is_compressed(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a folder :func:`save_compressed` wrote."""
    return (Path(folder) / META_FILE).is_file()


# -- masks as bits -------------------------------------------------------------------------------
def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor -> uint8 bytes, eight entries a byte, entry i of the flattened tensor at bit
    i mod 8 of byte i // 8 (least significant first; the last byte padded with zero bits)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) << shifts).sum(1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: Iterable[int]) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: a boolean tensor of ``shape``."""
    shape = tuple(int(d) for d in shape)
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != math.ceil(numel / 8):
        raise AdapterFileError(f"a packed mask of {packed.numel()} {packed.dtype} entries does not hold a mask of shape "
                               f"{shape} ({math.ceil(numel / 8)} uint8 bytes).")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed[:, None] >> shifts) & 1
    return bits.reshape(-1)[:numel].bool().view(shape)


# -- masks on modules ----------------------------------------------------------------------------
def _mask_shape(module: nn.Module) -> tuple[int, ...]:
    if isinstance(module, QuantizedLinear):
        return (module.out_features, module.in_features)
    return tuple(module.weight.shape)


def install_mask(module: nn.Module, mask: torch.Tensor) -> None:
    """Give ``module`` a prune mask (boolean, True = kept, the module's weight layout; AND-ed with a
    mask it already has). A Linear / GPT-2 Conv1D gets pruning's mask and hook (its pruned weights
    are zeroed now and kept zero); a QuantizedLinear gets its ``prune_mask`` buffer (non-persistent),
    applied by its ``dequantized_weight``; its codes are not changed."""
    from .pruning import _install

    if mask.dtype != torch.bool:
        raise ParetuneError(f"install_mask: the mask must be a boolean tensor (True = kept), not {mask.dtype}.")
    if tuple(mask.shape) != _mask_shape(module):
        raise ParetuneError(f"install_mask: the mask's shape {tuple(mask.shape)} is not the weight's "
                            f"{_mask_shape(module)} ({type(module).__name__}).")
    if isinstance(module, QuantizedLinear):
        old = module._buffers.get(MASK)
        mask = mask.to(module.packed.device)
        module.register_buffer(MASK, (mask & old if old is not None else mask).contiguous(), persistent=False)
    else:
        _install(module, mask.contiguous())


def _pruned_modules(model: nn.Module) -> dict[str, nn.Module]:
    from .pruning import _masked_modules

    return dict(_masked_modules(model))


@torch.no_grad()
def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def prune_quantized(model: nn.Module, sparsity: float, method: str = "magnitude", *, targets: Targets = None,
                    calibration: Iterable | None = None, progress: bool = True) -> dict[str, Any]:
    """:func:`paretune.compress.prune` for a model with quantised layers (quantise, then prune).

    Each QuantizedLinear is replaced, for the time of the call, by a float Linear holding its
    (masked) dequantised weight Ŵ, its bias and its mask; ``prune`` scores and masks those as any
    Linear (so magnitude and Wanda scores are computed on Ŵ, and Wanda's calibration pass runs the
    same function the quantised model computes); then the QuantizedLinear layers are put back, each
    with the new mask as its ``prune_mask`` buffer. The codes are unchanged; the effective weight is
    Ŵ ⊙ M, exactly zero where pruned. Arguments and the report are ``prune``'s (the report's
    ``model_params`` counts each quantised layer's weight as its in·out numbers). Costs the float
    size of the quantised layers while it runs. On error the model is as it was."""
    from .pruning import prune

    if any(isinstance(m, Host) for m in model.modules()):
        raise ParetuneError("prune_quantized: the model carries adapters; merge (paretune.merge) or unload them "
                            "(paretune.unload) first.")
    swapped: dict[str, tuple[QuantizedLinear, nn.Linear]] = {}
    new_masks: dict[str, torch.Tensor] = {}
    try:
        for name, q in quantized_modules(model).items():
            lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, dtype=q.dtype,
                            device=q.packed.device)
            with torch.no_grad():
                lin.weight.copy_(q.dequantized_weight())
                if q.bias is not None:
                    lin.bias.copy_(q.bias)
            lin.requires_grad_(False)
            lin.train(q.training)
            if q._buffers.get(MASK) is not None:
                install_mask(lin, q._buffers[MASK])
            _set_module(model, name, lin)
            swapped[name] = (q, lin)
        report = prune(model, sparsity, method, targets=targets, calibration=calibration, progress=progress)
        for name, (_, lin) in swapped.items():
            if lin._buffers.get(MASK) is not None:
                new_masks[name] = lin._buffers[MASK]
    finally:
        for name, (q, _) in swapped.items():
            _set_module(model, name, q)
    for name, mask in new_masks.items():
        q = swapped[name][0]
        q.register_buffer(MASK, mask.clone(), persistent=False)  # already AND-ed with the old one by prune
    return report


# -- saving --------------------------------------------------------------------------------------
def _pruned_meta(pmods: dict[str, nn.Module]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, m in pmods.items():
        mask = m._buffers[MASK]
        n, z = mask.numel(), int((~mask).sum())
        out[name] = {"shape": list(mask.shape), "weights": n, "pruned": z, "sparsity": z / n if n else 0.0,
                     "quantized": isinstance(m, QuantizedLinear)}
    return out


def save_compressed(model: nn.Module, out: str | os.PathLike, tokenizer: Any = None, *,
                    dequantized: bool = False) -> Path:
    """Write the quantised and/or pruned ``model`` (and ``tokenizer``) to the folder ``out`` (module
    docstring); returns its path. A model with quantised layers goes to the packed file;
    ``dequantized=True`` also writes a plain float ``model.safetensors`` (pruned positions zero)
    that transformers loads. A pruned model without quantised layers always gets a plain
    ``model.safetensors`` (``dequantized`` changes nothing). The pruned weights of float layers are
    zeroed in place first (as :func:`paretune.compress.apply_masks` does). Refused: a model with no
    quantised and no pruned layer, a model without a transformers config, a model carrying adapters
    (merge or unload them first: a merged adapter is already in the weights)."""
    from safetensors.torch import save_file, save_model

    from .. import __version__

    qmods = quantized_modules(model)
    pmods = _pruned_modules(model)
    if not qmods and not pmods:
        raise ParetuneError("save_compressed: the model has no quantised layer and no pruned layer; quantise it "
                            "(paretune.compress.quantize(model, bits=4)) or prune it (paretune.compress.prune(model, "
                            "0.5)) first.")
    if any(isinstance(m, Host) for m in model.modules()):
        raise ParetuneError("save_compressed: the model carries adapters; save them with paretune.save, and merge "
                            "(paretune.merge) or unload (paretune.unload) them before saving the compressed base.")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise ParetuneError("save_compressed: the model has no transformers config (model.config); only transformers "
                            "models can be saved as a compressed folder.")
    with torch.no_grad():
        for m in pmods.values():
            if not isinstance(m, QuantizedLinear):
                m.weight.mul_(m._buffers[MASK].to(m.weight.dtype))
    packed_masks = {name: pack_bits(m._buffers[MASK]).cpu() for name, m in pmods.items()}
    meta = {
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "model_class": type(model).__name__,
        "modules": {n: m.settings() for n, m in qmods.items()},
        "pruned": _pruned_meta(pmods),
        "weights_file": WEIGHTS_FILE if qmods else FLOAT_FILE,
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
        if qmods:
            added = []
            try:  # the packed masks travel in the state dict for the time of the write
                for name, packed in packed_masks.items():
                    m = pmods[name]
                    m.register_buffer(MASK_SUFFIX, packed.to(m._buffers[MASK].device), persistent=True)
                    added.append(m)
                save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            finally:
                for m in added:
                    del m._buffers[MASK_SUFFIX]
        else:
            save_file({f"{n}.{MASK_SUFFIX}": t.contiguous() for n, t in packed_masks.items()}, str(tmp / WEIGHTS_FILE),
                      metadata={"format": "pt"})
        if dequantized or not qmods:
            state = {}
            for k, v in model.state_dict().items():
                mod, _, leaf = k.rpartition(".")
                if mod in qmods:
                    if leaf == "packed":
                        state[f"{mod}.weight"] = qmods[mod].dequantized_weight().contiguous()
                    elif leaf == "bias":
                        state[k] = v.contiguous()
                    continue
                state[k] = v
            save_model_plain(state, tmp / FLOAT_FILE, save_file)
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


# -- reading -------------------------------------------------------------------------------------
def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """The checked ``paretune_compress.json`` of a compressed folder (format version 1 or 2; a
    version 1 description is returned with empty ``pruned`` and the packed ``weights_file``)."""
    folder = Path(folder)
    where = folder / META_FILE
    meta = read_json(where, what="compressed-model description", error=AdapterFileError)
    if not isinstance(meta, dict) or not isinstance(meta.get("modules"), dict):
        raise AdapterFileError(f"{where} has no 'modules' table; the folder was not written by "
                               "paretune.compress.save_compressed, or is damaged.")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise AdapterFileError(f"{where}: format_version {version!r} is not one this paretune reads "
                               f"({', '.join(map(str, READABLE_VERSIONS))}); upgrade paretune to read it.")
    for name, s in meta["modules"].items():
        ok = (isinstance(s, dict) and s.get("bits") in BITS and s.get("axis") in AXES
              and (s.get("group_size") is None or isinstance(s.get("group_size"), int))
              and isinstance(s.get("in_features"), int) and isinstance(s.get("out_features"), int))
        if not ok:
            raise AdapterFileError(f"{where}: the entry for {name!r} is not a valid quantised-layer "
                                   "description (bits, group_size, axis, in_features, out_features).")
    meta = dict(meta)
    meta.setdefault("pruned", {})
    meta.setdefault("weights_file", WEIGHTS_FILE)
    if not isinstance(meta["pruned"], dict) or meta["weights_file"] not in (WEIGHTS_FILE, FLOAT_FILE):
        raise AdapterFileError(f"{where}: 'pruned' must be a table and 'weights_file' {WEIGHTS_FILE} or {FLOAT_FILE}; "
                               "the file is damaged.")
    for name, s in meta["pruned"].items():
        ok = (isinstance(s, dict) and isinstance(s.get("shape"), list) and s["shape"]
              and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in s["shape"])
              and isinstance(s.get("weights"), int) and isinstance(s.get("pruned"), int))
        if not ok:
            raise AdapterFileError(f"{where}: the entry for the pruned module {name!r} is not a valid mask "
                                   "description (shape, weights, pruned).")
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
    quantised module replaced by an empty QuantizedLinear of the recorded settings, every tensor read
    from the weights file (strictly: a missing or unexpected tensor is an error), then each recorded
    prune mask unpacked and installed (:func:`install_mask`). Returns ``(model, tokenizer)``
    (tokenizer None when the folder has none), the model in eval mode. ``dtype`` is the dtype of the
    non-quantised tensors (default: as saved)."""
    from safetensors import safe_open
    from safetensors.torch import load_model
    from transformers import AutoConfig

    from ..models import _auto_class, _check_task, _finish, _is_causal, _resolve_dtype

    folder = Path(folder)
    meta = read_meta(folder)
    weights = folder / meta["weights_file"]
    for f in {weights, folder / WEIGHTS_FILE} if meta["pruned"] else {weights}:
        if not f.is_file():
            raise AdapterFileError(f"{folder} has {META_FILE} but no {f.name}; the folder is incomplete. Save the "
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
            _set_module(model, name, q)
    except AttributeError as e:
        raise AdapterFileError(f"{folder}: a quantised module of {META_FILE} is not in the model its config builds "
                               f"({e}).") from None
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (RuntimeError, OSError, ValueError) as e:
        raise AdapterFileError(f"{weights} could not be read into the model ({e}); the file is damaged or does not "
                               "belong to this config.") from None
    mask_keys = {f"{n}.{MASK_SUFFIX}" for n in meta["pruned"]}
    unexpected = [k for k in unexpected if k not in mask_keys]
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
    if meta["pruned"]:
        mask_file = folder / WEIGHTS_FILE
        with safe_open(str(mask_file), framework="pt") as f:
            keys = set(f.keys())
            for name, s in meta["pruned"].items():
                key = f"{name}.{MASK_SUFFIX}"
                if key not in keys:
                    raise AdapterFileError(f"{mask_file} has no mask {key} that {META_FILE} lists; the folder is "
                                           "damaged. Save the model again.")
                try:
                    module = model.get_submodule(name)
                except AttributeError:
                    raise AdapterFileError(f"{folder}: the pruned module {name!r} of {META_FILE} is not in the model "
                                           "its config builds.") from None
                if tuple(s["shape"]) != _mask_shape(module):
                    raise AdapterFileError(f"{folder}: the mask of {name} has shape {tuple(s['shape'])}, the module's "
                                           f"weight {_mask_shape(module)}; the folder is damaged.")
                install_mask(module, unpack_bits(f.get_tensor(key), s["shape"]))
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None
    return _finish(model, tokenizer, task)  # pad token as paretune.models.load gives it; eval mode


def info(folder: str | os.PathLike) -> dict[str, Any]:
    """What a compressed folder holds (for ``paretune info``): quantisation settings and modules,
    the bytes of the packed layers against their float size, the pruned modules and their overall
    sparsity, and the files' sizes. Storage is dense: ``stored_zeros`` pruned weights are stored as
    zeros (float layers) or as codes masked to zero (quantised layers)."""
    from .quantize import expected_bytes

    folder = Path(folder)
    meta = read_meta(folder)
    mods = meta["modules"]
    pruned = meta["pruned"]
    settings = sorted({(s["bits"], s["group_size"], s["axis"]) for s in mods.values()}, key=str)
    float_bytes = sum(s["in_features"] * s["out_features"] * torch.empty((), dtype=getattr(torch, s.get("dtype",
                      "float32"))).element_size() for s in mods.values())
    packed = sum(expected_bytes(s["out_features"], s["in_features"], s["bits"], s["group_size"], s["axis"])
                 for s in mods.values())
    weights = sum(s["weights"] for s in pruned.values())
    zeros = sum(s["pruned"] for s in pruned.values())
    files = {name: (folder / name).stat().st_size for name in (WEIGHTS_FILE, FLOAT_FILE) if (folder / name).is_file()}
    return {
        "format": "paretune-compressed",
        "format_version": meta.get("format_version"),
        "path": str(folder),
        "model_class": meta.get("model_class"),
        "settings": [{"bits": b, "group_size": g, "axis": a} for b, g, a in settings],
        "quantized_modules": len(mods),
        "quantized_weight_bytes": packed,
        "float_weight_bytes": float_bytes,
        "pruned_modules": len(pruned),
        "pruned_layer_weights": weights,
        "pruned_weights": zeros,
        "sparsity": zeros / weights if weights else 0.0,
        "storage": "dense",
        "stored_zeros": zeros,
        "weights_file": meta["weights_file"],
        "file_bytes": files.get(meta["weights_file"]),
        "files": files,
        "dequantized_copy": bool(mods) and FLOAT_FILE in files,
        "float_copy": FLOAT_FILE in files,
        "library_version": meta.get("library_version"),
    }
