"""RandLoRA (Albert et al., ICLR 2025, "RandLoRA: Full-rank parameter-efficient fine-tuning of
large models"; reference code PaulAlbert31/RandLoRA, and PEFT's ``randlora``).

For a layer with m = min(d_in, d_out) and M = max(d_in, d_out):

    ΔW = s · Σᵢ₌₁..n B_i diag(λ_i) A diag(γ_i)   (on the m side; transposed when d_out < d_in)

with n = ⌊m / r⌋ + 1 frozen random bases B_i ∈ R^{M×r}, one frozen random A ∈ R^{r×m} shared by
the n terms, and trainable Λ = [λ_i] ∈ R^{n×r} (init 0, so ΔW = 0 at the start) and
Γ = [γ_i] ∈ R^{n×m} (init 1 / max(n, m)). n·r ≥ m, so ΔW can have full rank m. Trainable per
layer: n·(r + m). A and the B_i are shared by all layers of the adapter (one bank sized to the
largest dims), regenerated from ``seed`` and never saved.

Choices made here (stated; the draw follows PEFT so that the same seed gives PEFT's numbers):

* ``convention="paper"`` (default): n = ⌊m / r⌋ + 1 and s = alpha / (r·√n), as the authors'
  code; ``convention="peft"``: n = ⌈m / r⌉ (one basis fewer when r divides m) and s = alpha / r,
  as PEFT. Both give n·r ≥ m. The bases, their draw and everything below are the same.
* ``alpha`` defaults to 20·r (PEFT's advice, and its default 640 at its default r = 32).
* Dense bases (default) are drawn as PEFT draws them: a CPU generator seeded with ``seed``
  fills A (r × bank m), then each of the bank's n B_i (bank M × r), kaiming-uniform (a=√5) in
  bfloat16, each tensor divided by its own std (unit std), then cast to the adapter's dtype.
  (PEFT uses float16 on a machine without bfloat16; paretune always uses bfloat16, so a seed
  means the same bases everywhere.) ``sparse=True``: ternary {−1, 0, +1} with P(±1) = 1/6
  each, as the paper; ``very_sparse=True``: P(±1) = 1/(2√D), D = the bank's m, as PEFT; both
  then divided by their std.
* Which B columns form B_i: PEFT flattens B to (M, n·r) and pairs its column c with row
  ⌊c / n⌋ of A, scaled by λ and γ of basis c mod n. paretune keeps the same pairing, so B_i is
  the set of columns {k·n + i}; any fixed partition of i.i.d. random columns is the paper's
  construction, and this one makes ΔW equal to PEFT's for the same Λ (Λ here = PEFT's λᵀ) and Γ.
* The forward never builds the n per-basis products: it forms the (n·r × m) matrix of the
  rows λ_i[k]·A[k]·γ_i (a parameter-sized tensor, through a custom autograd function that saves
  only its inputs, as the reference code does) and applies it and the flat B as two matmuls on
  the input. Scaling x by each γ_i first would hold n copies of the activations instead.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.geometry import Geometry
from ..core.registry import register
from .lora import adapter_dtype


@dataclasses.dataclass
class RandLoraConfig(AdapterConfig):
    r: int = 32
    alpha: float | None = None  # None: 20·r
    dropout: float = 0.0
    seed: int = 0
    sparse: bool = False
    very_sparse: bool = False
    convention: str = "paper"

    def validate(self) -> None:
        self._positive_int("r")
        if self.alpha is not None:
            self._non_negative("alpha")
        self._require(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "dropout", self.dropout,
                      "it must be in [0, 1)")
        self._require(isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0,
                      "seed", self.seed, "it must be an integer >= 0")
        self._one_of("convention", ("paper", "peft"))
        for flag in ("sparse", "very_sparse"):
            self._require(isinstance(getattr(self, flag), bool), flag, getattr(self, flag), "it must be True or False")
        self._require(not (self.sparse and self.very_sparse), "very_sparse", self.very_sparse,
                      "choose at most one of sparse and very_sparse")

    @property
    def alpha_value(self) -> float:
        return 20.0 * self.r if self.alpha is None else float(self.alpha)


def num_bases(min_dim: int, r: int, convention: str = "paper") -> int:
    """The number of rank-r bases, n·r ≥ min_dim: ⌊min_dim / r⌋ + 1 (the paper's code) or
    ⌈min_dim / r⌉ (PEFT: the fewest that can reach full rank)."""
    return -(-min_dim // r) if convention == "peft" else min_dim // r + 1


def _dense(shape: tuple[int, ...], fan_in: int, gen: torch.Generator) -> torch.Tensor:
    """kaiming-uniform (a=√5, bound 1/√fan_in) in bfloat16, as PEFT's draw."""
    gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))
    bound = math.sqrt(3.0) * (gain / math.sqrt(fan_in))
    return torch.empty(shape, dtype=torch.bfloat16).uniform_(-bound, bound, generator=gen)


def _ternary(u: torch.Tensor, sparsity: float) -> torch.Tensor:
    """−1 where u < 1/(2s), +1 where u > 1 − 1/(2s), else 0 (u uniform on [0, 1))."""
    out = torch.zeros_like(u)
    out[u < 1 / (2 * sparsity)] = -1
    out[u > 1 - 1 / (2 * sparsity)] = 1
    return out


