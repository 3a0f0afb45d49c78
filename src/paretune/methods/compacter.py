"""Compacter and Compacter++ (Karimi Mahabadi, Henderson & Ruder, NeurIPS 2021, "Compacter:
Efficient Low-Rank Hypercomplex Adapter Layers").

A bottleneck adapter (:mod:`paretune.methods.bottleneck`, series style: out = h + A(h)) whose down
(m × d) and up (d × m) projections are parameterized hypercomplex multiplication (PHM) layers

    W = Σ_{i=1..n} A_i ⊗ B_i,   A_i ∈ R^{n×n},   B_i = s_i t_iᵀ (rank one, the paper's r = 1),

with the "slow" A_i shared by every adapter layer (one trainable (n, n, n) tensor in the adapter's
bank, used by the down and the up projections of all layers, as the paper's §3.3 and the reference
code's ``shared_phm_rule``) and the "fast" rank-one B_i per layer and projection. n is ``phm_dim``
(default 4); d and m must both be divisible by n (a ConfigError otherwise).

``variant="compacter"`` places an adapter after the attention and after the feed-forward sub-layer
of every layer (Houlsby's placement); ``"compacter++"`` (default, the paper's recommendation) after
the feed-forward sub-layer only. Hosts are the sub-layers' output projections, as the series
bottleneck adapter (see there for BERT / Llama / GPT-2).

Parameter count (paper, §3.3): Compacter has 4L(k + d) + n³ weights for L layers of two adapters,
each adapter two PHM layers of k + d weights (k = the bottleneck m here): n rank-one factors
s_i, t_i of (k + d)/n numbers each. With the biases of both projections (k + d), one adapted module
trains 2(m + d) + (m + d) = 3(m + d) numbers, and the adapter n³ once (:meth:`shared_formula`).

Choices, stated (the reference code rabeehk/compacter, ``seq2seq/hypercomplex/layers.py`` and its
adapter configuration, and AdapterHub's ``adapters/methods/modeling.py`` ``PHMLayer``):

* A ~ N(0, phm_init_range²) with ``phm_init_range=0.01`` (``phm_c_init="normal"``; the reference
  training arguments' 0.01; AdapterHub uses 1e-4), drawn from a generator seeded by ``seed``.
* s_i and t_i glorot-uniform as the reference's ``hypercomplex_nonlinearity="glorot-uniform"``, each
  factor taken as a (len × 1) matrix: bound √(6 / (len + 1)); biases zero.
* Zero start (not in the paper, which starts near zero): the up projection's s_i are zero, so its
  B_i and W_up are zero and the adapted model starts equal to the base; t_i of the up projection
  then get their first gradient once s_i moved (as LoRA's A once B moved).
* W is built in the (out, in) layout y = W x; the reference builds y = x H with H = Σ rule_i ⊗ W_i,
  the same family with A_i = rule_iᵀ.
* Non-linearity gelu, reduction factor 32: AdapterHub's ``CompacterPlusPlusConfig`` /
  ``CompacterConfig``; ``bottleneck`` gives m directly. m = d // reduction_factor is rounded down to
  a multiple of n (a PHM layer needs it: 576 // 32 = 18 gives 16 on SmolLM2).
* Stored: A with the adapter's first module, the factors and biases with every module.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..core.bank import Bank
from ..core.config import AdapterConfig
from ..core.delta import SharedInBank
from ..core.dtypes import adapter_dtype
from ..core.geometry import Geometry
from ..core.registry import register
from ..errors import ConfigError
from .bottleneck import NON_LINEARITIES, BottleneckBase, resolve_targets

VARIANTS = ("compacter++", "compacter")


@dataclasses.dataclass
class CompacterConfig(AdapterConfig):
    """``variant``: "compacter++" (after the FFN) or "compacter" (after attention and FFN);
    ``phm_dim``: n; ``reduction_factor`` / ``bottleneck``: m = d // reduction_factor (rounded down to a
    multiple of n) or m;
    ``non_linearity``; ``phm_init_range``: std of the shared A; ``dropout``: on the adapter input;
    ``seed``: draws A."""

    variant: str = "compacter++"
    phm_dim: int = 4
    reduction_factor: int = 32
    bottleneck: int | None = None
    non_linearity: str = "gelu"
    phm_init_range: float = 0.01
    dropout: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        self._one_of("variant", VARIANTS)
        self._positive_int("phm_dim")
        self._positive_int("reduction_factor")
        if self.bottleneck is not None:
            self._positive_int("bottleneck")
        self._one_of("non_linearity", tuple(NON_LINEARITIES))
        self._non_negative("phm_init_range")
        self._probability("dropout")
        self._seed("seed")
        if self.bottleneck is not None:
            self._require(self.bottleneck % self.phm_dim == 0, "bottleneck", self.bottleneck,
                          f"it must be divisible by phm_dim={self.phm_dim}")

    @property
    def s(self) -> float:
        return 1.0

    def width(self, d: int) -> int:
        """m for a module of output width d, checked against n."""
        n = self.phm_dim
        if d % n:
            raise ConfigError(
                f"compacter: phm_dim={n} does not divide the adapted width {d}; choose a phm_dim that divides it "
                f"(e.g. {math.gcd(d, n) if math.gcd(d, n) > 1 else 1})."
            )
        if self.bottleneck is not None:
            return self.bottleneck
        m = d // self.reduction_factor // n * n  # rounded down to a multiple of n, as a PHM layer needs
        if m < n:
            raise ConfigError(
                f"compacter: reduction_factor={self.reduction_factor} leaves a bottleneck of {d // self.reduction_factor} "
                f"for the width {d}, less than phm_dim={n}; choose reduction_factor <= {d // n} or give bottleneck=m "
                "directly."
            )
        return m


def default_targets(model: nn.Module, config: CompacterConfig | None = None) -> str:
    """The feed-forward output projections (Compacter++), and the attention ones too (Compacter)."""
    config = config if config is not None else CompacterConfig()
    placements = ("attn", "ffn") if config.variant == "compacter" else ("ffn",)
    return resolve_targets(model, placements, True, "compacter")


def phm_weight(a: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Σ_i A_i ⊗ (s_i t_iᵀ): a (n, n, n), s (n, p), t (n, q) -> (n·p, n·q)."""
    n, p, q = a.shape[0], s.shape[1], t.shape[1]
    return torch.einsum("iab,ip,iq->apbq", a, s, t).reshape(n * p, n * q)


