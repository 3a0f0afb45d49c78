"""PEFT VeRA: per module ``vera_lambda_b`` (d_out) and ``vera_lambda_d`` (r); the shared random
projections ``base_model.vera_A`` (r, max d_in) and ``base_model.vera_B`` (max d_out, r), each
layer using their top-left slice; ΔW = diag(λ_b)·B·diag(λ_d)·A, no other scaling.

paretune's ``vera`` is the same formula with the same draw (``seed`` = PEFT's
``projection_prng_key``, one generator drawing A then B), so the conversion is a renaming.
Export writes the projections too (``save_projection=True``), so PEFT uses exactly these bases.
Import takes the projections from the file when it has them; paretune regenerates its bases
from the seed when an adapter folder is loaded, so a file whose projections are not the seed's
draw is refused (with the reason) rather than imported into something that would change on the
next save and load.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..api import adapt, remove
from ..core.state import AdapterRecord
from ..errors import AdapterFileError
from .common import PREFIX, Fields, check_modules, one_setting, split_keys

SUFFIXES = {".vera_lambda_b": "lambda_b", ".vera_lambda_d": "lambda_d"}
SHARED = {"base_model.vera_A": "A", "base_model.vera_B": "B"}


def export(model: nn.Module, rec: AdapterRecord, name: str) -> tuple[dict, dict]:
    tensors: dict[str, torch.Tensor] = {}
    kinds = set()
    bank = None
    for module_name in rec.targets:
        host = model.get_submodule(module_name)
        delta = host.deltas[name]
        kinds.add(host.kind)
        bank = delta.bank
        tensors[PREFIX + module_name + ".vera_lambda_b"] = delta.lambda_b.detach()
        tensors[PREFIX + module_name + ".vera_lambda_d"] = delta.lambda_d.detach()
    tensors["base_model.vera_A"], tensors["base_model.vera_B"] = bank.A, bank.B
    c = rec.config
    config = {
        "peft_type": "VERA", "r": c.r, "target_modules": list(rec.targets), "projection_prng_key": c.seed,
        "save_projection": True, "vera_dropout": float(c.dropout), "d_initial": float(c.d_initial),
        "fan_in_fan_out": "conv1d" in kinds, "bias": "none", "init_weights": True,
    }
    return config, tensors


def load(model: nn.Module, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], name: str, path: Any) -> None:
    f = Fields(cfg, path)
    r = f.int("r", required=True)
    seed = f.int("projection_prng_key", 0, minimum=0)
    dropout = f.probability("vera_dropout")
    d_initial = f.number("d_initial", 0.1)
    if cfg.get("bias", "none") not in (None, "none"):
        raise AdapterFileError(f"{path} trains biases (bias={cfg['bias']!r}); import_peft supports bias='none' only.")
    shared = {SHARED[k]: tensors.pop(k) for k in list(tensors) if k in SHARED}
    per_module = split_keys(tensors, SUFFIXES, path, "VeRA")
    ranks = set()
    for module, state in per_module.items():
        if set(state) != {"lambda_b", "lambda_d"}:
            raise AdapterFileError(f"{path}: module {module} lacks vera_lambda_b or vera_lambda_d; the file is corrupt.")
        ranks.add(int(state["lambda_d"].shape[0]))
    file_r = one_setting(ranks, path, "ranks")
    if file_r != r:
        raise AdapterFileError(f"{path}: r={r} in adapter_config.json but the lambda_d vectors have length {file_r}; "
                               "the file is corrupt.")
    check_modules(model, list(per_module), cfg, path)
    exact = "|".join(re.escape(m) for m in per_module)
    adapt(model, "vera", name=name, targets=exact, r=r, seed=seed, dropout=dropout, d_initial=d_initial)
    try:
        bank = model.get_submodule(next(iter(per_module))).deltas[name].bank
        for key, t in shared.items():
            own = getattr(bank, key)
            if tuple(t.shape) != tuple(own.shape) or not torch.allclose(t.to(own.dtype), own, rtol=1e-6, atol=1e-7):
                raise AdapterFileError(
                    f"{path}: the saved projection vera_{key} {tuple(t.shape)} is not the one projection_prng_key={seed} "
                    f"draws for these modules {tuple(own.shape)}; paretune regenerates VeRA's projections from the "
                    "seed, so it cannot keep other ones. Import an adapter made with PEFT's own initialisation.")
        for module, state in per_module.items():
            model.get_submodule(module).deltas[name].load_stored(state, where=module)
    except Exception:
        remove(model, name)
        raise