def _unit_std(t: torch.Tensor) -> torch.Tensor:
    std = t.std()
    return t / std if std > 0 else t


def draw_bank(max_dim: int, min_dim: int, config: RandLoraConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, min_dim), B (max_dim, n·r), column b·r + k = column k of the b-th draw), CPU."""
    r, n = config.r, num_bases(min_dim, config.r, config.convention)
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    if config.sparse or config.very_sparse:
        s = math.sqrt(min_dim) if config.very_sparse else 3.0
        a = _ternary(torch.rand((r, min_dim), generator=gen), s)
        b = _ternary(torch.rand((max_dim, n, r), generator=gen), s)
    else:
        a = _dense((r, min_dim), min_dim, gen)
        b = torch.stack([_dense((max_dim, r), r, gen) for _ in range(n)], dim=1)
    return _unit_std(a), _unit_std(b).reshape(max_dim, n * r)


class RandLoraBank(nn.Module):
    """The shared frozen A (r, bank m) and flat B (bank M, bank n·r), non-persistent buffers."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.register_buffer("A", a, persistent=False)
        self.register_buffer("B", b, persistent=False)


class _ScaledA(torch.autograd.Function):
    """rows[k·n + i] = Λ[i, k] · A[k] ⊙ Γ[i]: (n·r, m), saving only its inputs for backward."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, lam, gamma)
        return (lam.T[:, :, None] * a[:, None, :] * gamma[None]).flatten(0, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        a, lam, gamma = ctx.saved_tensors
        g = grad.reshape(a.shape[0], lam.shape[0], a.shape[1])  # (r, n, m)
        a, lam, gamma = (t.to(g.dtype) for t in (a, lam, gamma))
        g_lam = torch.einsum("kim,km,im->ik", g, a, gamma) if ctx.needs_input_grad[1] else None
        g_gamma = torch.einsum("kim,km,ik->im", g, a, lam) if ctx.needs_input_grad[2] else None
        return None, g_lam, g_gamma


@register(
    "randlora",
    config=RandLoraConfig,
    summary="RandLoRA (Albert et al. 2025): full-rank ΔW = s·Σᵢ Bᵢ diag(λᵢ) A diag(γᵢ) over n = ⌊min(d_in, d_out)/r⌋ + 1 "
            "frozen random bases shared by all layers; only Λ and Γ train",
    formula="n·(r + min(d_in, d_out)), n = ⌊min(d_in, d_out) / r⌋ + 1 (⌈min/r⌉ with convention=peft)",
    kinds=("linear", "conv1d"),
)
class RandLoraDelta(Delta):
    def __init__(self, geometry: Geometry, config: RandLoraConfig, *, bank: RandLoraBank | None = None,
                 layer: int = 0):
        if bank is None:  # built alone (not through adapt): a bank for this layer only
            bank = self.make_bank([geometry], config)
        super().__init__(geometry, config, bank=bank, layer=layer)
        w = geometry.weight
        dtype = adapter_dtype(w)
        self.min_dim, self.max_dim = min(self.d_in, self.d_out), max(self.d_in, self.d_out)
        self.a_on_input = self.d_in <= self.d_out  # A (and Γ) act on the smaller side, as PEFT
        self.n = num_bases(self.min_dim, config.r, config.convention)
        self.scaling = config.alpha_value / config.r / (math.sqrt(self.n) if config.convention == "paper" else 1.0)
        self.Lambda = nn.Parameter(torch.zeros(self.n, config.r, dtype=dtype, device=w.device))
        self.Gamma = nn.Parameter(torch.full((self.n, self.min_dim), 1.0 / max(self.n, self.min_dim),
                                             dtype=dtype, device=w.device))
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None

    @classmethod
    def make_bank(cls, geometries: list[Geometry], config: RandLoraConfig) -> RandLoraBank:
        d_in = max(g.d_in for g in geometries)
        d_out = max(g.d_out for g in geometries)
        a, b = draw_bank(max(d_in, d_out), min(d_in, d_out), config)
        w = geometries[0].weight
        dtype = adapter_dtype(w)
        return RandLoraBank(a.to(w.device, dtype), b.to(w.device, dtype))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down (k, d_in), up (d_out, k)), k = n·r, with ΔW = s · up @ down."""
        dtype = self.Lambda.dtype
        a = self.bank.A[:, : self.min_dim].to(dtype)
        b = self.bank.B[: self.max_dim, : self.n * self.config.r].to(dtype)
        scaled = _ScaledA.apply(a, self.Lambda, self.Gamma)  # (n·r, m)
        return (scaled, b) if self.a_on_input else (b.T, scaled.T)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        down, up = self.factors()
        x = x.to(down.dtype)
        if self.drop is not None:
            x = self.drop(x)
        out = g.project_out(g.project_in(x, down), up) * self.scaling
        return base_out + out.to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        down, up = self.factors()
        dtype = adapter_dtype(down)
        return self.scaling * (up.to(dtype) @ down.to(dtype))

    def as_lora(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        down, up = self.factors()
        return down.detach(), up.detach(), self.scaling

    def stored_state(self) -> dict[str, torch.Tensor]:
        return {"Gamma": self.Gamma.detach(), "Lambda": self.Lambda.detach()}

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: RandLoraConfig) -> int:
        m = min(d_in, d_out)
        return num_bases(m, config.r, config.convention) * (config.r + m)
