"""NOLA (Koohpayegani et al., ICLR 2024, "NOLA: Compressing LoRA using Linear Combination of
Random Basis"; reference code UCDvision/NOLA).

LoRA's factors are linear combinations of frozen random bases; only the mixing coefficients
train and are saved (with the seed that regenerates the bases). Two inits, both from the
reference code:

* ``init="zero"`` (the LLM code, ``gpt/src/model_nola.py``; default):
  A = A₀ + Σᵢ₌₁..k αᵢ Aᵢ,  B = B₀ + Σⱼ₌₁..l βⱼ Bⱼ,  ΔW = (alpha / r) · B A,
  with Aᵢ ∈ R^{r×d_in}, Bⱼ ∈ R^{d_out×r} ~ U(−1, 1)/√k (resp. /√l) (``GenerateParams``:
  ``uniform_(W, a=-1.0, b=1.0)`` times ``1/sqrt(num_basis)``), A₀ kaiming-uniform (a=√5) over
  (r, d_in) as ``nn.Linear(d_in, r)``'s weight, so U(±1/√d_in), and frozen, B₀ = 0, and
  α = β = 0: ΔW = 0 at the start, as LoRA.
* ``init="nonzero"`` (the ViT code, ``vit/NOLA.py``, class ``NOLA2``, lines 189-198): A = Σ αᵢ Aᵢ,
  B = Σ βⱼ Bⱼ (no A₀, B₀), coefficients start at 1/k and 1/l, ΔW = (1 / r) · B A ≠ 0 at init
  (``scale = c / rank`` with c = 1.0). The reference draws all of A's bases as one tensor of shape
  (k, d_in, r) and all of B's as one of shape (l, r, d_out), each with
  ``init.kaiming_uniform_(·, a=math.sqrt(5))``. PyTorch's fan-in of a 3-D tensor is
  ``size(1) · size(2)`` and the gain for a=√5 is √(2 / (1 + 5)) = 1/√3, so each entry is
  U(−b, b) with b = √3 · gain / √fan_in = 1/√fan_in: **b_A = 1/√(r·d_in) and b_B = 1/√(r·d_out)**.
  Ours are drawn from exactly these distributions (``bases_version=2``, below).

Trainable per layer: k + l.

Bases versions (``bases_version``): the seed defines what a saved adapter's coefficients mean, so
the definition of the bases is versioned.

* 2 (current, the default for new adapters): as above.
* 1 (adapters saved before the fix): with ``init="nonzero"`` each basis was drawn as a matrix of
  our own layout, with bound 1/√(its second dimension): A's bases U(±1/√d_in), B's U(±1/√r), i.e.
  √r and √d_out times the reference's bounds, so ΔW at init was about √(r·d_out) times the
  reference's (derived from the bounds). Kept bit for bit so that such adapters load as trained.

With ``init="zero"`` (the default) the bases and A₀ are the same in both versions; only
``init="nonzero"`` differs. A saved ``paretune.json`` written before versions existed has no
``bases_version`` key; :meth:`NolaConfig.upgrade` reads such a config as version 1 for
``init="nonzero"`` (version 2 for ``"zero"``, which is the same thing); ``paretune.load`` and
``hot_swap`` pass every saved config through ``AdapterConfig.upgrade`` before using it.

Choices made here (stated; the reference code differs or is silent):

* Seeds. The reference uses the same bases in every layer: ``vit/NOLA.py`` calls
  ``torch.manual_seed(0)`` before drawing every layer's bases (line 193; the ``seed`` argument is
  unused), and the GPT code draws one seed per ``NOLALinear`` (``gpt/src/model_nola.py``, line 134)
  but builds the blocks by deep-copying one block (line 470), so every block shares them. Here
  every layer has its own bases, regenerated from a per-layer seed derived (SHA-256) from ``seed``
  and the layer's index among the adapter's targets, and A's and B's from separate seeds.
* The bases are always drawn on the CPU (so an adapter trained on a GPU loads on a CPU with the
  same bases) in fixed draws of ``DRAW`` bases, with our own generator calls: the values are not
  the reference's (a different layout and stream), their distribution is.
* The bases are regenerated in the forward *and* the backward pass (as the reference code's custom
  autograd does) so that memory holds at most one draw of bases, never all k. Under
  ``torch.no_grad`` (evaluation) A and B are cached until the coefficients change.

Regenerating costs time (about k·r·(d_in + d_out) random numbers per layer, twice a step), so
``cache_bases="auto"`` (default) keeps the drawn bases in memory when all of the adapter's bases
together take at most ``CACHE_LIMIT`` bytes, and regenerates them otherwise; "always" and
"never" force either. Cached or not, the bases and the results are the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import torch
from torch import nn

from ..core.bank import Bank
from ..core.config import AdapterConfig
from ..core.dtypes import adapter_dtype
from ..core.geometry import Geometry
from ..core.lowrank import LowRankDelta
from ..core.registry import register

DRAW = 32  # bases drawn per generator call; part of the definition of the bases (do not change)
CACHE_LIMIT = 4 * 1024**3  # bytes of cached bases per adapter under cache_bases="auto"
BASES_VERSION = 2  # the current definition of the bases (NolaConfig.bases_version)


@dataclasses.dataclass
class NolaConfig(AdapterConfig):
    """``r``: rank; ``k`` / ``l``: number of bases of A / B (l=None: k); ``alpha``: ΔW scale
    alpha / r with ``init="zero"`` (``"nonzero"`` uses 1 / r, as the ViT code); ``seed``: regenerates
    the bases; ``cache_bases``: "auto" / "always" / "never" (see the module docstring);
    ``bases_version``: the definition of the bases, 2 (current) or 1 (the mis-scaled ``"nonzero"``
    bases of adapters saved before version 2; only for loading those)."""

    r: int = 8
    k: int = 1024
    l: int | None = None  # noqa: E741  (the paper's name; None: the same as k)
    alpha: float = 8.0
    init: str = "zero"
    seed: int = 0
    cache_bases: str = "auto"
    bases_version: int = BASES_VERSION

    def validate(self) -> None:
        self._positive_int("r")
        self._positive_int("k")
        if self.l is not None:
            self._positive_int("l")
        self._non_negative("alpha")
        self._one_of("init", ("zero", "nonzero"))
        self._one_of("cache_bases", ("auto", "always", "never"))
        self._seed("seed")
        v = self.bases_version
        self._require(isinstance(v, int) and not isinstance(v, bool) and v in (1, 2), "bases_version", v,
                      "choose 1 or 2 (2 is current; 1 only reproduces adapters saved before version 2)")

    @property
    def n_b(self) -> int:
        return self.k if self.l is None else self.l

    @classmethod
    def upgrade(cls, saved: dict[str, Any]) -> dict[str, Any]:
        """A config as ``paretune.save`` wrote it, as this version reads it: one saved before
        ``bases_version`` existed gets version 1 with ``init="nonzero"`` (its bases were the old
        ones) and the current version with ``init="zero"`` (whose bases never changed)."""
        out = dict(saved)
        if "bases_version" not in out:
            out["bases_version"] = 1 if out.get("init", "zero") == "nonzero" else BASES_VERSION
        return out


def layer_seed(seed: int, layer: int, which: str) -> int:
    """A 63-bit seed for one layer's A or B bases, stable across runs, platforms and versions."""
    digest = hashlib.sha256(f"nola:{seed}:{layer}:{which}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def kaiming_bound(fan_in: int) -> float:
    """Half-width of ``nn.init.kaiming_uniform_(a=math.sqrt(5))`` for this fan-in: gain 1/√3,
    bound √3 · gain / √fan_in = 1/√fan_in."""
    return 1.0 / math.sqrt(fan_in)


def basis_bounds(config: NolaConfig, d_in: int, d_out: int) -> tuple[float, float]:
    """Half-widths of the uniform distributions of one layer's A and B bases (before the 1/√k,
    1/√l of ``init="zero"``)."""
    r = config.r
    if config.init == "zero":
        return 1.0, 1.0  # U(−1, 1), as gpt/src/model_nola.py (both versions)
    if config.bases_version == 1:  # each basis "kaiming" over its own (r, d_in) / (d_out, r) matrix
        return kaiming_bound(d_in), kaiming_bound(r)
    # vit/NOLA.py: kaiming over the stacked (k, d_in, r) and (l, r, d_out): fan-in r·d_in, r·d_out
    return kaiming_bound(r * d_in), kaiming_bound(r * d_out)


def draw_bases(seed: int, start: int, count: int, shape: tuple[int, int], bound: float) -> torch.Tensor:
    """Bases ``start .. start+count-1`` (count <= DRAW, one draw) of a seeded family, on the CPU,
    float32, each entry U(−bound, bound)."""
    gen = torch.Generator().manual_seed(seed + start // DRAW)
    out = torch.empty(DRAW, *shape)
    out.uniform_(-bound, bound, generator=gen)
    first = start % DRAW
    return out[first:first + count]


def all_bases(seed: int, n: int, shape: tuple[int, int], bound: float) -> torch.Tensor:
    """Bases 0 .. n-1 of a seeded family, stacked (n, *shape)."""
    return torch.cat([draw_bases(seed, start, count, shape, bound) for start, count in _each_draw(n)])


def combine(coeffs: torch.Tensor, seed: int, shape: tuple[int, int], bound: float, scale: float) -> torch.Tensor:
    """Σᵢ cᵢ Gᵢ for the seeded bases Gᵢ (times ``scale``), without holding all bases at once."""
    return _Combine.apply(coeffs, seed, shape, bound, scale)


def _each_draw(n: int):
    for start in range(0, n, DRAW):
        yield start, min(DRAW, n - start)


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, coeffs, seed, shape, bound, scale):
        ctx.seed, ctx.shape, ctx.bound, ctx.scale = seed, shape, bound, scale
        ctx.save_for_backward(coeffs)
        out = torch.zeros(shape, dtype=coeffs.dtype, device=coeffs.device)
        for start, count in _each_draw(coeffs.shape[0]):
            g = draw_bases(seed, start, count, shape, bound).to(coeffs.device, coeffs.dtype)
            out += torch.einsum("k,kij->ij", coeffs[start:start + count], g)
        return out * scale

    @staticmethod
    def backward(ctx, grad):
        (coeffs,) = ctx.saved_tensors
        grad_c = torch.empty_like(coeffs)
        grad = grad * ctx.scale
        for start, count in _each_draw(coeffs.shape[0]):
            g = draw_bases(ctx.seed, start, count, ctx.shape, ctx.bound).to(coeffs.device, coeffs.dtype)
            grad_c[start:start + count] = torch.einsum("ij,kij->k", grad.to(coeffs.dtype), g)
        return grad_c, None, None, None, None


@register(
    "nola",
    config=NolaConfig,
    summary="NOLA (Koohpayegani et al. 2024): LoRA factors as mixes of k and l seeded random bases; "
            "only the k + l coefficients train and are saved",
    formula="k + l",
    kinds=("linear", "conv1d"),
)
class NolaDelta(LowRankDelta):
    @classmethod
    def make_bank(cls, geometries: list[Geometry], config: NolaConfig) -> Bank:
        """Decides once for the whole adapter whether its bases are cached (see cache_bases)."""
        size = sum(config.r * (config.k * g.d_in + config.n_b * g.d_out) for g in geometries)
        itemsize = max(adapter_dtype(g.weight).itemsize for g in geometries) if geometries else 4
        cache = config.cache_bases == "always" or (config.cache_bases == "auto" and size * itemsize <= CACHE_LIMIT)
        return Bank(cache=cache)

    def __init__(self, geometry: Geometry, config: NolaConfig, *, bank: nn.Module | None = None, layer: int = 0):
        super().__init__(geometry, config, bank=bank, layer=layer)
        w = geometry.weight
        dtype = adapter_dtype(w)
        c = config
        self.zero_init = c.init == "zero"
        self.scaling = c.alpha / c.r if self.zero_init else 1.0 / c.r
        self.drop = None  # the reference code has no dropout on the NOLA branch
        self.seed_a = layer_seed(c.seed, self.layer, "A")
        self.seed_b = layer_seed(c.seed, self.layer, "B")
        self._bounds = basis_bounds(c, self.d_in, self.d_out)
        # U(−1,1)/√k as in the reference LLM code; the ViT code's kaiming bases are used as drawn
        self._scales = (1 / math.sqrt(c.k), 1 / math.sqrt(c.n_b)) if self.zero_init else (1.0, 1.0)
        if self.zero_init:
            self.alpha_c = nn.Parameter(torch.zeros(c.k, dtype=dtype, device=w.device))
            self.beta_c = nn.Parameter(torch.zeros(c.n_b, dtype=dtype, device=w.device))
            a0 = draw_bases(layer_seed(c.seed, self.layer, "A0"), 0, 1, (c.r, self.d_in), kaiming_bound(self.d_in))[0]
            self.register_buffer("A0", a0.to(w.device, dtype), persistent=False)
        else:
            self.alpha_c = nn.Parameter(torch.full((c.k,), 1.0 / c.k, dtype=dtype, device=w.device))
            self.beta_c = nn.Parameter(torch.full((c.n_b,), 1.0 / c.n_b, dtype=dtype, device=w.device))
            self.A0 = None
        # (coefficient versions, device, dtype) -> (A, B), filled under no_grad only
        self._cache: tuple | None = None
        self.cached_bases = bool(bank is not None and bank.cache)
        if self.cached_bases:
            bases_a = all_bases(self.seed_a, c.k, (c.r, self.d_in), self._bounds[0]) * self._scales[0]
            bases_b = all_bases(self.seed_b, c.n_b, (self.d_out, c.r), self._bounds[1]) * self._scales[1]
            self.register_buffer("bases_a", bases_a.to(w.device, dtype), persistent=False)
            self.register_buffer("bases_b", bases_b.to(w.device, dtype), persistent=False)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, d_in), B (d_out, r)) from the coefficients; cached while gradients are off."""
        key = (self.alpha_c._version, self.beta_c._version, self.alpha_c.device, self.alpha_c.dtype)
        if not torch.is_grad_enabled() and self._cache is not None and self._cache[0] == key:
            return self._cache[1], self._cache[2]
        r = self.config.r
        if self.cached_bases:
            a = torch.einsum("k,kij->ij", self.alpha_c, self.bases_a)
            b = torch.einsum("k,kij->ij", self.beta_c, self.bases_b)
        else:
            a = combine(self.alpha_c, self.seed_a, (r, self.d_in), self._bounds[0], self._scales[0])
            b = combine(self.beta_c, self.seed_b, (self.d_out, r), self._bounds[1], self._scales[1])
        if self.A0 is not None:
            a = a + self.A0
        self._cache = None if torch.is_grad_enabled() else (key, a, b)
        return a, b

    def _apply(self, fn, recurse=True):
        self._cache = None  # a dtype or device move invalidates the cached factors
        return super()._apply(fn, recurse)

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: NolaConfig) -> int:
        return config.k + config.n_b
