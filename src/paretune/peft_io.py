"""PEFT interop: write a paretune adapter as a PEFT adapter folder, and read one back.

A PEFT folder is ``adapter_config.json`` + ``adapter_model.safetensors``, what PEFT's
``PeftModel.from_pretrained`` / ``AutoPeftModelFor*`` (and, for LoRA, vLLM) load. Formats
(``paretune.peft_formats``):

* ``VERA``: paretune ``vera`` (the same formula and draw; the projections are written too);
* ``RANDLORA``: paretune ``randlora`` (exact conversions in ``peft_formats/randlora.py``);
* ``LOKR``: paretune ``kronecker`` where LoKr can express it (``peft_formats/lokr.py``);
* ``LORA``: every other method whose delta has an exact LoRA form (``Delta.as_lora``; ``paretune
  methods`` marks them): LoRA, PiSSA (as the rank-2r LoRA relative to the original weights),
  NOLA, LaMDA, Block-LoRA, ... each as the LoRA factors its ΔW is made of, with
  ``lora_alpha = s·r`` so that PEFT's ``alpha / r`` is the method's scaling exactly. VeRA and
  RandLoRA can be written as LoRA too (``peft_type="LORA"``).

The config gets ``task_type`` (``CAUSAL_LM``, ``SEQ_CLS``, ``TOKEN_CLS``, ``QUESTION_ANS``,
``SEQ_2_SEQ_LM``, ``FEATURE_EXTRACTION``; see :func:`infer_task_type`) and
``base_model_name_or_path`` (see :func:`base_model_path`), so PEFT's auto classes load the base
and the adapter from the folder alone. A task head trained with the adapter (a classifier) is
written as PEFT's ``modules_to_save``: its tensors under ``base_model.model.<module>.<param>``,
the keys PEFT itself writes, and its module names in ``modules_to_save``.

Import reads the same formats into the matching paretune method, copies ``modules_to_save``
tensors into the model's own modules, and takes a Hugging Face Hub id when the path is not a
local folder. Every malformed file is an :class:`AdapterFileError` naming the problem.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .core import registry
from .core.atomic import atomic_dir
from .core.delta import Delta
from .core.host import Host
from .core.jsonfile import read_json
from .core.state import record_of, state_of
from .errors import AdapterFileError
from .hub import resolve_adapter
from .peft_formats import lokr, lora, randlora, vera
from .peft_formats.common import PEFT_CONFIG, PEFT_WEIGHTS, PREFIX

__all__ = ["export_peft", "import_peft", "exportable_methods", "infer_task_type", "base_model_path",
           "import_peft_with_heads", "PEFT_CONFIG", "PEFT_WEIGHTS", "PREFIX", "TASK_TYPES", "PEFT_TYPES"]

TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION")
# the native PEFT format of a paretune method; any other method with a LoRA form is written as LORA
NATIVE = {"vera": "VERA", "randlora": "RANDLORA", "kronecker": "LOKR"}
PEFT_TYPES = ("LORA", "VERA", "RANDLORA", "LOKR")
_READERS = {"LORA": lora.load, "VERA": vera.load, "RANDLORA": randlora.load, "LOKR": lokr.load}

# class-name endings -> PEFT task type, checked in this order
_TASK_SUFFIXES = (
    (("ForSequenceClassification",), "SEQ_CLS"),
    (("ForTokenClassification",), "TOKEN_CLS"),
    (("ForQuestionAnswering",), "QUESTION_ANS"),
    (("ForConditionalGeneration", "ForSeq2SeqLM"), "SEQ_2_SEQ_LM"),
    (("ForCausalLM", "LMHeadModel"), "CAUSAL_LM"),
)


def exportable_methods() -> list[str]:
    """Registered methods that export to a PEFT format (a native one, or LoRA through an exact LoRA form)."""
    return [n for n, spec in registry.all_methods().items()
            if n in NATIVE or spec.delta_cls.as_lora is not Delta.as_lora]


def infer_task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for ``model``: from its class name (``...ForCausalLM`` / ``...LMHeadModel``
    -> ``CAUSAL_LM``, ``...ForSequenceClassification`` -> ``SEQ_CLS``, ``...ForTokenClassification``
    -> ``TOKEN_CLS``, ``...ForQuestionAnswering`` -> ``QUESTION_ANS``, ``...ForConditionalGeneration``
    of an encoder-decoder config -> ``SEQ_2_SEQ_LM``), else from ``config.architectures`` the same
    way; a transformers model with neither (a bare encoder such as ``BertModel``) ->
    ``FEATURE_EXTRACTION``; anything else (not a transformers model) -> None."""
    config = getattr(model, "config", None)
    names = [type(model).__name__] + list(getattr(config, "architectures", None) or [])
    for name in names:
        for suffixes, task in _TASK_SUFFIXES:
            if name.endswith(suffixes):
                if task == "SEQ_2_SEQ_LM" and not getattr(config, "is_encoder_decoder", False):
                    continue  # e.g. a vision-language ...ForConditionalGeneration decoder
                return task
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return "FEATURE_EXTRACTION" if isinstance(model, PreTrainedModel) else None


