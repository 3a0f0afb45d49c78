"""transformers integration: ``model.save_pretrained`` / ``Trainer.save_model`` on an adapted model,
and :func:`from_pretrained` to load such a folder back with its adapters.

Design (the choices, stated):

* **Hook.** When a transformers ``PreTrainedModel`` gets its first paretune adapter
  (``paretune.adapt`` / ``paretune.load`` on it), an instance attribute ``save_pretrained`` is
  set on that model (the object ``adapt`` was given); the class method is untouched. It goes
  away when the model's last adapter does (``paretune.unload``, or ``paretune.remove`` of the
  last one), so save_pretrained is then plain transformers again. ``copy.deepcopy`` of the model
  rebinds it to the copy (Python deep-copies a bound method onto the copied instance). Adapting a
  sub-model (``model.model``) installs it on that sub-model only: call ``paretune.adapt`` on the
  model you will save.
* **What is written.** The base model under its original parameter names (the folder that
  ``transformers``' ``from_pretrained`` loads with no missing or unexpected keys): every host's
  ``<module>.base.<p>`` is written as ``<module>.<p>`` and the adapters' tensors are left out. A
  base weight that an unmerged adapter changed when it was built (PiSSA's residual) is written as
  the original weight (the residual with that adapter's starting part added back: equal to the
  original up to float rounding). Merged adapters are part of the weights and are written merged,
  with no adapter folder. A task head trained beside the adapter is a plain module, so it is in
  the base weights (and its label names in ``config.json``).
* **Adapters.** Every unmerged adapter is written as a paretune adapter folder
  ``<dir>/paretune-adapters/<name>/`` (:func:`paretune.save`, no head), with
  ``<dir>/paretune-adapters/adapters.json`` listing them in order and the active set with its
  weights. The ``paretune-adapters`` folder is replaced as a whole (atomically); when no adapter
  is unmerged an old one is removed, so a folder never holds stale adapters.
* **Loading.** :func:`from_pretrained` = the transformers class's ``from_pretrained`` plus
  :func:`load_adapters` (each adapter back, then the saved active set), so outputs equal those of
  the adapted model that was saved.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .core import state as core_state
from .core.atomic import atomic_dir
from .core.host import Host
from .core.jsonfile import read_json
from .errors import AdapterFileError, ParetuneError

ADAPTERS_DIR = "paretune-adapters"
INDEX_FILE = "adapters.json"


def _is_pretrained(model: nn.Module) -> bool:
    tf = sys.modules.get("transformers")  # a model cannot be a PreTrainedModel unless it is imported
    return tf is not None and isinstance(model, tf.PreTrainedModel)


def _install(model: nn.Module) -> None:
    if _is_pretrained(model):
        model.__dict__["save_pretrained"] = types.MethodType(_save_pretrained, model)


def _uninstall(model: nn.Module) -> None:
    hook = model.__dict__.get("save_pretrained")
    if getattr(hook, "__func__", None) is _save_pretrained:
        del model.__dict__["save_pretrained"]


if _install not in core_state.on_attach:
    core_state.on_attach.append(_install)
    core_state.on_detach.append(_uninstall)


def _host_paths(model: nn.Module) -> list[str]:
    """Real (``named_modules``) paths of every host, innermost first."""
    paths = [name for name, m in model.named_modules() if isinstance(m, Host)]
    return sorted(paths, key=lambda p: -p.count("."))


def plain_state_dict(model: nn.Module, state_dict: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model's state dict under the base model's own names: ``<host>.base.<rest>`` becomes
    ``<host>.<rest>`` (hosts nested in a block host too), every other key under a host (the
    adapters' tensors) is dropped. ``state_dict``: one already taken (e.g. by a Trainer)."""
    sd = model.state_dict() if state_dict is None else state_dict
    paths = _host_paths(model)
    if not paths:
        return dict(sd)
    out: dict[str, Any] = {}
    for key, value in sd.items():
        for host in paths:  # innermost first, so an outer block host sees its inner hosts renamed
            if not key.startswith(host + "."):
                continue
            rest = key[len(host) + 1:]
            if not rest.startswith("base."):
                key = None
                break
            key = f"{host}.{rest[len('base.'):]}"
        if key is not None:
            out[key] = value
    return out


