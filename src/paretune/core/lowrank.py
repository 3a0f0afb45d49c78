"""LowRankDelta: the base of every delta of the form ΔW = s · B A.

A subclass builds its tensors in ``__init__``, sets ``self.scaling`` (and ``self.drop``, an
``nn.Dropout`` on the adapter's input, or None) and implements :meth:`LowRankDelta.factors`. It
inherits the forward pass (with the engine's fast paths), the dense ``delta_weight`` for merging,
``as_lora`` (PEFT export and the gathered per-sample path) and the fused training node.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import AdapterConfig
from .delta import Delta
from .dtypes import adapter_dtype
from .geometry import Geometry
from .fast import MATMUL_KINDS, FusedLoraLinear, add_low_rank, autocast_on, intercepted


class LowRankDelta(Delta):
    """ΔW = scaling · B A, A (r, d_in), B (d_out, r), from :meth:`factors`.

    The forward pass adds ``scaling · B A x`` to the base output: on Linear / Conv1D hosts with
    one dtype throughout it is one matmul and one ``addmm`` (in place at inference), elsewhere it
    goes through the host's geometry (Embedding, Conv2d, a half-precision base with a float32
    adapter). When it is the only delta to run while training, :meth:`fused_forward` computes the
    base op and the branch as one autograd node. A subclass with a cheaper way to apply its factors
    (Block-LoRA's shared block) overrides :meth:`forward` and keeps the rest.
    """

    def __init__(self, geometry: Geometry, config: AdapterConfig, *, bank: nn.Module | None = None,
                 layer: int = 0):
        super().__init__(geometry, config, bank=bank, layer=layer)
        self.scaling: float = 1.0  # a subclass sets its own
        self.drop: nn.Module | None = None  # dropout on the adapter branch's input (None: none)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, d_in), B (d_out, r)) with ΔW = scaling · B A; tensors of the autograd graph (the
        parameters, or what the method computes from them)."""
        raise NotImplementedError(f"{type(self).__name__} must implement factors()")

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        if self.kind in MATMUL_KINDS and x.dtype == a.dtype == base_out.dtype:
            if self.drop is not None:
                x = self.drop(x)
            # in place at inference, where nobody holds the base output and no gradient flows
            inplace = not (torch.is_grad_enabled() and base_out.requires_grad) and not intercepted(self.geometry.base)
            return add_low_rank(x, base_out, a, b, self.scaling, inplace)
        g = self.geometry
        if self.kind != "embedding":  # an embedding's input is ids
            x = x.to(a.dtype)
            if self.drop is not None:
                x = self.drop(x)
        return base_out + g.project_out(g.project_in(x, a), b * self.scaling).to(base_out.dtype)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Training fast path: the frozen base op and the branch as one autograd function
        (:class:`paretune.core.fast.FusedLoraLinear`); None where it does not apply (inference,
        which the in-place add serves; dropout; a base that trains or has hooks; autocast; mixed
        dtypes; kinds other than Linear / Conv1D)."""
        if not (torch.is_grad_enabled() and self.kind in MATMUL_KINDS and self.drop is None):
            return None
        base = self.geometry.base
        w, bias = self.geometry.matrix(), self.geometry.bias
        if w.requires_grad or (bias is not None and bias.requires_grad) or autocast_on() or intercepted(base):
            return None
        if x.dtype != w.dtype or not any(p.requires_grad for p in self.parameters()):
            return None
        a, up = self.factors()
        if a.dtype != w.dtype:
            return None
        return FusedLoraLinear.apply(x, w, bias, a, up, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        dtype = adapter_dtype(a)  # float64 adapters keep their precision
        return self.scaling * (b.to(dtype) @ a.to(dtype))

    def as_lora(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        with torch.no_grad():
            a, b = self.factors()
        return a.detach(), b.detach(), self.scaling