def base_model_path(model: nn.Module) -> str | None:
    """Where PEFT should load the base from: a bundled model's real location (its folder for a
    Hugging Face folder; its origin Hub id for a GGUF file, which transformers cannot open from a
    path alone), an existing local path made absolute, else ``config._name_or_path`` as it is
    (a Hub id), or None when the model has no name."""
    from .models import BUNDLED

    name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if name is None:
        return None
    if name in BUNDLED:
        b = BUNDLED[name]
        loc = b.location()
        return str(loc) if b.kind == "hf-folder" and loc is not None else b.origin
    local = Path(os.path.expanduser(name))
    return str(local.resolve()) if local.exists() else name


def _adapted_modules(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, Host)}


def _heads_to_save(model: nn.Module, heads: str | list[str] | None) -> list[str]:
    """``"auto"``: every module ``paretune.training.trainer.head_modules`` returns whose parameters
    all train and that is not adapted; a list: those modules; None: none."""
    if heads is None:
        return []
    if heads == "auto":
        from .training.trainer import head_modules

        adapted = _adapted_modules(model)
        out = []
        for h in head_modules(model):
            params = list(model.get_submodule(h).parameters())
            if h not in adapted and params and all(p.requires_grad for p in params):
                out.append(h)
        return out
    if isinstance(heads, str) or not all(isinstance(h, str) for h in heads):
        raise AdapterFileError(f"heads={heads!r}: give 'auto', a list of module names, or None.")
    for h in heads:
        try:
            model.get_submodule(h)
        except AttributeError:
            raise AdapterFileError(f"heads: the model has no module {h!r}.") from None
    return list(heads)


