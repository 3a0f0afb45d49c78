"""LaMDA and LaMDA++ (Azizi, Kundu and Pedram, EMNLP Findings 2024, "LaMDA: Large Model
Fine-Tuning via Spectrally Decomposed Low-Dimensional Adaptation"; code ArminAzizi98/LaMDA).

    y = W₀x + s · B S A x,    s = alpha / r

A (PMA, r×d_in) frozen, S (r×r, the low-dimensional adapter) trainable, B (PMB, d_out×r)
trainable at the start and frozen gradually "based on the singular values" until step tᵢ, after
which only S trains. The paper initialises A and B from W₀'s singular vectors; its public code
shows only the frozen A, the r×r core and B. Choices made here, where neither pins the detail:

* A = V_rᵀ and B = U_r, the top-r right and left singular vectors of W₀ (W₀ = U Σ Vᵀ);
  S = 0, so the adapted model starts equal to the base (the code's core starts at nn.Linear's
  random init, but its B starts at zero: either way ΔW = 0 at step 0).
* The freezing schedule: B's columns are frozen one at a time, from the one of the largest
  singular value down, evenly over the first ``freeze_fraction`` of training
  (tᵢ = freeze_fraction · total steps); at tᵢ B is frozen entirely (``requires_grad=False``,
  so no gradient is computed for it any more). A frozen column is held exactly: its gradient is
  zeroed and the optimizer's update undone after each step (``on_step``, called by
  :func:`paretune.train`).
* LaMDA++ (``rank_allocation="energy"``): each layer's rank is set from its normalised spectrum
  energy e = Σᵢ≤r σᵢ² / Σᵢ σᵢ² (the share of W₀'s energy in the top-r directions): the
  adapter's total rank r × (number of layers) is split in proportion to e (rounded down, at
  least 1 and at most min(d_out, d_in) per layer, the rest handed out to the layers furthest below
  their share), so layers whose weight concentrates in few directions get
  more rank.

Trainable per layer: r·d_out + r² (B until tᵢ, S throughout; r² after tᵢ). Saved: S and B; A is
recomputed from the base on load.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.geometry import Geometry
from ..core.registry import register
from .lora import adapter_dtype


@dataclasses.dataclass
class LamdaConfig(AdapterConfig):
    r: int = 8
    alpha: float = 8.0
    freeze_fraction: float = 0.25
    rank_allocation: str = "uniform"

    def validate(self) -> None:
        self._positive_int("r")
        self._non_negative("alpha")
        f = self.freeze_fraction
        self._require(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 <= f <= 1, "freeze_fraction", f,
                      "it must be in [0, 1] (the share of training steps over which B is frozen)")
        self._one_of("rank_allocation", ("uniform", "energy"))


def _svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(w.detach().to(adapter_dtype(w)), full_matrices=False)


def energy_ranks(spectra: list[torch.Tensor], r: int, caps: list[int]) -> list[int]:
    """LaMDA++ allocation: r × len(spectra) ranks split in proportion to each layer's share of
    energy in its top-r singular values (rounded down, then the rest to the layers furthest below
    their share; each rank in [1, its cap])."""
    scores = []
    for s in spectra:
        e = s.double() ** 2
        scores.append(float(e[:r].sum() / e.sum()) if float(e.sum()) > 0 else 1.0)
    total = r * len(spectra)
    raw = [total * sc / sum(scores) for sc in scores]
    ranks = [min(cap, max(1, math.floor(x))) for x, cap in zip(raw, caps)]
    while sum(ranks) < total:  # hand out what rounding and caps left, largest shortfall first
        room = [i for i in range(len(ranks)) if ranks[i] < caps[i]]
        if not room:
            break
        i = max(room, key=lambda j: (raw[j] - ranks[j], -j))
        ranks[i] += 1
    return ranks


class _Ranks(nn.Module):
    """LaMDA++'s per-layer ranks (a bank with no tensors: the allocation needs every layer)."""

    def __init__(self, ranks: list[int]):
        super().__init__()
        self.ranks = ranks


@register(
    "lamda",
    config=LamdaConfig,
    summary="LaMDA (Azizi et al. 2024): ΔW = s·B·S·A, A and B from W's singular vectors, A frozen, "
            "S (r×r) trains, B frozen gradually; LaMDA++ rank allocation by spectrum energy",
    formula="r·d_out + r² (r² after B is frozen)",
    kinds=("linear", "conv1d"),
)
class LamdaDelta(Delta):
    @classmethod
    def make_bank(cls, geometries: list[Geometry], config: LamdaConfig) -> nn.Module | None:
        if config.rank_allocation != "energy":
            return None
        spectra = [torch.linalg.svdvals(g.matrix().detach().to(adapter_dtype(g.weight))) for g in geometries]
        return _Ranks(energy_ranks(spectra, config.r, [min(g.d_out, g.d_in) for g in geometries]))

    def __init__(self, geometry: Geometry, config: LamdaConfig, **context):
        bank = context.get("bank")
        if bank is not None:  # LaMDA++: this layer's own rank
            config = dataclasses.replace(config, r=bank.ranks[context.get("layer", 0)])
        super().__init__(geometry, config, **context)
        r = min(config.r, self.d_out, self.d_in)
        if r != config.r:
            config = dataclasses.replace(config, r=r)
            self.config = config
        w = geometry.weight
        dtype = adapter_dtype(w)
        u, _, vh = _svd(geometry.matrix())
        self.scaling = config.alpha / config.r
        self.register_buffer("A", vh[:r].to(dtype).contiguous(), persistent=False)
        self.B = nn.Parameter(u[:, :r].to(dtype).contiguous())
        self.S = nn.Parameter(torch.zeros(r, r, dtype=dtype, device=w.device))
        self.register_buffer("frozen", torch.zeros(r, dtype=torch.bool, device=w.device), persistent=False)
        self._held: torch.Tensor | None = None  # values of the frozen columns of B
        self.B.register_hook(self._mask_grad)

    def _mask_grad(self, grad: torch.Tensor) -> torch.Tensor:
        if bool(self.frozen.any()):
            grad = grad.masked_fill(self.frozen[None, :], 0.0)
        return grad

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        h = g.project_in(x.to(self.A.dtype), self.A)
        h = g.project_in(h, self.S)
        return base_out + g.project_out(h, self.B * self.scaling).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.B @ self.S @ self.A)

    def as_lora(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return (self.S @ self.A).detach(), self.B.detach(), self.scaling

    @torch.no_grad()
    def on_step(self, step: int, total: int) -> None:
        """The PMB freezing schedule (see the module docstring); called after optimizer step ``step``."""
        r = self.S.shape[0]
        if self._held is not None:  # undo the optimizer's move of columns frozen earlier
            cols = self.frozen.nonzero().flatten()
            self.B[:, cols] = self._held
        t_i = self.config.freeze_fraction * total
        n_frozen = r if step >= t_i else min(r, math.floor(r * step / t_i))
        if n_frozen > int(self.frozen.sum()):
            self.frozen[:n_frozen] = True
            self._held = self.B[:, : n_frozen].detach().clone()
        if n_frozen == r and self.B.requires_grad:
            self.B.requires_grad_(False)

    def stored_state(self) -> dict[str, torch.Tensor]:
        return {"B": self.B.detach(), "S": self.S.detach()}

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: LamdaConfig) -> int:
        r = min(config.r, d_out, d_in)
        return r * d_out + r * r
