"""NOLA (Koohpayegani et al., ICLR 2024, "NOLA: Compressing LoRA using Linear Combination of
Random Basis"; reference code UCDvision/NOLA).

LoRA's factors are linear combinations of frozen random bases; only the mixing coefficients
train and are saved (with the seed that regenerates the bases). Two inits, both from the
reference code:

* ``init="zero"`` (the LLM code, ``gpt/src/model_nola.py``; default):
  A = A₀ + Σᵢ₌₁..k αᵢ Aᵢ,  B = B₀ + Σⱼ₌₁..l βⱼ Bⱼ,  ΔW = (alpha / r) · B A,
  with Aᵢ ∈ R^{r×d_in}, Bⱼ ∈ R^{d_out×r} ~ U(−1, 1)/√k (resp. /√l), A₀ kaiming-uniform and
  frozen, B₀ = 0, and α = β = 0: ΔW = 0 at the start, as LoRA.
* ``init="nonzero"`` (the ViT code, ``vit/NOLA.py``): A = Σ αᵢ Aᵢ, B = Σ βⱼ Bⱼ (no A₀, B₀),
  coefficients start at 1/k and 1/l, bases kaiming-uniform, ΔW = (1 / r) · B A ≠ 0 at init.

Trainable per layer: k + l. Choices made here (stated, as the reference code leaves them to the
framework): every layer has its own bases, regenerated from a per-layer seed derived from
``seed`` and the layer's index among the adapter's targets; the bases are always drawn on the
CPU (so an adapter trained on a GPU loads on a CPU with the same bases) in fixed draws of
``DRAW`` bases, and are regenerated in the forward *and* the backward pass (as the reference
code's custom autograd does) so that memory holds at most one draw of bases, never all k.
Under ``torch.no_grad`` (evaluation) A and B are cached until the coefficients change.

Regenerating costs time (about k·r·(d_in + d_out) random numbers per layer, twice a step), so
``cache_bases="auto"`` (default) keeps the drawn bases in memory when all of the adapter's bases
together take at most ``CACHE_LIMIT`` bytes, and regenerates them otherwise; "always" and
"never" force either. Cached or not, the bases and the results are the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.geometry import Geometry
from ..core.registry import register
from .lora import adapter_dtype

DRAW = 32  # bases drawn per generator call; part of the definition of the bases (do not change)
CACHE_LIMIT = 4 * 1024**3  # bytes of cached bases per adapter under cache_bases="auto"


@dataclasses.dataclass
class NolaConfig(AdapterConfig):
    r: int = 8
    k: int = 1024
    l: int | None = None  # noqa: E741  (the paper's name; None: the same as k)
    alpha: float = 8.0
    init: str = "zero"
    seed: int = 0
    cache_bases: str = "auto"

    def validate(self) -> None:
        self._positive_int("r")
        self._positive_int("k")
        if self.l is not None:
            self._positive_int("l")
        self._non_negative("alpha")
        self._one_of("init", ("zero", "nonzero"))
        self._one_of("cache_bases", ("auto", "always", "never"))
        self._require(isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0,
                      "seed", self.seed, "it must be an integer >= 0")

    @property
    def n_b(self) -> int:
        return self.k if self.l is None else self.l


def layer_seed(seed: int, layer: int, which: str) -> int:
    """A 63-bit seed for one layer's A or B bases, stable across runs, platforms and versions."""
    digest = hashlib.sha256(f"nola:{seed}:{layer}:{which}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def draw_bases(seed: int, start: int, count: int, shape: tuple[int, int], kind: str) -> torch.Tensor:
    """Bases ``start .. start+count-1`` (count <= DRAW, one draw) of a seeded family, on the CPU,
    float32: U(−1, 1)/√n for ``kind="uniform"`` (scaled by the caller) or kaiming-uniform."""
    gen = torch.Generator().manual_seed(seed + start // DRAW)
    out = torch.empty(DRAW, *shape)
    if kind == "kaiming":  # as nn.init.kaiming_uniform_(a=sqrt(5)): bound = 1/sqrt(fan_in)
        bound = 1.0 / math.sqrt(shape[1])
        out.uniform_(-bound, bound, generator=gen)
    else:
        out.uniform_(-1.0, 1.0, generator=gen)
    first = start % DRAW
    return out[first:first + count]


def all_bases(seed: int, n: int, shape: tuple[int, int], kind: str) -> torch.Tensor:
    """Bases 0 .. n-1 of a seeded family, stacked (n, *shape)."""
    return torch.cat([draw_bases(seed, start, count, shape, kind) for start, count in _each_draw(n)])


def combine(coeffs: torch.Tensor, seed: int, shape: tuple[int, int], kind: str, scale: float) -> torch.Tensor:
    """Σᵢ cᵢ Gᵢ for the seeded bases Gᵢ (times ``scale``), without holding all bases at once."""
    return _Combine.apply(coeffs, seed, shape, kind, scale)


def _each_draw(n: int):
    for start in range(0, n, DRAW):
        yield start, min(DRAW, n - start)


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, coeffs, seed, shape, kind, scale):
        ctx.seed, ctx.shape, ctx.kind, ctx.scale = seed, shape, kind, scale
        ctx.save_for_backward(coeffs)
        out = torch.zeros(shape, dtype=coeffs.dtype, device=coeffs.device)
        for start, count in _each_draw(coeffs.shape[0]):
            g = draw_bases(seed, start, count, shape, kind).to(coeffs.device, coeffs.dtype)
            out += torch.einsum("k,kij->ij", coeffs[start:start + count], g)
        return out * scale

    @staticmethod
    def backward(ctx, grad):
        (coeffs,) = ctx.saved_tensors
        grad_c = torch.empty_like(coeffs)
        grad = grad * ctx.scale
        for start, count in _each_draw(coeffs.shape[0]):
            g = draw_bases(ctx.seed, start, count, ctx.shape, ctx.kind).to(coeffs.device, coeffs.dtype)
            grad_c[start:start + count] = torch.einsum("ij,kij->k", grad.to(coeffs.dtype), g)
        return grad_c, None, None, None, None


class _CachePolicy(nn.Module):
    """The adapter-wide decision whether bases are kept in memory (a bank without tensors)."""

    def __init__(self, cache: bool):
        super().__init__()
        self.cache = cache


@register(
    "nola",
    config=NolaConfig,
    summary="NOLA (Koohpayegani et al. 2024): LoRA factors as mixes of k and l seeded random bases; "
            "only the k + l coefficients train and are saved",
    formula="k + l",
    kinds=("linear", "conv1d"),
    budget_option="k",
    budget_max=8192,
)
class NolaDelta(Delta):
    @classmethod
    def make_bank(cls, geometries: list[Geometry], config: NolaConfig) -> nn.Module:
        """Decides once for the whole adapter whether its bases are cached (see cache_bases)."""
        size = sum(config.r * (config.k * g.d_in + config.n_b * g.d_out) for g in geometries)
        itemsize = max(adapter_dtype(g.weight).itemsize for g in geometries) if geometries else 4
        cache = config.cache_bases == "always" or (config.cache_bases == "auto" and size * itemsize <= CACHE_LIMIT)
        return _CachePolicy(cache)

    def __init__(self, geometry: Geometry, config: NolaConfig, **context):
        super().__init__(geometry, config, **context)
        w = geometry.weight
        dtype = adapter_dtype(w)
        c = config
        self.zero_init = c.init == "zero"
        self.scaling = c.alpha / c.r if self.zero_init else 1.0 / c.r
        self.seed_a = layer_seed(c.seed, self.layer, "A")
        self.seed_b = layer_seed(c.seed, self.layer, "B")
        self._kind = kind = "uniform" if self.zero_init else "kaiming"
        # U(−1,1)/√k as in the reference LLM code; the ViT code's kaiming bases are used as drawn
        self._scales = (1 / math.sqrt(c.k), 1 / math.sqrt(c.n_b)) if self.zero_init else (1.0, 1.0)
        if self.zero_init:
            self.alpha_c = nn.Parameter(torch.zeros(c.k, dtype=dtype, device=w.device))
            self.beta_c = nn.Parameter(torch.zeros(c.n_b, dtype=dtype, device=w.device))
            a0 = draw_bases(layer_seed(c.seed, self.layer, "A0"), 0, 1, (c.r, self.d_in), "kaiming")[0]
            self.register_buffer("A0", a0.to(w.device, dtype), persistent=False)
        else:
            self.alpha_c = nn.Parameter(torch.full((c.k,), 1.0 / c.k, dtype=dtype, device=w.device))
            self.beta_c = nn.Parameter(torch.full((c.n_b,), 1.0 / c.n_b, dtype=dtype, device=w.device))
            self.A0 = None
        self._cache: tuple | None = None
        self.cached_bases = bool(getattr(context.get("bank"), "cache", False))
        if self.cached_bases:
            self.register_buffer("bases_a", (all_bases(self.seed_a, c.k, (c.r, self.d_in), kind) * self._scales[0])
                                 .to(w.device, dtype), persistent=False)
            self.register_buffer("bases_b", (all_bases(self.seed_b, c.n_b, (self.d_out, c.r), kind) * self._scales[1])
                                 .to(w.device, dtype), persistent=False)

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
            a = combine(self.alpha_c, self.seed_a, (r, self.d_in), self._kind, self._scales[0])
            b = combine(self.beta_c, self.seed_b, (self.d_out, r), self._kind, self._scales[1])
        if self.A0 is not None:
            a = a + self.A0
        if not torch.is_grad_enabled():
            self._cache = (key, a, b)
        else:
            self._cache = None
        return a, b

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        g = self.geometry
        h = g.project_in(x.to(a.dtype), a)
        return base_out + g.project_out(h, b * self.scaling).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return self.scaling * (b @ a)

    def as_lora(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        with torch.no_grad():
            a, b = self.factors()
        return a.detach(), b.detach(), self.scaling

    def _apply(self, fn, recurse=True):
        self._cache = None  # a dtype or device move invalidates the cached factors
        return super()._apply(fn, recurse)

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: NolaConfig) -> int:
        return config.k + config.n_b
