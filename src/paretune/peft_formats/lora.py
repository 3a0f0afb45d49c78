"""PEFT LoRA: ``<module>.lora_A.weight`` (r, d_in) / ``lora_B.weight`` (d_out, r), ΔW = (alpha/r)·B·A
(alpha/√r with ``use_rslora``); embeddings as ``lora_embedding_A`` / ``lora_embedding_B``, Conv2d
A as an (r, in, kh, kw) kernel and B as (out, r, 1, 1). Every paretune method with an exact LoRA
form (``Delta.as_lora``) is written this way, with ``lora_alpha = s·r`` so that PEFT's alpha / r
is the method's own scaling s exactly; imports become paretune ``lora`` adapters."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..api import adapt, remove
from ..core.state import AdapterRecord
from ..errors import AdapterFileError
from .common import PREFIX, Fields, check_modules, one_setting, pattern_value, split_keys

SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B"}

_UNSUPPORTED = {
    "use_dora": "DoRA", "lora_bias": "LoRA bias terms", "layer_replication": "layer replication",
    "use_qalora": "QA-LoRA", "trainable_token_indices": "trainable tokens", "target_parameters": "target_parameters",
}


def export(model: nn.Module, rec: AdapterRecord, name: str, methods: list[str]) -> tuple[dict, dict]:
    """(config fields, tensors) of adapter ``name`` in PEFT's LoRA format."""
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    kinds = set()
    for module_name in rec.targets:
        host = model.get_submodule(module_name)
        lora = host.deltas[name].as_lora()
        if lora is None:
            raise AdapterFileError(
                f"{rec.method} has no exact LoRA form, so it cannot be written in PEFT's LoRA format; "
                f"save it with paretune.save instead (methods that export: {', '.join(methods)}).")
        a, b, s = lora
        kinds.add(host.kind)
        r = a.shape[0]
        ranks[module_name], alphas[module_name] = r, s * r
        key = PREFIX + module_name
        if host.kind == "embedding":
            tensors[key + ".lora_embedding_A"], tensors[key + ".lora_embedding_B"] = a, b
            continue
        if host.kind == "conv2d":
            base = host.base
            a = a.reshape(r, base.in_channels, *base.kernel_size)
            b = b.reshape(b.shape[0], r, 1, 1)
        tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = a, b
    r0, alpha0 = ranks[rec.targets[0]], alphas[rec.targets[0]]
    config: dict[str, Any] = {
        "peft_type": "LORA", "r": r0, "lora_alpha": alpha0,
        "lora_dropout": float(getattr(rec.config, "dropout", 0.0)),
        "target_modules": list(rec.targets), "bias": "none", "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": "conv1d" in kinds, "init_lora_weights": True,
        "rank_pattern": {m: r for m, r in ranks.items() if r != r0},
        "alpha_pattern": {m: a for m, a in alphas.items() if a != alpha0},
    }
    return config, tensors


def load(model: nn.Module, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], name: str, path: Any) -> None:
    """Add PEFT LoRA ``tensors`` to ``model`` as paretune ``lora`` adapter ``name``."""
    f = Fields(cfg, path)
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key) not in (None, False, [], {}):
            raise AdapterFileError(f"{path} uses {what} ({key}={cfg[key]!r}), which import_peft does not support.")
    default_r = f.int("r", 8)
    default_alpha = f.number("lora_alpha", 8)
    rslora = f.flag("use_rslora")
    dropout = f.probability("lora_dropout")
    alpha_pattern = f.pattern("alpha_pattern", "number")
    f.pattern("rank_pattern", "int")
    factors = split_keys(tensors, SUFFIXES, path, "LoRA")
    settings = set()
    for module, ab in factors.items():
        if set(ab) != {"A", "B"}:
            raise AdapterFileError(f"{path}: module {module} lacks lora_A or lora_B; the file is corrupt.")
        r = int(ab["A"].shape[0])
        if ab["B"].shape[1] != r:
            raise AdapterFileError(f"{path}: module {module} has lora_A of rank {r} but lora_B of shape "
                                   f"{tuple(ab['B'].shape)}; the file is corrupt.")
        settings.add((r, float(pattern_value(alpha_pattern, module, default_alpha))))
    r, alpha = one_setting(settings, path, "ranks or alphas")
    del default_r  # checked for type; the tensors' shapes give the rank
    check_modules(model, list(factors), cfg, path)
    exact = "|".join(re.escape(m) for m in factors)
    adapt(model, "lora", name=name, targets=exact, r=r, alpha=alpha, rslora=rslora, dropout=dropout)
    try:
        for module, ab in factors.items():
            delta = model.get_submodule(module).deltas[name]
            delta.load_stored({"A": ab["A"].reshape(r, -1), "B": ab["B"].reshape(ab["B"].shape[0], r)}, where=module)
    except Exception:
        remove(model, name)
        raise