def export_peft(
    model: nn.Module, path: str | os.PathLike, name: str = "default", *, base_model_name_or_path: str | None = None,
    task_type: str | None = "auto", heads: str | list[str] | None = "auto", peft_type: str | None = None,
) -> Path:
    """Write adapter ``name`` as a PEFT adapter folder at ``path`` (atomically); returns the path.

    ``peft_type``: None writes the method's native PEFT format (``VERA`` for vera, ``RANDLORA`` for
    randlora, ``LOKR`` for kronecker, ``LORA`` for the rest); ``"LORA"`` writes any method with a
    LoRA form as LoRA. ``task_type``: ``"auto"`` (:func:`infer_task_type`), one of
    ``TASK_TYPES``, or None. ``base_model_name_or_path``: default :func:`base_model_path`.
    ``heads``: task heads written as ``modules_to_save`` (``"auto"``: the trained, unadapted heads
    that ``paretune.training.trainer.head_modules`` finds; a list of module names; None)."""
    rec = record_of(model, name)
    if state_of(model).is_merged(name):
        raise AdapterFileError(f"adapter {name!r} is merged; unmerge it before exporting.")
    if task_type == "auto":
        task_type = infer_task_type(model)
    elif task_type is not None and task_type not in TASK_TYPES:
        raise AdapterFileError(f"task_type={task_type!r} is not a PEFT task type; use 'auto', None or one of "
                               f"{', '.join(TASK_TYPES)}.")
    fmt = NATIVE.get(rec.method, "LORA") if peft_type is None else str(peft_type).upper()
    if fmt not in PEFT_TYPES:
        raise AdapterFileError(f"peft_type={peft_type!r}: paretune writes {', '.join(PEFT_TYPES)}.")
    if fmt != "LORA" and NATIVE.get(rec.method) != fmt:
        raise AdapterFileError(f"a {rec.method} adapter cannot be written as PEFT {fmt}; "
                               f"{fmt} holds {[m for m, t in NATIVE.items() if t == fmt][0]} adapters only. "
                               "Use peft_type='LORA' or None.")
    if fmt == "LORA":
        config, tensors = lora.export(model, rec, name, exportable_methods())
    else:
        config, tensors = {"VERA": vera.export, "RANDLORA": randlora.export, "LOKR": lokr.export}[fmt](model, rec, name)
    head_names = _heads_to_save(model, heads)
    for h in head_names:
        for pname, p in model.get_submodule(h).named_parameters():
            tensors[f"{PREFIX}{h}.{pname}"] = p.detach()
    config.update({
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path or base_model_path(model),
        "modules_to_save": head_names or None, "inference_mode": True, "revision": None,
    })
    config = dict(sorted(config.items()))
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS),
                  metadata={"format": "pt", "exported_by": f"paretune {__version__} ({rec.method})"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return Path(path)


# -- import ------------------------------------------------------------------------------------

def resolve(path: str | os.PathLike) -> Path:
    """A local PEFT adapter folder as it is; otherwise a Hugging Face Hub id, downloaded (config and
    weights only) as :func:`paretune.hub.resolve_adapter` does."""
    return resolve_adapter(path, [PEFT_CONFIG, PEFT_WEIGHTS], f"PEFT adapter folder (with {PEFT_CONFIG})")


def read_peft(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checked config and the tensors of the PEFT folder ``path``."""
    cfg_file = path / PEFT_CONFIG
    if not cfg_file.is_file():
        raise AdapterFileError(f"{path} has no {PEFT_CONFIG}; it is not a PEFT adapter folder.")
    cfg = read_json(cfg_file, what="PEFT adapter config", error=AdapterFileError)
    if not isinstance(cfg, dict):
        raise AdapterFileError(f"{cfg_file} holds a JSON {type(cfg).__name__}, not an object; it is not a PEFT "
                               "adapter config.")
    if "peft_type" not in cfg:
        raise AdapterFileError(f"{cfg_file} has no 'peft_type'; it is not a PEFT adapter config.")
    kind = cfg["peft_type"]
    if kind not in _READERS:
        raise AdapterFileError(f"{path} holds a PEFT {kind!r} adapter; import_peft reads {', '.join(PEFT_TYPES)}.")
    if cfg.get("bias", "none") not in (None, "none"):
        raise AdapterFileError(f"{path} trains biases (bias={cfg['bias']!r}); import_peft supports bias='none' only.")
    mts = cfg.get("modules_to_save")
    if mts is not None and (not isinstance(mts, list) or not all(isinstance(m, str) for m in mts)):
        raise AdapterFileError(f"{cfg_file}: modules_to_save={mts!r} must be a list of module names or null.")
    weights = path / PEFT_WEIGHTS
    if not weights.is_file():
        hint = " Convert adapter_model.bin to safetensors first." if (path / "adapter_model.bin").exists() else ""
        raise AdapterFileError(f"{path} has no {PEFT_WEIGHTS}.{hint}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{weights} is corrupt or truncated ({e}).") from None
    return cfg, tensors


def _split_heads(model: nn.Module, cfg: dict[str, Any], tensors: dict[str, torch.Tensor],
                 path: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Take the ``modules_to_save`` tensors out of ``tensors``: {module: {param: tensor}}, checked
    against the model's modules (names and shapes) before anything changes."""
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for pattern in cfg.get("modules_to_save") or []:
        matches = [k for k in tensors if k.startswith(PREFIX) and
                   (k[len(PREFIX):].startswith(pattern + ".") or f".{pattern}." in k[len(PREFIX):])]
        for key in matches:
            rest = key[len(PREFIX):]
            module, _, param = rest.rpartition(".")
            heads.setdefault(module, {})[param] = tensors.pop(key)
    for module, params in heads.items():
        try:
            own = dict(model.get_submodule(module).named_parameters())
        except AttributeError:
            raise AdapterFileError(f"{path} saves module {module!r} (modules_to_save), which this model does not "
                                   "have; load it onto its base model.") from None
        for param, t in params.items():
            if param not in own:
                raise AdapterFileError(f"{path}: {module}.{param} (modules_to_save) is no parameter of the model.")
            if tuple(own[param].shape) != tuple(t.shape):
                raise AdapterFileError(
                    f"{path}: {module}.{param} has shape {tuple(t.shape)} in the file but {tuple(own[param].shape)} in "
                    f"the model; load a model with a matching head (e.g. num_labels={t.shape[0]}).")
    return heads


def import_peft(model: nn.Module, path: str | os.PathLike, name: str = "default") -> nn.Module:
    """Read a PEFT folder (or Hub id) into ``model`` as paretune adapter ``name`` (in place): LORA
    as ``lora``, VERA as ``vera``, RANDLORA as ``randlora`` (convention ``peft``), LOKR as
    ``kronecker``; ``modules_to_save`` tensors (a trained head) are copied into the model's own
    modules. Nothing changes on the model when the file is malformed."""
    import_peft_with_heads(model, path, name)
    return model


def import_peft_with_heads(model: nn.Module, path: str | os.PathLike, name: str = "default") -> list[str]:
    """:func:`import_peft`, returning the names of the modules filled from ``modules_to_save``."""
    folder = resolve(path)
    cfg, tensors = read_peft(folder)
    heads = _split_heads(model, cfg, tensors, folder)
    _READERS[cfg["peft_type"]](model, cfg, tensors, name, folder)
    with torch.no_grad():
        for module, params in heads.items():
            own = dict(model.get_submodule(module).named_parameters())
            for param, t in params.items():
                own[param].copy_(t.to(own[param].dtype))
    return sorted(heads)
