"""Hydra (Kim et al., 2024, "Hydra: Multi-head Low-rank Adaptation for Parameter Efficient
Fine-tuning"; reference code extremebird/Hydra, ``vtab1k/hydra.py``).

Two LoRA branches around a frozen linear map W₀, b₀: a *parallel* branch P on the input and a
*sequential* branch S on the frozen output,

    y = W₀x + b₀ + s·P(x) + s·S(W₀x + b₀),    P(x) = U_p(D_p x + c_p) + e_p,  S likewise,

each branch a down Linear (d → r, xavier-uniform weight, zero bias) and an up Linear (r → d_out,
zero weight and bias), as in the reference code; so the adapted model starts equal to the base.
Both branches are linear, so Hydra merges exactly:

    W = W₀ + s(U_p D_p + U_s D_s W₀),    b = b₀ + s(U_s D_s b₀ + U_p c_p + e_p + U_s c_s + e_s).

Trainable per layer: r(d_in + d_out) + r + d_out (parallel) + 2r·d_out + r + d_out
(sequential) = r(d_in + 3·d_out) + 2r + 2·d_out. ``bias=False`` drops the four branch biases
(a choice not in the paper, for bias-free models such as Llama; the default keeps them).
Merging into a base without a bias gives it one (see ``Host.add_to_bias``).

Because ΔW depends on W₀, unmerge recovers W₀ from the merged W = (I + s·U_s D_s) W₀ + s·U_p D_p
with the Woodbury identity (a rank-r solve, no copy of W₀ kept), and adapters merged on the same
layer after Hydra must be unmerged first.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.geometry import Geometry
from ..core.registry import register
from .lora import adapter_dtype


@dataclasses.dataclass
class HydraConfig(AdapterConfig):
    r: int = 2
    scale: float = 1.0
    dropout: float = 0.0
    bias: bool = True

    def validate(self) -> None:
        self._positive_int("r")
        self._require(isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool), "scale",
                      self.scale, "it must be a number")
        self._require(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "dropout", self.dropout,
                      "it must be in [0, 1)")
        self._require(isinstance(self.bias, bool), "bias", self.bias, "it must be true or false")


class _Branch(nn.Module):
    """down (d → r, xavier-uniform, zero bias) then up (r → d_out, zeros)."""

    def __init__(self, d: int, d_out: int, r: int, bias: bool, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.down = nn.Linear(d, r, bias=bias, dtype=dtype, device=device)
        self.up = nn.Linear(r, d_out, bias=bias, dtype=dtype, device=device)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.up.weight)
        if bias:
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def matrix(self) -> torch.Tensor:
        return self.up.weight @ self.down.weight

    def offset(self) -> torch.Tensor | None:
        """The branch's output at x = 0: U c + e."""
        if self.down.bias is None:
            return None
        return self.up.weight @ self.down.bias + self.up.bias


@register(
    "hydra",
    config=HydraConfig,
    summary="Hydra (Kim et al. 2024): parallel LoRA on the input + sequential LoRA on the frozen output; mergeable",
    formula="r·(d_in + 3·d_out) + 2r + 2·d_out (without branch biases: r·(d_in + 3·d_out))",
    kinds=("linear", "conv1d"),
)
class HydraDelta(Delta):
    depends_on_base = True

    def __init__(self, geometry: Geometry, config: HydraConfig, **context):
        super().__init__(geometry, config, **context)
        w = geometry.weight
        dtype, dev = adapter_dtype(w), w.device
        self.scale = float(config.scale)
        self.parallel = _Branch(self.d_in, self.d_out, config.r, config.bias, dtype, dev)
        self.sequential = _Branch(self.d_out, self.d_out, config.r, config.bias, dtype, dev)
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        x = x.to(self.parallel.down.weight.dtype)
        return self._branches(x, self._frozen_output(x), base_out)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """When Hydra is the only delta to run, the host's base output is W₀x + b₀ itself: run
        the base once and feed its output to the sequential branch (no second W₀ product)."""
        base_out = self.geometry.base(x)
        return self._branches(x.to(self.parallel.down.weight.dtype), base_out, base_out)

    def _branches(self, x: torch.Tensor, frozen: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """base_out + s·P(x) + s·S(frozen), frozen = W₀x + b₀."""
        frozen = frozen.to(x.dtype)
        if self.drop is not None:
            x, frozen = self.drop(x), self.drop(frozen)
        extra = self.parallel(x) + self.sequential(frozen)
        return base_out + (self.scale * extra).to(base_out.dtype)

    def _frozen_output(self, x: torch.Tensor) -> torch.Tensor:
        """W₀x + b₀ of the frozen base alone (the host's output may hold other adapters)."""
        g = self.geometry
        w = g.matrix().to(x.dtype)
        b = g.bias
        return F.linear(x, w, None if b is None else b.to(x.dtype))

    def delta_weight(self) -> torch.Tensor:
        w0 = self.geometry.matrix().to(self.parallel.down.weight.dtype)
        return self.scale * (self.parallel.matrix() + self.sequential.matrix() @ w0)

    def delta_bias(self) -> torch.Tensor | None:
        b0 = self.geometry.bias
        parts = [self.parallel.offset(), self.sequential.offset()]
        if b0 is not None:
            parts.append(self.sequential.matrix() @ b0.to(self.sequential.up.weight.dtype))
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        return self.scale * sum(parts)

    def merged_deltas(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Undo W = (I + s·U_s D_s) W₀ + s·W_p (and the bias likewise) by Woodbury:
        (I + s·U D)⁻¹ = I − s·U (I_r + s·D U)⁻¹ D."""
        g, s = self.geometry, self.scale
        u, d = self.sequential.up.weight, self.sequential.down.weight
        eye = torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
        core = torch.linalg.inv(eye + s * (d @ u))

        def solve(m: torch.Tensor) -> torch.Tensor:  # (I + s·U D)⁻¹ m
            return m - s * (u @ (core @ (d @ m)))

        w = g.matrix().to(u.dtype)
        dw = w - solve(w - s * self.parallel.matrix())
        b = g.bias
        offsets = [o for o in (self.parallel.offset(), self.sequential.offset()) if o is not None]
        if b is None and not offsets:
            return dw, None
        b = torch.zeros(self.d_out, dtype=u.dtype, device=u.device) if b is None else b.to(u.dtype)
        shifted = b - s * sum(offsets) if offsets else b
        db = b - solve(shifted[:, None])[:, 0]
        return dw, db

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: HydraConfig) -> int:
        r = config.r
        n = r * (d_in + 3 * d_out)
        return n + (2 * r + 2 * d_out if config.bias else 0)
