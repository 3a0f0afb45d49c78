"""PEFT LoKr: per module ``lokr_w1`` (a1, a2) or its factors ``lokr_w1_a`` / ``lokr_w1_b``, and
``lokr_w2`` (b1, b2) or ``lokr_w2_a`` / ``lokr_w2_b``; ΔW = (alpha / r)·(w1 ⊗ w2), the split of each
dimension from ``decompose_factor`` and w2 (w1 with ``decompose_both``) low-rank only when
r < max(its shape) / 2.

paretune's ``kronecker`` follows LoKr's split and low-rank rule (A = w1, B = w2; A_up / A_down =
w1_a / w1_b, B_up / B_down = w2_a / w2_b), so a Linear layer converts exactly when its factor
shapes are the ones PEFT's rule gives:

* export: with ``r``, ``r`` and ``alpha = s·r`` are written (s the adapter's scaling). Without
  ``r`` (both factors full, s = alpha or 1) the exported r is the largest b1 / b2 over the
  layers, so PEFT keeps every factor full too, and ``alpha = s·r``. A layer whose shapes PEFT
  would choose differently (explicit ``a_shape`` / ``b_shape``, ``init="diffusekrona"``'s default
  shape) or a GPT-2 Conv1D layer is refused with the reason.
* import: a ``kronecker`` adapter with PEFT's ``r``, ``alpha``, ``decompose_both`` and
  ``decompose_factor``. ``rank_dropout`` and ``module_dropout`` act only while training and are
  not carried over; Tucker (``lokr_t2``) Conv2d factors are refused.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..api import adapt, remove
from ..core.state import AdapterRecord
from ..errors import AdapterFileError
from ..methods.kronecker import KroneckerConfig, kron_plan
from .common import PREFIX, Fields, check_modules, one_setting, pattern_value, split_keys

NAMES = {"A": "lokr_w1", "A_up": "lokr_w1_a", "A_down": "lokr_w1_b",
         "B": "lokr_w2", "B_up": "lokr_w2_a", "B_down": "lokr_w2_b"}
SUFFIXES = {f".{v}": k for k, v in NAMES.items()}


def export(model: nn.Module, rec: AdapterRecord, name: str) -> tuple[dict, dict]:
    c = rec.config
    hosts = {m: model.get_submodule(m) for m in rec.targets}
    conv1d = [m for m, h in hosts.items() if h.kind != "linear"]
    if conv1d:
        raise AdapterFileError(f"kronecker adapter {name!r} adapts non-Linear layers ({conv1d[:3]}); PEFT's LoKr "
                               "format is written here for nn.Linear layers only. Save it with paretune.save instead.")
    deltas = {m: h.deltas[name] for m, h in hosts.items()}
    r = c.r if c.r is not None else max(max(d.plan.b) for d in deltas.values())
    peft_cfg = KroneckerConfig(factor=c.factor, r=r, decompose_both=c.decompose_both)
    for m, d in deltas.items():
        want = kron_plan(d.d_out, d.d_in, peft_cfg)
        if want != d.plan:
            raise AdapterFileError(
                f"kronecker adapter {name!r}: module {m} has factors A {d.plan.a} (rank {d.plan.a_rank or 'full'}), "
                f"B {d.plan.b} (rank {d.plan.b_rank or 'full'}); PEFT's LoKr with decompose_factor={c.factor}, r={r} "
                f"builds A {want.a} (rank {want.a_rank or 'full'}), B {want.b} (rank {want.b_rank or 'full'}), so "
                "it cannot hold this adapter. Adapt with `factor` instead of explicit shapes to export it.")
    tensors = {f"{PREFIX}{m}.{NAMES[k]}": t for m, d in deltas.items() for k, t in d.stored_state().items()}
    config = {
        "peft_type": "LOKR", "r": r, "alpha": c.scaling * r, "target_modules": list(rec.targets),
        "decompose_both": bool(c.decompose_both), "decompose_factor": c.factor, "rank_dropout": 0.0,
        "module_dropout": 0.0, "use_effective_conv2d": False, "init_weights": True, "rank_pattern": {},
        "alpha_pattern": {},
    }
    return config, tensors


def load(model: nn.Module, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], name: str, path: Any) -> None:
    f = Fields(cfg, path)
    default_r, default_alpha = f.int("r", 8), f.number("alpha", 8.0)
    decompose_both = f.flag("decompose_both")
    factor = cfg.get("decompose_factor", -1)
    if isinstance(factor, bool) or not isinstance(factor, int) or not (factor == -1 or factor >= 1):
        raise f._bad("decompose_factor", "-1 or an integer >= 1")
    ranks, alphas = f.pattern("rank_pattern", "int"), f.pattern("alpha_pattern", "number")
    f.probability("rank_dropout"), f.probability("module_dropout")
    if any(k.endswith((".lokr_t1", ".lokr_t2")) for k in tensors):
        raise AdapterFileError(f"{path} holds Tucker-decomposed Conv2d LoKr factors (lokr_t2); import_peft reads "
                               "LoKr on Linear layers only.")
    per_module = split_keys(tensors, SUFFIXES, path, "LoKr")
    settings = {(pattern_value(ranks, m, default_r), float(pattern_value(alphas, m, default_alpha))) for m in per_module}
    r, alpha = one_setting(settings, path, "ranks or alphas")
    check_modules(model, list(per_module), cfg, path)
    not_linear = [m for m in per_module if type(model.get_submodule(m)).__name__ not in ("Linear",)]
    if not_linear:
        raise AdapterFileError(f"{path} adapts non-Linear layers ({not_linear[:3]}); import_peft reads LoKr on "
                               "nn.Linear layers only.")
    exact = "|".join(re.escape(m) for m in per_module)
    adapt(model, "kronecker", name=name, targets=exact, r=r, alpha=alpha, factor=factor, decompose_both=decompose_both)
    try:
        for module, state in per_module.items():
            model.get_submodule(module).deltas[name].load_stored(state, where=module)
    except Exception:
        remove(model, name)
        raise
