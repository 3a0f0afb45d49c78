"""PEFT interop: write a paretune adapter as a PEFT LoRA folder, and read one back.

The PEFT LoRA format (``adapter_config.json`` + ``adapter_model.safetensors``) is what PEFT's
``PeftModel.from_pretrained`` and vLLM load. Keys are
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (``lora_embedding_A`` /
``lora_embedding_B`` for embeddings), with A (r, d_in) and B (d_out, r) in the layouts paretune
uses too (Conv2d: A as an (r, in, kh, kw) kernel, B as (out, r, 1, 1)).

Any method whose delta has an exact LoRA form exports (``Delta.as_lora``; ``paretune methods``
marks them): LoRA, PiSSA (as the rank-2r LoRA relative to the original weights), NOLA, VeRA,
RandLoRA, LaMDA and Block-LoRA, each as the LoRA factors its ΔW is made of. The scaling is written
as ``lora_alpha = s·r`` so PEFT's ``alpha / r`` reproduces it exactly. Import reads PEFT LoRA
folders into paretune LoRA adapters.
"""

from __future__ import annotations

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
from .errors import AdapterFileError
from .api import adapt, remove
from .core import registry
from .core.atomic import atomic_dir
from .core.delta import Delta
from .core.jsonfile import read_json
from .core.state import record_of, state_of

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_SUFFIXES = {
    ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B",
}


def exportable_methods() -> list[str]:
    """Registered methods whose deltas have an exact LoRA form (so PEFT's LoRA format holds them)."""
    return [n for n, spec in registry.all_methods().items() if spec.delta_cls.as_lora is not Delta.as_lora]


def export_peft(
    model: nn.Module, path: str | os.PathLike, name: str = "default", *, base_model_name_or_path: str | None = None,
) -> Path:
    """Write adapter ``name`` as a PEFT LoRA folder at ``path`` (atomically); returns the path."""
    rec = record_of(model, name)
    if state_of(model).is_merged(name):
        raise AdapterFileError(f"adapter {name!r} is merged; unmerge it before exporting.")
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
                f"save it with paretune.save instead (methods that export: {', '.join(exportable_methods())})."
            )
        a, b, s = lora
        kind = host.kind
        kinds.add(kind)
        r = a.shape[0]
        ranks[module_name], alphas[module_name] = r, s * r
        key = PREFIX + module_name
        if kind == "embedding":
            tensors[key + ".lora_embedding_A"] = a
            tensors[key + ".lora_embedding_B"] = b
        else:
            if kind == "conv2d":
                base = host.base
                a = a.reshape(r, base.in_channels, *base.kernel_size)
                b = b.reshape(b.shape[0], r, 1, 1)
            tensors[key + ".lora_A.weight"] = a
            tensors[key + ".lora_B.weight"] = b
    r0 = ranks[rec.targets[0]]
    alpha0 = alphas[rec.targets[0]]
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path
        or getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": r0,
        "lora_alpha": alpha0,
        "lora_dropout": float(getattr(rec.config, "dropout", 0.0)),
        "target_modules": list(rec.targets),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": "conv1d" in kinds,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {m: r for m, r in ranks.items() if r != r0},
        "alpha_pattern": {m: a for m, a in alphas.items() if a != alpha0},
        "inference_mode": True,
        "revision": None,
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt", "exported_by": f"paretune {__version__} ({rec.method})"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return Path(path)


_UNSUPPORTED = {
    "use_dora": "DoRA", "lora_bias": "LoRA bias terms", "layer_replication": "layer replication",
    "modules_to_save": "modules_to_save (fully trained extra modules)", "use_qalora": "QA-LoRA",
    "trainable_token_indices": "trainable tokens", "target_parameters": "target_parameters",
}


def _read_peft(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg_file = path / PEFT_CONFIG
    if not cfg_file.is_file():
        raise AdapterFileError(f"{path} has no {PEFT_CONFIG}; it is not a PEFT adapter folder.")
    cfg = read_json(cfg_file, what="PEFT adapter config", error=AdapterFileError)
    if not isinstance(cfg, dict):
        raise AdapterFileError(f"{cfg_file} is not a PEFT adapter config (a JSON object).")
    if cfg.get("peft_type") != "LORA":
        raise AdapterFileError(f"{path} holds a PEFT {cfg.get('peft_type')!r} adapter; import_peft reads LORA only.")
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key) not in (None, False, [], {}):
            raise AdapterFileError(f"{path} uses {what} ({key}={cfg[key]!r}), which import_peft does not support.")
    if cfg.get("bias", "none") != "none":
        raise AdapterFileError(f"{path} trains biases (bias={cfg['bias']!r}); import_peft supports bias='none' only.")
    weights = path / PEFT_WEIGHTS
    if not weights.is_file():
        hint = " Convert adapter_model.bin to safetensors first." if (path / "adapter_model.bin").exists() else ""
        raise AdapterFileError(f"{path} has no {PEFT_WEIGHTS}.{hint}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{weights} is corrupt or truncated ({e}).") from None
    return cfg, tensors


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def import_peft(model: nn.Module, path: str | os.PathLike, name: str = "default") -> nn.Module:
    """Read a PEFT LoRA folder into ``model`` as paretune LoRA adapter ``name`` (in place)."""

    path = Path(path)
    cfg, tensors = _read_peft(path)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.endswith(".base_layer.weight"):
            continue  # PEFT may save the embedding's base weight too; paretune keeps the model's
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(PREFIX):
            raise AdapterFileError(f"{path}: unexpected tensor {key!r} in a PEFT LoRA file.")
        module = key[len(PREFIX):-len(suffix)]
        factors.setdefault(module, {})[_SUFFIXES[suffix]] = t
    if not factors:
        raise AdapterFileError(f"{path}: the PEFT file holds no LoRA tensors.")
    settings = set()
    for module, ab in factors.items():
        if set(ab) != {"A", "B"}:
            raise AdapterFileError(f"{path}: module {module} lacks lora_A or lora_B; the file is corrupt.")
        r = int(ab["A"].shape[0])
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8))
        settings.add((r, float(alpha)))
    if len(settings) > 1:
        raise AdapterFileError(
            f"{path} gives its modules different ranks or alphas {sorted(settings)}; paretune adapters use one "
            "rank and alpha per adapter. Import it as several adapters, one per setting."
        )
    (r, alpha), = settings
    missing = [m for m in factors if not _exists(model, m)]
    if missing:
        raise AdapterFileError(
            f"{path} adapts modules this model does not have: {missing[:5]}; load it onto its base model "
            f"({cfg.get('base_model_name_or_path') or 'unknown'})."
        )
    exact = "|".join(re.escape(m) for m in factors)
    adapt(model, "lora", name=name, targets=exact, r=r, alpha=alpha, rslora=bool(cfg.get("use_rslora", False)),
          dropout=float(cfg.get("lora_dropout", 0.0)))
    try:
        for module, ab in factors.items():
            delta = model.get_submodule(module).deltas[name]
            delta.load_stored({"A": ab["A"].reshape(r, -1), "B": ab["B"].reshape(ab["B"].shape[0], r)}, where=module)
    except Exception:
        remove(model, name)
        raise
    return model


def _exists(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False