def _glorot(n: int, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    bound = math.sqrt(6.0 / (length + 1))
    return torch.empty(n, length, dtype=dtype, device=device).uniform_(-bound, bound)


@register(
    "compacter",
    config=CompacterConfig,
    summary="Compacter / Compacter++ (Karimi Mahabadi et al. 2021): series bottleneck adapters whose "
            "projections are Σ A_i ⊗ s_i t_iᵀ, the n×n A_i shared by all layers",
    formula="3·(d + m) per layer (rank-one PHM factors and biases) + n³ shared, m = d // reduction_factor rounded "
            "down to a multiple of n",
    kinds=("linear", "conv1d"),
    default_targets=default_targets,
)
class CompacterDelta(SharedInBank, BottleneckBase):
    """Per layer: the rank-one factors of the down (m × d) and up (d × m) PHM layers and their
    biases; the shared A in the bank, saved once with the first layer."""

    shared_names = ("phm_rule",)

    @classmethod
    def make_bank(cls, geometries: list[Geometry], config: CompacterConfig) -> Bank:
        for g in geometries:
            config.width(g.d_out)  # check every layer before anything is built
        weight = geometries[0].weight
        dtype = adapter_dtype(weight)
        n = config.phm_dim
        gen = torch.Generator().manual_seed(config.seed)
        a = torch.randn(n, n, n, generator=gen, dtype=torch.float64) * config.phm_init_range
        bank = Bank()
        bank.phm_rule = nn.Parameter(a.to(weight.device, dtype))
        return bank

    def __init__(self, geometry: Geometry, config: CompacterConfig, *, bank: Bank | None = None, layer: int = 0):
        if bank is None:  # built alone (not through adapt): A for this layer only
            bank = self.make_bank([geometry], config)
        super().__init__(geometry, config, bank=bank, layer=layer)
        self.setup(config, config.width(self.d_out))
        w = geometry.weight
        dtype, dev = adapter_dtype(w), w.device
        n, d, m = config.phm_dim, self.d_out, self.m
        self.down_s = nn.Parameter(_glorot(n, m // n, dtype, dev))
        self.down_t = nn.Parameter(_glorot(n, d // n, dtype, dev))
        self.down_bias = nn.Parameter(torch.zeros(m, dtype=dtype, device=dev))
        self.up_s = nn.Parameter(torch.zeros(n, d // n, dtype=dtype, device=dev))  # W_up = 0 at the start
        self.up_t = nn.Parameter(_glorot(n, m // n, dtype, dev))
        self.up_bias = nn.Parameter(torch.zeros(d, dtype=dtype, device=dev))

    @property
    def phm_rule(self) -> nn.Parameter:
        return self.bank.phm_rule

    def project(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.phm_rule
        if which == "down":
            return phm_weight(a, self.down_s, self.down_t), self.down_bias
        return phm_weight(a, self.up_s, self.up_t), self.up_bias

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: CompacterConfig) -> int:
        m = config.width(d_out)
        return 2 * (m + d_out) + m + d_out  # rank-one factors of both PHM layers + both biases

    @classmethod
    def shared_formula(cls, shapes: list[tuple[int, int]], config: CompacterConfig) -> int:
        return config.phm_dim ** 3  # the A_i, once for the adapter

    def extra_repr(self) -> str:
        return f"{self.method}: {self.d_out} -> {self.m} -> {self.d_out}, phm_dim={self.config.phm_dim}"
