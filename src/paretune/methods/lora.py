"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") and rsLoRA
(Kalajdzievski, 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA").

ΔW = s · B A with A ∈ R^{r×d_in}, B ∈ R^{d_out×r}; s = alpha / r, or alpha / sqrt(r) with
``rslora=True``. The paper initialises A at random and B at zero, so the adapted model starts
equal to the base. ``init`` picks A's distribution:

* ``"kaiming"`` (default): A ~ kaiming-uniform(a=sqrt(5)), as ``nn.Linear`` and the reference
  loralib code do; B = 0.
* ``"gaussian"``: A ~ N(0, 1/r²) (std 1/r), B = 0, as PEFT's "gaussian".
* ``"random"``: A kaiming as above and B ~ N(0, 1/r²): no zero start. Not from the paper: useful
  to test that merge/save paths move real numbers.

For embeddings the reference code swaps the roles (A = 0, B ~ N(0, 1)); paretune does the same.
Dropout (on the input of the adapter branch only, as in the paper's code) is skipped at p=0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.geometry import Geometry
from ..core.host import intercepted
from ..core.registry import register

ADAPTER_DTYPES = (torch.float32, torch.float64)
MATMUL_KINDS = ("linear", "conv1d")  # hosts whose op is x @ Wᵀ on the last dimension


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters train in float32 on half-precision bases (as PEFT's autocast_adapter_dtype) and
    in the base's own precision on float32 / float64 bases; dense deltas are computed in it too."""
    return weight.dtype if weight.dtype in ADAPTER_DTYPES else torch.float32


def _autocast_on() -> bool:
    return any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda") if d == "cpu" or torch.cuda.is_available())


class FusedLoraLinear(torch.autograd.Function):
    """y = x Wᵀ + b + s·(x Aᵀ) Bᵀ with W, b frozen, as one autograd node: the LoRA up projection is
    added into the base output in place (addmm_), and in backward the LoRA part of ∂x is added into
    the base part in place, so neither pass makes an activation-sized temporary for the branch.
    Saves x and the small h = x Aᵀ (what separate ops would save too)."""

    @staticmethod
    def forward(ctx, x, w, b, a, up, scaling):
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.addmm(b, x2, w.t()) if b is not None else x2 @ w.t()
        h = x2 @ a.t()
        y.addmm_(h, up.t(), alpha=scaling)
        ctx.save_for_backward(x2, h, w, a, up)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, h, w, a, up = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        gh = (g @ up).mul_(s)
        gx = ga = gup = None
        if ctx.needs_input_grad[0]:
            gx = (g @ w).addmm_(gh, a).view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            ga = gh.t() @ x2
        if ctx.needs_input_grad[4]:
            gup = (g.t() @ h).mul_(s)
        return gx, None, None, ga, gup, None


@dataclasses.dataclass
class LowRankConfig(AdapterConfig):
    """Options shared by LoRA-shaped methods: rank, alpha, dropout, rsLoRA scaling."""

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False

    def validate(self) -> None:
        self._positive_int("r")
        self._non_negative("alpha")
        self._require(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "dropout", self.dropout,
                      "it must be in [0, 1)")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


@dataclasses.dataclass
class LoraConfig(LowRankConfig):
    INIT_ONLY: ClassVar[tuple[str, ...]] = ("init",)  # options hot_swap may see differ
    init: str = "kaiming"

    def validate(self) -> None:
        super().validate()
        self._one_of("init", ("kaiming", "gaussian", "random"))


@register(
    "lora",
    config=LoraConfig,
    summary="LoRA (Hu et al. 2021): ΔW = s·B·A, rank r; s = alpha/r (or alpha/sqrt(r) with rslora)",
    formula="r·(d_in + d_out)",
)
class LoraDelta(Delta):
    def __init__(self, geometry: Geometry, config: LoraConfig, **context):
        super().__init__(geometry, config, **context)
        w = geometry.weight
        dtype = adapter_dtype(w)
        self.scaling = config.scaling
        self.A = nn.Parameter(torch.empty(config.r, self.d_in, dtype=dtype, device=w.device))
        self.B = nn.Parameter(torch.empty(self.d_out, config.r, dtype=dtype, device=w.device))
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 and self.kind != "embedding" else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init, r = self.config.init, self.config.r
        if self.kind == "embedding":
            nn.init.zeros_(self.A)
            nn.init.normal_(self.B)
            if init == "random":
                nn.init.normal_(self.A, std=1 / r)
            return
        if init == "gaussian":
            nn.init.normal_(self.A, std=1 / r)
        else:
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        if init == "random":
            nn.init.normal_(self.B, std=1 / r)
        else:
            nn.init.zeros_(self.B)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = self.A, self.B
        if self.kind in MATMUL_KINDS and x.dtype == a.dtype == base_out.dtype:
            # the fast path: one matmul down, then the up matmul fused with the scaling and the
            # add into the base output (addmm), so no activation-sized temporaries are made
            if self.drop is not None:
                x = self.drop(x)
            h = F.linear(x, a).reshape(-1, a.shape[0])
            flat = base_out.reshape(-1, b.shape[0])
            if not (torch.is_grad_enabled() and base_out.requires_grad) and flat.is_contiguous() \
                    and not intercepted(self.geometry.base):
                # inference: add into the base output in place (no new activation-sized tensor)
                return flat.addmm_(h, b.t(), alpha=self.scaling).view(base_out.shape)
            return torch.addmm(flat, h, b.t(), alpha=self.scaling).view(base_out.shape)
        g = self.geometry
        if self.kind != "embedding":
            x = x.to(a.dtype)
            if self.drop is not None:
                x = self.drop(x)
        h = g.project_in(x, a)
        return base_out + g.project_out(h, b * self.scaling).to(base_out.dtype)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Training fast path: the frozen base op and the LoRA branch as one autograd function
        (see :class:`FusedLoraLinear`); None where it does not apply (inference, which the
        fused addmm above already serves; dropout; a base that trains or has hooks; autocast)."""
        if not (torch.is_grad_enabled() and self.kind in MATMUL_KINDS and self.drop is None):
            return None
        base = self.geometry.base
        w, b = self.geometry.matrix(), self.geometry.bias
        a, up = self.A, self.B
        if not (a.requires_grad or up.requires_grad) or w.requires_grad or (b is not None and b.requires_grad):
            return None
        if not (x.dtype == w.dtype == a.dtype) or _autocast_on() or intercepted(base):
            return None
        return FusedLoraLinear.apply(x, w, b, a, up, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        dtype = adapter_dtype(self.A)  # float64 adapters keep their precision
        return self.scaling * (self.B.to(dtype) @ self.A.to(dtype))

    def as_lora(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.A.detach(), self.B.detach(), self.scaling

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: LoraConfig) -> int:
        return config.r * (d_in + d_out)
