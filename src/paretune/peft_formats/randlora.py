"""PEFT RandLoRA (``peft.tuners.randlora``, PEFT 0.21.2): per module ``randlora_lambda`` (r, n) and
``randlora_gamma`` (n, m); the shared bases ``base_model.randlora_A`` (r, 1, bank m) and
``base_model.randlora_B`` (bank M, bank n, r); n = ⌈m / r⌉ per layer, scaling randlora_alpha / r.

paretune's ``randlora`` with ``convention="peft"`` is this formula with PEFT's draw (its module
docstring), Λ being PEFT's λ transposed. The conversions:

* export, ``convention="peft"``: a renaming, ``randlora_alpha = alpha``;
* export, ``convention="paper"``: the layer's scaling alpha / (r·√n) is folded into λ (λ·(1/√n),
  exact since ΔW is linear in λ) and ``randlora_alpha = alpha``. Its n = ⌊m / r⌋ + 1 equals PEFT's
  ⌈m / r⌉ unless r divides m; a layer where r divides m has one basis more than PEFT can hold,
  and is refused with that reason.
* Export writes the bases (``save_projection=True``), sized as PEFT sizes them (its bank n =
  ⌈bank m / r⌉, the first bases of paretune's bank), so PEFT computes with exactly these bases.
  Each module's copy of the bases, which PEFT's own ``save_pretrained`` writes beside the shared
  ones (its layers hold the shared buffers), is written too: without it PEFT loads the same
  numbers but warns of missing keys. The file is then as large as the one PEFT writes.
* Import: a ``convention="peft"`` adapter. paretune regenerates its bases from the seed whenever an
  adapter folder is loaded, so a file whose bases are not the seed's draw is refused (with the
  reason) rather than imported into something that would change on the next save and load.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..api import adapt, remove
from ..core.state import AdapterRecord
from ..errors import AdapterFileError
from .common import PREFIX, Fields, check_modules, one_setting

SHARED = {"base_model.randlora_A": "A", "base_model.randlora_B": "B"}


def _peft_n(m: int, r: int) -> int:
    return -(-m // r)


def export(model: nn.Module, rec: AdapterRecord, name: str) -> tuple[dict, dict]:
    c = rec.config
    tensors: dict[str, torch.Tensor] = {}
    peft_scaling = c.alpha / c.r
    bank = None
    for module_name in rec.targets:
        delta = model.get_submodule(module_name).deltas[name]
        bank = delta.bank
        if delta.n != _peft_n(delta.min_dim, c.r):
            raise AdapterFileError(
                f"randlora adapter {name!r}: module {module_name} has min(d_in, d_out) = {delta.min_dim}, which r={c.r} "
                f"divides, so convention='paper' gives it {delta.n} bases and PEFT's RandLoRA only "
                f"{_peft_n(delta.min_dim, c.r)}; PEFT cannot hold this adapter. Train with convention='peft' (or an r "
                "that divides no adapted layer's smaller side) to export it.")
        ratio = delta.scaling / peft_scaling if peft_scaling != 0 else 1.0
        key = PREFIX + module_name
        tensors[key + ".randlora_lambda"] = (delta.Lambda.detach() * ratio).T.contiguous()
        tensors[key + ".randlora_gamma"] = delta.Gamma.detach()
    max_dim, n_bank = bank.B.shape[0], _peft_n(bank.A.shape[1], c.r)
    shared_a = bank.A[:, None, :]
    shared_b = bank.B[:, : n_bank * c.r].reshape(max_dim, n_bank, c.r)
    tensors["base_model.randlora_A"], tensors["base_model.randlora_B"] = shared_a, shared_b
    for module_name in rec.targets:
        tensors[f"{PREFIX}{module_name}.randlora_A"] = shared_a
        tensors[f"{PREFIX}{module_name}.randlora_B"] = shared_b
    config = {
        "peft_type": "RANDLORA", "r": c.r, "randlora_alpha": c.alpha, "target_modules": list(rec.targets),
        "projection_prng_key": c.seed, "save_projection": True, "sparse": bool(c.sparse),
        "very_sparse": bool(c.very_sparse), "randlora_dropout": float(c.dropout), "bias": "none",
        "fan_in_fan_out": any(model.get_submodule(m).kind == "conv1d" for m in rec.targets), "init_weights": True,
    }
    return config, tensors


def load(model: nn.Module, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], name: str, path: Any) -> None:
    f = Fields(cfg, path)
    r = f.int("r", required=True)
    alpha = f.number("randlora_alpha", 640.0)
    seed = f.int("projection_prng_key", 0, minimum=0)
    dropout = f.probability("randlora_dropout")
    sparse, very_sparse = f.flag("sparse"), f.flag("very_sparse")
    if cfg.get("bias", "none") not in (None, "none"):
        raise AdapterFileError(f"{path} trains biases (bias={cfg['bias']!r}); import_peft supports bias='none' only.")
    shared: dict[str, torch.Tensor] = {}
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key in SHARED:
            shared[SHARED[key]] = t
            continue
        tail = key.rsplit(".", 1)[-1]
        if not key.startswith(PREFIX) or tail not in ("randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B"):
            raise AdapterFileError(f"{path}: unexpected tensor {key!r} in a PEFT RandLoRA file.")
        module = key[len(PREFIX):-len(tail) - 1]
        if tail in ("randlora_A", "randlora_B"):  # PEFT's per-module copy of the shared bases
            shared.setdefault(tail[-1], t)
            continue
        per_module.setdefault(module, {})[tail] = t
    if not per_module:
        raise AdapterFileError(f"{path}: the PEFT file holds no RandLoRA tensors.")
    ranks = set()
    for module, state in per_module.items():
        if set(state) != {"randlora_lambda", "randlora_gamma"}:
            raise AdapterFileError(f"{path}: module {module} lacks randlora_lambda or randlora_gamma; the file is corrupt.")
        ranks.add(int(state["randlora_lambda"].shape[0]))
    if one_setting(ranks, path, "ranks") != r:
        raise AdapterFileError(f"{path}: r={r} in adapter_config.json but randlora_lambda has {ranks.pop()} rows; "
                               "the file is corrupt.")
    check_modules(model, list(per_module), cfg, path)
    exact = "|".join(re.escape(m) for m in per_module)
    adapt(model, "randlora", name=name, targets=exact, r=r, alpha=alpha, seed=seed, dropout=dropout,
          sparse=sparse, very_sparse=very_sparse, convention="peft")
    try:
        bank = model.get_submodule(next(iter(per_module))).deltas[name].bank
        for key, t in shared.items():
            own = getattr(bank, key)
            t = t.reshape(t.shape[0], -1)  # (r, 1, m) -> (r, m); (M, n, r) -> (M, n·r)
            if tuple(t.shape) != tuple(own.shape) or not torch.allclose(t.to(own.dtype), own, rtol=1e-5, atol=1e-6):
                raise AdapterFileError(
                    f"{path}: the saved basis randlora_{key} is not the one projection_prng_key={seed} draws for these "
                    "modules; paretune regenerates RandLoRA's bases from the seed, so it cannot keep other ones. "
                    "Import an adapter made with PEFT's own initialisation.")
        for module, state in per_module.items():
            model.get_submodule(module).deltas[name].load_stored(
                {"Lambda": state["randlora_lambda"].T, "Gamma": state["randlora_gamma"]}, where=module)
    except Exception:
        remove(model, name)
        raise