@contextmanager
def _original_base(model: nn.Module) -> Iterator[None]:
    """While inside: every base weight that an unmerged adapter changed when built (PiSSA) holds
    the original again (the adapter's starting part added back), and the engine's snapshot hash of
    those modules is that of the restored weights (what gets written). Afterwards the weights are
    put back bit for bit."""
    st = core_state.state_of(model)
    saved: list[tuple[list[tuple[torch.Tensor, torch.Tensor]], None]] = []
    snapshots = dict(st.base_sha256)
    from .core.inject import base_tensors, weights_sha256

    try:
        with torch.no_grad():
            for name, m in model.named_modules():
                if not isinstance(m, Host):
                    continue
                shifting = [d for n, d in m.deltas.items() if d.shifts_base and n not in m.merged]
                if not shifting:
                    continue
                kept = [(t, t.detach().clone()) for _, t in base_tensors(m)]
                saved.append((kept, None))
                for d in reversed(shifting):
                    d.restore_base()
                for engine_name, host in _engine_names(model, m):
                    st.base_sha256[engine_name] = weights_sha256(host)
        yield
    finally:
        with torch.no_grad():
            for kept, _ in saved:
                for t, before in kept:
                    t.copy_(before)
        st.base_sha256.clear()
        st.base_sha256.update(snapshots)


def _engine_names(model: nn.Module, host: Host) -> list[tuple[str, Host]]:
    from .core.inject import hosts

    return [(n, h) for n, h in hosts(model) if h is host]


def _save_pretrained(self: nn.Module, save_directory: str | os.PathLike, *args: Any,
                     state_dict: dict | None = None, **kwargs: Any) -> None:
    """``save_pretrained`` of an adapted model: the base under its own parameter names, plus every
    unmerged adapter as a paretune adapter folder under ``paretune-adapters/`` (see the module
    docstring)."""
    from . import io

    st = core_state.state_of(self)
    original = type(self).save_pretrained
    main = kwargs.get("is_main_process", True)
    with _original_base(self):
        plain = plain_state_dict(self, state_dict)
        original(self, save_directory, *args, state_dict=plain, **kwargs)
        if not main:
            return
        unmerged = [n for n in st.adapters if n not in st.merged]
        target = Path(save_directory) / ADAPTERS_DIR
        if not unmerged:
            if target.is_dir():
                shutil.rmtree(target)
            return
        index = {"adapters": unmerged, "active": [n for n in st.active if n in unmerged],
                 "weights": {n: w for n, w in st.weights.items() if n in unmerged}}
        with atomic_dir(target) as tmp:
            for n in unmerged:
                io.save(self, tmp / n, name=n, heads=None)
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def load_adapters(model: nn.Module, path: str | os.PathLike, *, check_base: bool = True) -> nn.Module:
    """Load every adapter that an adapted model's ``save_pretrained`` wrote into ``path``
    (``path/paretune-adapters/``) onto ``model``, then its active set and weights; a folder with
    none changes nothing. Returns the model."""
    from . import api, io

    root = Path(path) / ADAPTERS_DIR
    if not root.is_dir():
        return model
    index = read_json(root / INDEX_FILE, what="adapter list", error=AdapterFileError,
                      hint="Save the model again with save_pretrained.")
    names = index.get("adapters") if isinstance(index, dict) else None
    active = index.get("active", names) if isinstance(index, dict) else None
    weights = index.get("weights") or {} if isinstance(index, dict) else None
    if (not isinstance(names, list) or not all(isinstance(n, str) and n for n in names)
            or not isinstance(active, list) or not set(active) <= set(names)
            or not isinstance(weights, dict) or not all(isinstance(w, (int, float)) for w in weights.values())):
        raise AdapterFileError(f"{root / INDEX_FILE} is not a list of adapters (adapters / active / weights); the "
                               "file is corrupt. Save the model again with save_pretrained.")
    for n in names:
        io.load(model, root / n, name=n, check_base=check_base)
    api.set_active(model, active, [weights.get(n, 1.0) for n in active] if weights else None)
    return model


def from_pretrained(path: str | os.PathLike, *, model_class: Any = None, check_base: bool = True,
                    **kwargs: Any) -> nn.Module:
    """Load a folder that an adapted model's ``save_pretrained`` (or a transformers ``Trainer``'s
    ``save_model``) wrote: the base through transformers' ``from_pretrained`` (``kwargs`` passed
    on, e.g. ``dtype``), then every adapter with its active set (:func:`load_adapters`).

    ``model_class``: the transformers class to load with; by default the one named first in the
    folder's ``config.json`` ``architectures`` (looked up in the transformers package only; no
    remote code is run)."""
    import transformers

    if model_class is None:
        config = transformers.AutoConfig.from_pretrained(path)
        archs = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, archs[0], None) if archs else None
        if model_class is None:
            raise ParetuneError(f"{path}: config.json names no transformers model class ({archs or 'none'}); pass "
                                "model_class=... (e.g. transformers.AutoModelForCausalLM).")
    model = model_class.from_pretrained(path, **kwargs)
    return load_adapters(model, path, check_base=check_base)


__all__ = ["from_pretrained", "load_adapters", "plain_state_dict", "ADAPTERS_DIR"]
