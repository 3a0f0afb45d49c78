"""BitFit (Ben Zaken, Ravfogel & Goldberg 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models"): only the bias terms train.

Which biases: the paper trains, in every BERT layer, the biases of the query, key and value
projections, of the attention output and both MLP Linears, *and* the shifts β of the two
LayerNorms (its b_LN1, b_LN2; the authors' code, benzakenelad/BitFit ``glue_evaluator.py``,
``BIAS_TERMS_DICT``, trains every parameter named ``bias``, LayerNorm and pooler biases included).
So the default targets (``targets=None``) are every Linear / GPT-2 Conv1D / Conv2d that has a bias,
except the output head (which a task trains whole), and every LayerNorm that has a β; Δβ of a
LayerNorm is kind "norm".

As a delta: a zero-initialised Δb per adapted module, ``out = base_out + Δb`` (broadcast over the
output's channel dimension), so the base stays frozen and a saved adapter holds only the Δb's.
ΔW = 0; merging adds Δb to the base bias (no entry of W is written).

A targeted module without a bias (every Linear of Llama, whose normalisations are RMSNorms without
β either) is refused with a :class:`~paretune.errors.TargetError` naming the modules, unless
``add_missing=True``: then it gets a zero-initialised trained Δb as well, and merging gives the
base layer a bias (removed again on unmerge). With ``add_missing=True`` the default targets are
every Linear / Conv1D / Conv2d but the output head and every LayerNorm, with a bias or not (on Llama:
every Linear but ``lm_head``); without it a model with no bias at all (Llama) is refused, pointing to
``add_missing=True``.
An RMSNorm is always refused: its forward has no shift, so a merged bias would be lost.

Trainable per layer: d_out (the bias size).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.dtypes import adapter_dtype
from ..core.geometry import Geometry
from ..core.host import Host
from ..core.inject import iter_modules, kind_of, output_head_names
from ..core.registry import register
from ..errors import TargetError

_WEIGHT_KINDS = ("linear", "conv1d", "conv2d")


def _has_bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None


def default_targets(model: nn.Module, config: "BitFitConfig | None" = None) -> list[str]:
    """Every Linear / Conv1D / Conv2d with a bias (output head excluded) and every LayerNorm with a
    β; with ``add_missing=True``, every Linear / Conv1D / Conv2d but the head and every LayerNorm,
    with a bias or not (never an RMSNorm)."""
    add_missing = bool(config is not None and config.add_missing)
    heads = output_head_names(model)
    layers, norms = [], []
    for name, module in iter_modules(model):
        if not name or name in heads:
            continue
        kind = kind_of(module)
        base = module.base if isinstance(module, Host) else module
        if kind in _WEIGHT_KINDS and (add_missing or _has_bias(base)):
            layers.append(name)
        elif kind == "norm" and isinstance(base, nn.LayerNorm) and (add_missing or _has_bias(base)):
            norms.append(name)
    if not layers + norms:
        hint = ("pass targets=[...]" if add_missing else
                "pass add_missing=True to train a zero-initialised bias on every Linear layer (as on Llama), or "
                "targets=[...]")
        raise TargetError(f"bitfit: a {type(model).__name__} has no bias term to train; {hint}.")
    return layers + norms


@dataclasses.dataclass
class BitFitConfig(AdapterConfig):
    """``add_missing``: give a targeted module without a bias a zero-initialised trained one
    (default False: such a target is an error)."""

    add_missing: bool = False

    def validate(self) -> None:
        self._flag("add_missing")


@register(
    "bitfit",
    config=BitFitConfig,
    summary="BitFit (Ben Zaken et al. 2022): only the bias terms (Linear biases, LayerNorm β) train; mergeable",
    formula="d_out",
    kinds=("linear", "conv1d", "conv2d", "norm"),
    default_targets=default_targets,
)
class BitFitDelta(Delta):
    def __init__(self, geometry: Geometry, config: BitFitConfig, *, bank: nn.Module | None = None, layer: int = 0):
        super().__init__(geometry, config, bank=bank, layer=layer)
        self._check([geometry], config)
        w = geometry.weight
        self.bias = nn.Parameter(torch.zeros(self.d_out, dtype=adapter_dtype(w), device=w.device))

    @staticmethod
    def _check(geometries: list[Geometry], config: BitFitConfig) -> None:
        rms = [g.name or type(g.base).__name__ for g in geometries if g.kind == "norm" and g.rms]
        if rms:
            raise TargetError(
                f"bitfit: {', '.join(rms)} are RMSNorms, which have no shift β (their forward has no place for a "
                "bias, so it could not be merged); leave them out of targets."
            )
        missing = [g.name or type(g.base).__name__ for g in geometries if g.bias is None]
        if missing and not config.add_missing:
            raise TargetError(
                f"bitfit: these targets have no bias term: {', '.join(missing)}. BitFit trains existing biases; "
                "pass add_missing=True to give them a zero-initialised trained bias, or leave them out of targets."
            )

    @classmethod
    def make_bank(cls, geometries: list[Geometry], config: BitFitConfig) -> None:
        """Nothing is shared; refuses, naming all of them at once, targets without a bias (unless
        ``add_missing``) and RMSNorms, before any delta is built."""
        cls._check(geometries, config)
        return None

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        shape = [1] * base_out.dim()
        shape[self.geometry.channel_dim()] = -1
        return base_out + self.bias.view(shape).to(base_out.dtype)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """A Linear alone: one ``linear`` with the bias b + Δb (same precision as the base only)."""
        g = self.geometry
        if self.kind != "linear" or g.weight.dtype != self.bias.dtype:
            return None
        b = self.bias if g.bias is None else g.bias + self.bias
        return F.linear(x, g.weight, b)

    def delta_weight(self) -> torch.Tensor:
        return torch.zeros(self.d_out, self.d_in, dtype=self.bias.dtype, device=self.bias.device)

    def sparse_delta(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW has no entry: merging writes no weight, only the bias."""
        dev = self.bias.device
        return torch.zeros(0, dtype=torch.long, device=dev), torch.zeros(0, dtype=self.bias.dtype, device=dev)

    def delta_bias(self) -> torch.Tensor:
        return self.bias

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: BitFitConfig) -> int:
        return d_out
