"""Hydra (Kim et al., 2024, "Hydra: Multi-head Low-rank Adaptation for Parameter Efficient
Fine-tuning"; reference code extremebird/Hydra, ``vtab1k/hydra.py``).

Two LoRA branches around a frozen linear map W₀, b₀: a *parallel* branch P on the input and a
*sequential* branch S on the frozen output,

    y = W₀x + b₀ + s·P(x) + s·S(W₀x + b₀),    P(x) = U_p·drop(D_p x + c_p) + e_p,  S likewise,

each branch a down Linear (d → r, xavier-uniform weight, zero bias) and an up Linear (r → d_out,
zero weight and bias), as in the reference code; so the adapted model starts equal to the base.

Dropout (``dropout``, default 0) follows the reference: each branch drops its own r-dimensional
hidden activation, between down and up projection, ``up_proj(dropout(down_proj(x)))``
(``Hydra_layer.forward``, vtab1k/hydra.py:59-60, commit 4138457; one ``nn.Dropout`` per branch,
hydra.py:51, 81-84). The branch inputs, x and the frozen output W₀x + b₀ (the reference feeds
``fc2(x)`` / ``proj(x)`` itself to the sequential branch, hydra.py:13-14, 38-39), are never
dropped. Its VTAB-1k configs set dropout per dataset (0, 0.1 or 0.2).

The scale s (``scale``) defaults to 1.0, the reference layer's default (``Hydra_layer(...,
scale=1, do=0.0)``, hydra.py:46); the reference *tunes it per dataset*, from 0.1 to 4.5
(vtab1k/configs/hydra_both/*.yaml), so 1.0 is a starting point, not the paper's setting.

In eval mode (or with dropout 0) both branches are linear, so Hydra merges exactly:

    W = W₀ + s(U_p D_p + U_s D_s W₀),    b = b₀ + s(U_s D_s b₀ + U_p c_p + e_p + U_s c_s + e_s).

Trainable per layer: r(d_in + d_out) + r + d_out (parallel) + 2r·d_out + r + d_out
(sequential) = r(d_in + 3·d_out) + 2r + 2·d_out. ``bias=False`` drops the four branch biases
(a choice not in the paper, for bias-free models such as Llama; the default keeps them).
Merging into a base without a bias gives it one (see ``Host.merge``).

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
from ..core.dtypes import adapter_dtype
from ..core.geometry import Geometry
from ..core.registry import register


@dataclasses.dataclass
class HydraConfig(AdapterConfig):
    """``r``: each branch's hidden width (reference default ``dim=2``, hydra.py:77); ``scale``: s,
    1.0 by default (the reference tunes it per dataset, 0.1 to 4.5); ``dropout``: on each branch's
    r-dim hidden activation, as the reference (hydra.py:60); ``bias``: the four branch biases."""

    r: int = 2
    scale: float = 1.0
    dropout: float = 0.0
    bias: bool = True

    def validate(self) -> None:
        self._positive_int("r")
        self._number("scale")  # finite: inf or NaN would make every output NaN
        self._probability("dropout")
        self._flag("bias")


class _Branch(nn.Module):
    """down (d → r, xavier-uniform, zero bias), dropout on the r-dim hidden activation (as the
    reference's ``up_proj(dropout(down_proj(x)))``), then up (r → d_out, zeros)."""

    def __init__(self, d: int, d_out: int, r: int, bias: bool, dtype: torch.dtype, device: torch.device,
                 dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout) if dropout > 0 else None
        self.down = nn.Linear(d, r, bias=bias, dtype=dtype, device=device)
        self.up = nn.Linear(r, d_out, bias=bias, dtype=dtype, device=device)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.up.weight)
        if bias:
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x)
        if self.drop is not None:
            h = self.drop(h)
        return self.up(h)

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
        p = float(config.dropout)
        self.parallel = _Branch(self.d_in, self.d_out, config.r, config.bias, dtype, dev, dropout=p)
        self.sequential = _Branch(self.d_out, self.d_out, config.r, config.bias, dtype, dev, dropout=p)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        x = x.to(self.parallel.down.weight.dtype)
        return self._branches(x, self._frozen_output(x), base_out)

    def alone_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """When Hydra is the only delta to run, ``base_out`` is W₀x + b₀ itself: feed it to the
        sequential branch (no second W₀ product)."""
        return self._branches(x.to(self.parallel.down.weight.dtype), base_out, base_out)

    def _branches(self, x: torch.Tensor, frozen: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """base_out + s·P(x) + s·S(frozen), frozen = W₀x + b₀; dropout acts only inside each
        branch, on its hidden activation (x and frozen enter the branches as they are)."""
        frozen = frozen.to(x.dtype)
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
