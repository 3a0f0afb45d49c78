"""Kronecker-product adapter: DiffuseKronA (Marjit et al. 2024, "DiffuseKronA: A Parameter
Efficient Fine-tuning Method for Personalized Diffusion Models") and LoKr (LyCORIS; Yeh et al.
2024, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation").

ΔW = s · (A ⊗ B), A ∈ R^{a1×a2}, B ∈ R^{b1×b2}, a1·b1 = d_out, a2·b2 = d_in.

Taken from DiffuseKronA: the update itself, A ⊗ B with *both factors full* (its point: rank(A ⊗ B)
= rank(A)·rank(B), a high-rank update from a1·a2 + b1·b2 numbers), and choosing the factor shapes
as the size knob, explicitly if wished (``a_shape`` / ``b_shape``; give one, the other follows).
This is the default (``r=None``).

Taken from LoKr, as PEFT's ``peft.tuners.lokr`` implements it (numerics equal to PEFT, tested):

* the automatic split of each dimension, ``factorization(dim, factor)`` (``factor=-1``: the
  divisor pair nearest sqrt(dim); A gets the smaller number of each pair, B the larger);
* ``r``: B = B_up·B_down (PEFT's w2_a @ w2_b), rank r, *only when it saves parameters*, i.e. when
  r < max(b1, b2)/2, else B stays full; with ``decompose_both`` A = A_up·A_down likewise (when
  r < max(a1, a2)/2);
* the scale s = alpha / r whenever r is given (PEFT: also when both factors end up full; LyCORIS
  itself would force s = 1 then).

Inits (all give ΔW = 0 at start, one factor being zero):

* ``"peft"`` (the default, so *the default init is LoKr's*, not DiffuseKronA's): PEFT's LoKr
  ``reset_adapter_parameters``: A (or A_up) = 0, B's factors kaiming-uniform(a=sqrt(5));
* ``"lycoris"``: LoKr as LyCORIS initialises it (PEFT's ``init_weights="lycoris"``): A's factors
  kaiming-uniform(a=sqrt(5)), B (or B_down) = 0;
* ``"diffusekrona"``: DiffuseKronA's own init and default shape, taken from its reference code
  (IBM/DiffuseKronA, ``diffusekrona/krona.py``, commit 6c24fc5): ``KronALinearLayer(...,
  rank=(64, 4))`` with (a1, a2) = rank (krona.py:12, 15-16), A ~ N(0, (1/a1)²), i.e. std 1/a1 =
  1/rank[0] (krona.py:36, ``nn.init.normal_(self.down.weight, std=1 / rank[0])``; ``down`` is A,
  stored transposed), and B = 0 (krona.py:37, ``nn.init.zeros_(self.up.weight)``). Unless
  ``a_shape`` / ``b_shape`` or a ``factor`` is given, A's shape is that default (64, 4), so rows
  must divide d_out and cols d_in (a layer it does not fit is a ConfigError naming a_shape and
  factor). (Its training script's own defaults are (a1, a2) = (32, 16), its example scripts use
  (64, 8); we take the layer's default.) Both factors full: ``r`` is refused with this init. The
  reference scales by ``network_alpha / rank`` only if network_alpha is given (never, in its
  training script), so s = 1 there, which is our ``alpha=None`` default.

One layout difference from that reference, kept on purpose: its forward (krona.py:45-48) writes
the output as a (b1, a1) array, i.e. it computes the rows of A ⊗ B in a perfect-shuffle order
(a fixed permutation of the output rows); we keep the paper's (and PEFT's) plain A ⊗ B. Same
parameters, same counts, same init statistics.

Our choices: without r, s = alpha; ``alpha=None`` (default) means s = 1 in both cases (LyCORIS's
default; PEFT's default alpha=8 gives s = 8/r). PEFT's rank/module dropout and Conv2d/Tucker forms
are not implemented (hosts: Linear and GPT-2 Conv1D).

Forward never builds ΔW: with x reshaped (row-major) to X ∈ R^{a2×b2}, (A ⊗ B) x = vec(A X Bᵀ),
two small matmuls, O(a2·b2·b1 + a1·a2·b1) (or, when cheaper, (A X) Bᵀ: O(a1·a2·b2 + a1·b2·b1)) per
row instead of O(d_out·d_in); a low-rank factor is applied as its two thin matrices.
``delta_weight`` (merge) builds s·kron(A, B).

Size: as in DiffuseKronA the shapes set it (the bench scans ``factor``):
A ≈ factor×factor, B the rest, count ≈ factor² + d_out·d_in/factor², from full fine-tuning at
factor=1 down to its minimum near factor = sqrt(d); factors past sqrt of the widest layer (128
covers 16384) only mirror smaller ones. ``r`` is not the knob: with the default split it moves the
count by at most ~2x.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.dtypes import adapter_dtype
from ..core.geometry import Geometry
from ..core.registry import register
from ..errors import ConfigError

Pair = tuple[int, int]

# DiffuseKronA's default (a1, a2): ``KronALinearLayer(..., rank=(64, 4))`` (IBM/DiffuseKronA,
# diffusekrona/krona.py:12); A's shape under init="diffusekrona" unless shapes or a factor are given
DIFFUSEKRONA_A_SHAPE: Pair = (64, 4)
INITS = ("peft", "lycoris", "diffusekrona")


def divisors(n: int) -> list[int]:
    """The divisors of n >= 1, ascending."""
    small = [m for m in range(1, math.isqrt(n) + 1) if n % m == 0]
    return small + [n // m for m in reversed(small) if m * m != n]


def split_dim(dim: int, factor: int = -1) -> Pair:
    """LoKr's split of ``dim`` into (m, n), m·n = dim (same results as LyCORIS' ``factorization``).

    ``factor`` dividing ``dim``: (factor, dim // factor), as given. Otherwise walk the divisors m
    upwards, no further than ``factor`` (``-1``: no limit) and stopping at the first m >= dim/m;
    the last one reached, ordered small-first."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor == -1 else factor
    best = 1
    for m in divisors(dim):
        if m > limit:
            break
        best = m
        if m * m >= dim:
            break
    return min(best, dim // best), max(best, dim // best)


@dataclasses.dataclass
class KroneckerConfig(AdapterConfig):
    """``factor``: LoKr's split (-1: near sqrt); ``a_shape`` / ``b_shape``: explicit (a1, a2) /
    (b1, b2) instead; ``r``: None for full factors (DiffuseKronA) or LoKr's low-rank rank;
    ``alpha``: s = alpha/r (alpha with r=None; None: s = 1); ``decompose_both``: A low-rank too;
    ``init``: "peft" (LoKr as PEFT: A = 0, B kaiming; the default), "lycoris" (LoKr as LyCORIS:
    A kaiming, B = 0) or "diffusekrona" (DiffuseKronA's reference: A ~ N(0, (1/a1)²), B = 0, A's
    shape (64, 4) unless a_shape / b_shape / factor is given; full factors, so no r)."""

    factor: int = -1
    a_shape: tuple[int, int] | None = None
    b_shape: tuple[int, int] | None = None
    r: int | None = None
    alpha: float | None = None
    decompose_both: bool = False
    init: str = "peft"

    def validate(self) -> None:
        f = self.factor
        self._require(isinstance(f, int) and not isinstance(f, bool) and (f == -1 or f >= 1), "factor", f,
                      "it must be -1 (split near the square root) or an integer >= 1")
        for name in ("a_shape", "b_shape"):
            v = getattr(self, name)
            if v is None:
                continue
            ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in v)
            self._require(ok, name, v, "give two integers >= 1, (rows, cols) of that factor")
            setattr(self, name, (int(v[0]), int(v[1])))  # JSON gives a list; keep configs comparable
        if (self.a_shape or self.b_shape) and f != -1:
            raise ConfigError(f"{self.method or 'kronecker'}: give either factor={f} or a_shape/b_shape, not both; "
                              "explicit shapes already fix the split.")
        if self.r is not None:
            self._positive_int("r")
        if self.alpha is not None:
            self._non_negative("alpha")
        self._flag("decompose_both")
        if self.decompose_both and self.r is None:
            raise ConfigError(f"{self.method or 'kronecker'}: decompose_both=True needs a rank r (e.g. r=4); "
                              "without r both factors are full.")
        self._one_of("init", INITS)
        if self.init == "diffusekrona" and self.r is not None:
            raise ConfigError(
                f"{self.method or 'kronecker'}: init='diffusekrona' is DiffuseKronA's init of two full factors "
                f"(A ~ N(0, 1/a1²), B = 0); r={self.r} asks for LoKr's low-rank factors. Drop r, or keep r with "
                "init='peft' or init='lycoris'.")

    @property
    def scaling(self) -> float:
        if self.alpha is None:
            return 1.0
        return self.alpha / self.r if self.r is not None else float(self.alpha)


@dataclasses.dataclass(frozen=True)
class KronPlan:
    """One layer's factor shapes and which factors are low-rank (their rank, or None if full)."""

    a: Pair
    b: Pair
    a_rank: int | None
    b_rank: int | None

    def count(self) -> int:
        def size(shape: Pair, rank: int | None) -> int:
            return shape[0] * shape[1] if rank is None else rank * (shape[0] + shape[1])
        return size(self.a, self.a_rank) + size(self.b, self.b_rank)


def _fit(d_out: int, d_in: int, cfg: KroneckerConfig) -> tuple[Pair, Pair]:
    """(A's shape, B's shape) for a (d_out, d_in) layer, from explicit shapes, DiffuseKronA's
    default A shape (init="diffusekrona" with neither shapes nor a factor), or LoKr's split."""
    a_shape, b_shape = cfg.a_shape, cfg.b_shape
    implied = cfg.init == "diffusekrona" and a_shape is None and b_shape is None and cfg.factor == -1
    if implied:
        a_shape = DIFFUSEKRONA_A_SHAPE
    given = a_shape or b_shape
    if given is None:
        o_small, o_large = split_dim(d_out, cfg.factor)
        i_small, i_large = split_dim(d_in, cfg.factor)
        return (o_small, i_small), (o_large, i_large)
    name = "a_shape" if a_shape else "b_shape"
    if d_out % given[0] or d_in % given[1] or (a_shape and b_shape and (
            a_shape[0] * b_shape[0] != d_out or a_shape[1] * b_shape[1] != d_in)):
        shown = f"a_shape={a_shape}, b_shape={b_shape}" if a_shape and b_shape else f"{name}={given}"
        if implied:
            shown = f"init='diffusekrona' uses DiffuseKronA's default {shown}, which"
            advice = ("Give a_shape=(rows, cols) (or b_shape) that fits, or a factor (e.g. factor=2) to let "
                      "LoKr's split size each layer.")
        else:
            advice = "Pick such a shape, or drop a_shape/b_shape and let `factor` split each layer."
        raise ConfigError(
            f"kronecker: {shown} does not fit a layer of shape (d_out={d_out}, d_in={d_in}): a1·b1 must be "
            f"{d_out} and a2·b2 must be {d_in}, so rows must divide {d_out} (one of {divisors(d_out)}) and cols "
            f"{d_in} (one of {divisors(d_in)}). {advice}"
        )
    other = (d_out // given[0], d_in // given[1])
    return (given, other) if a_shape else (other, given)


def kron_plan(d_out: int, d_in: int, cfg: KroneckerConfig) -> KronPlan:
    """Factor shapes and LoKr's low-rank rule (a factor is low-rank only if r < max(its shape)/2)."""
    a, b = _fit(d_out, d_in, cfg)
    r = cfg.r
    a_rank = r if r is not None and cfg.decompose_both and r < max(a) / 2 else None
    b_rank = r if r is not None and r < max(b) / 2 else None
    return KronPlan(a, b, a_rank, b_rank)


@register(
    "kronecker",
    config=KroneckerConfig,
    summary="Kronecker adapter (DiffuseKronA, Marjit et al. 2024; LoKr, Yeh et al. 2024): ΔW = s·(A ⊗ B), "
            "A a1×a2, B b1×b2; with r, B (and A with decompose_both) low-rank as LoKr",
    formula="a1·a2 + b1·b2 (a1·b1 = d_out, a2·b2 = d_in); a low-rank factor costs r·(rows + cols)",
    kinds=("linear", "conv1d"),
)
class KroneckerDelta(Delta):
    def __init__(self, geometry: Geometry, config: KroneckerConfig, **context):
        super().__init__(geometry, config, **context)
        self.plan = kron_plan(self.d_out, self.d_in, config)
        self.scaling = config.scaling
        (a1, a2), (b1, b2) = self.plan.a, self.plan.b
        self.a_first = a1 * b2 * (a2 + b1) < a2 * b1 * (b2 + a1)  # (A X) Bᵀ cheaper than A (X Bᵀ)
        w = geometry.weight
        dtype = adapter_dtype(w)

        def make(name: str, *shape: int) -> None:
            self.register_parameter(name, nn.Parameter(torch.empty(*shape, dtype=dtype, device=w.device)))

        for side, shape, rank in (("A", self.plan.a, self.plan.a_rank), ("B", self.plan.b, self.plan.b_rank)):
            for name in (side, f"{side}_up", f"{side}_down"):  # the unused ones stay None
                self.register_parameter(name, None)
            if rank is None:
                make(side, *shape)
            else:  # PEFT's w*_a (rows x r) and w*_b (r x cols)
                make(f"{side}_up", shape[0], rank)
                make(f"{side}_down", rank, shape[1])
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """LoKr as PEFT ("peft"): A / A_up zero, the rest kaiming; LoKr as LyCORIS ("lycoris"):
        B / B_down zero, the rest kaiming; DiffuseKronA ("diffusekrona", krona.py:36-37): A ~
        N(0, (1/a1)²), B zero (both full: validate refuses r with it)."""
        if self.config.init == "diffusekrona":
            nn.init.normal_(self.A, mean=0.0, std=1.0 / self.plan.a[0])
            nn.init.zeros_(self.B)
            return
        zero_side = "A" if self.config.init == "peft" else "B"
        for side in ("A", "B"):
            full, up, down = getattr(self, side), getattr(self, f"{side}_up"), getattr(self, f"{side}_down")
            for p in (full, up, down):
                if p is not None:
                    nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            if side == zero_side:
                nn.init.zeros_(full if full is not None else (up if side == "A" else down))

    def dense_factor(self, side: str) -> torch.Tensor:
        """The dense factor A or B (a low-rank one multiplied out)."""
        full = getattr(self, side)
        return full if full is not None else getattr(self, f"{side}_up") @ getattr(self, f"{side}_down")

    def _left(self, h: torch.Tensor) -> torch.Tensor:
        """A @ h on the last two dimensions (h: (..., a2, k) -> (..., a1, k)); low-rank A as its two thin matrices."""
        if self.A is not None:
            return torch.matmul(self.A, h)
        return torch.matmul(self.A_up, torch.matmul(self.A_down, h))

    def _right(self, h: torch.Tensor) -> torch.Tensor:
        """h @ Bᵀ on the last dimension (h: (..., k, b2) -> (..., k, b1)); low-rank B likewise."""
        if self.B is not None:
            return F.linear(h, self.B)
        return F.linear(F.linear(h, self.B_down), self.B_up)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        (a1, a2), (b1, b2) = self.plan.a, self.plan.b
        p = self.A if self.A is not None else self.A_up
        lead = x.shape[:-1]
        xs = x.to(p.dtype).reshape(*lead, a2, b2)
        # A X Bᵀ: (..., a1, b1), in whichever order costs fewer multiplications per row
        y = self._right(self._left(xs)) if self.a_first else self._left(self._right(xs))
        return base_out + (self.scaling * y.reshape(*lead, a1 * b1)).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.dense_factor("A"), self.dense_factor("B")
        dtype = adapter_dtype(a)  # float64 adapters keep their precision
        return self.scaling * torch.kron(a.to(dtype), b.to(dtype))

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: KroneckerConfig) -> int:
        return kron_plan(d_out, d_in, config).count()

    def extra_repr(self) -> str:
        p = self.plan
        return (f"{self.method}: d_in={self.d_in}, d_out={self.d_out}, A={p.a} rank={p.a_rank or 'full'}, "
                f"B={p.b} rank={p.b_rank or 'full'}, s={self.scaling:g}")
