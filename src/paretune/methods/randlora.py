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
  code (NLG/loralib/randlora_layers.py: n at line 75, ``scaling = lora_alpha / r / sqrt(n)`` at
  line 133); ``convention="peft"``: n = ⌈m / r⌉ (one basis fewer when r divides m) and
  s = alpha / r, as PEFT (peft/tuners/randlora/layer.py). Both
  give n·r ≥ m. The bases, their draw and everything below are the same. n is per layer (from
  the layer's own m), as the authors' vision code (vision_language/src/rand_lora.py,
  ``n = min(bank n, d_in // r + 1, d_out // r + 1)``); their NLG code uses one n for all layers.
* ``alpha=None`` (default) means the convention's own default, each matched to its own scaling:

  - ``paper``: alpha = 2·r, the value the authors' training scripts pass with the √n scaling:
    NLG/train.sh ``--lora_alpha $((2*rank))`` (rank 20), GLUE/run_glue.py
    ``randlora_alpha=data_args.rank*2`` (line 448), and the default 64 at r = 32 of the PEFT
    copy bundled with their code (peft/src/peft/tuners/randlora/config.py line 127, "typically 2
    times the rank"; its layer.py line 119 uses ``randlora_alpha / r / math.sqrt(self.n)``, with
    n = ⌈m / r⌉). So s = 2 / √n. (Their vision
    scripts differ: vision_language/src/rand_lora.py uses s = alpha / r without √n, and
    clip_encoder.py builds the layers without alpha, i.e. its default 1: s = 1 / r. Not followed.)
  - ``peft``: alpha = 20·r, PEFT's value for its scaling alpha / r: peft/tuners/randlora/config.py
    (PEFT 0.21.2, the version installed here) has ``r = 32`` (line 84), ``randlora_alpha = 640``
    (line 141) and "typically 20 times the rank" (lines 59, 143); layer.py line 128 has
    ``scaling = randlora_alpha / r``. So s = 20.

  The default is resolved when the config is built, so ``config.alpha`` (and the ``paretune.json``
  that :func:`paretune.save` writes) always holds the number used (``dataclasses.replace`` of
  ``r`` or ``convention`` keeps that number; build a new config for the new default). Files
  saved before this change hold ``alpha: null``, which then meant 20·r under either convention
  (so s = 20 / √n with ``paper``): :meth:`RandLoraConfig.upgrade` puts 20·r back when such a
  file is loaded, so it loads as it was trained. (A saved null can only come from such a file:
  since the change every saved config holds a number.)
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
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..core.bank import Bank
from ..core.config import AdapterConfig
from ..core.dtypes import adapter_dtype
from ..core.geometry import Geometry
from ..core.lowrank import LowRankDelta
from ..core.registry import register

# alpha = ALPHA_PER_RANK[convention] · r when alpha is None (sources in the module docstring)
ALPHA_PER_RANK = {"paper": 2.0, "peft": 20.0}
# what alpha=None meant in files saved before the defaults above (20·r under both conventions)
LEGACY_ALPHA_PER_RANK = 20.0
LEGACY_R = 32  # the default r of those files, for a saved config without "r"


def default_alpha(r: int, convention: str = "paper") -> float:
    """The alpha that ``alpha=None`` stands for: 2·r (``paper``) or 20·r (``peft``)."""
    return ALPHA_PER_RANK[convention] * r


@dataclasses.dataclass
class RandLoraConfig(AdapterConfig):
    r: int = 32
    alpha: float | None = None  # None: default_alpha(r, convention), resolved at construction
    dropout: float = 0.0
    seed: int = 0
    sparse: bool = False
    very_sparse: bool = False
    convention: str = "paper"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha is None:  # stored resolved: a saved file holds the number it was trained with
            self.alpha = default_alpha(self.r, self.convention)

    def validate(self) -> None:
        self._positive_int("r")
        if self.alpha is not None:
            self._non_negative("alpha")
        self._probability("dropout")
        self._seed("seed")
        self._one_of("convention", ("paper", "peft"))
        self._flag("sparse")
        self._flag("very_sparse")
        self._require(not (self.sparse and self.very_sparse), "very_sparse", self.very_sparse,
                      "choose at most one of sparse and very_sparse")

    @classmethod
    def upgrade(cls, saved: dict[str, Any]) -> dict[str, Any]:
        """A saved config with ``alpha: null`` comes from before alpha was stored resolved, when
        None meant 20·r under both conventions: put that number in, so the file loads as trained."""
        if "alpha" in saved and saved["alpha"] is None:
            r = saved.get("r", LEGACY_R)
            if isinstance(r, int) and not isinstance(r, bool):  # else validation reports r
                return {**saved, "alpha": LEGACY_ALPHA_PER_RANK * r}
        return saved

    def scaling(self, n: int) -> float:
        """s for a layer with n bases: alpha / (r·√n) (``paper``) or alpha / r (``peft``)."""
        s = self.alpha / self.r
        return s / math.sqrt(n) if self.convention == "paper" else s


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
class RandLoraDelta(LowRankDelta):
    """Forward, merge (``delta_weight``) and ``as_lora`` are LowRankDelta's, on :meth:`factors`;
    dropout (``self.drop``) acts on the adapter's input, as the authors' code and PEFT."""

    def __init__(self, geometry: Geometry, config: RandLoraConfig, *, bank: Bank | None = None, layer: int = 0):
        if bank is None:  # built alone (not through adapt): a bank for this layer only
            bank = self.make_bank([geometry], config)
        super().__init__(geometry, config, bank=bank, layer=layer)
        w = geometry.weight
        dtype = adapter_dtype(w)
        self.min_dim, self.max_dim = min(self.d_in, self.d_out), max(self.d_in, self.d_out)
        self.a_on_input = self.d_in <= self.d_out  # A (and Γ) act on the smaller side, as PEFT
        self.n = num_bases(self.min_dim, config.r, config.convention)
        self.scaling = config.scaling(self.n)
        # Λ = 0, Γ = 1 / max(n, m): NLG/loralib/randlora_layers.py lines 149-150
        self.Lambda = nn.Parameter(torch.zeros(self.n, config.r, dtype=dtype, device=w.device))
        self.Gamma = nn.Parameter(torch.full((self.n, self.min_dim), 1.0 / max(self.n, self.min_dim),
                                             dtype=dtype, device=w.device))
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None

    @classmethod
    def make_bank(cls, geometries: list[Geometry], config: RandLoraConfig) -> Bank:
        d_in = max(g.d_in for g in geometries)
        d_out = max(g.d_out for g in geometries)
        a, b = draw_bank(max(d_in, d_out), min(d_in, d_out), config)
        w = geometries[0].weight
        dtype = adapter_dtype(w)
        return Bank(A=a.to(w.device, dtype), B=b.to(w.device, dtype))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down (k, d_in), up (d_out, k)), k = n·r, with ΔW = s · up @ down."""
        dtype = self.Lambda.dtype
        a = self.bank.A[:, : self.min_dim].to(dtype)
        b = self.bank.B[: self.max_dim, : self.n * self.config.r].to(dtype)
        scaled = _ScaledA.apply(a, self.Lambda, self.Gamma)  # (n·r, m)
        return (scaled, b) if self.a_on_input else (b.T, scaled.T)

    def stored_state(self) -> dict[str, torch.Tensor]:
        return {"Gamma": self.Gamma.detach(), "Lambda": self.Lambda.detach()}

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: RandLoraConfig) -> int:
        m = min(d_in, d_out)
        return num_bases(m, config.r, config.convention) * (config.r + m)
