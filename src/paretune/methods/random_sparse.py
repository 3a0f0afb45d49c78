"""Random sparse fine-tuning: trainable deltas at positions of W drawn uniformly at random, the
random-budget baseline of sparse PET (as the "arbitrary PET" view of APET: any set of entries of W
may be the trainable ones; here the set is drawn at random instead of being chosen).

ΔW is zero except at ``n`` entries of each adapted (d_out, d_in) matrix, drawn uniformly at random
without replacement; their values train, start at zero and are added to W unscaled. Stored: the
values and their int32 flat positions (:class:`paretune.core.sparse.SparseDelta`).

Options (exactly one of ``count`` and ``fraction`` decides the size; setting both is an error):

* ``count``: entries per layer (1 <= count <= d_out · d_in, checked per layer);
* ``fraction``: the share of each layer's entries, in (0, 1]; n = max(1, ⌊fraction · d_out · d_in
  + 1/2⌋) (rounded half up, at least one entry);
* neither: ``fraction`` = 0.01 (1 % of each layer; a choice of paretune's, not from a paper);
* ``seed``: the draw of layer ``l`` (its index among the adapter's targets) uses a private
  ``torch.Generator`` (CPU) seeded with ``seed · 1_000_003 + l``, so the positions depend on the
  seed, the layer index and the layer's shape only (not on the global RNG or the device). The
  positions are saved all the same, and a load takes them from the file.

The draw: for n at most half the layer, the first n distinct values of a stream of uniform
integers in [0, d_out · d_in) (a uniformly random n-subset, without materialising a permutation of
the whole layer); for larger n, the first n entries of ``torch.randperm``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..core.config import AdapterConfig
from ..core.geometry import Geometry
from ..core.registry import register
from ..core.sparse import SparseDelta
from ..errors import ConfigError

DEFAULT_FRACTION = 0.01
_SEED_STRIDE = 1_000_003  # layer seeds seed·stride + layer are distinct for fewer layers than this


@dataclasses.dataclass
class RandomSparseConfig(AdapterConfig):
    """``count`` (entries per layer) or ``fraction`` (share of each layer's entries), not both;
    neither means fraction = 0.01. ``seed`` draws the positions."""

    INIT_ONLY: ClassVar[tuple[str, ...]] = ("seed",)  # a hot swap takes the positions from the file
    count: int | None = None
    fraction: float | None = None
    seed: int = 0

    def validate(self) -> None:
        self._count_or_fraction()
        self._seed("seed")

    def entries(self, d_out: int, d_in: int) -> int:
        """Trainable entries of a (d_out, d_in) layer (count, or the rounded fraction)."""
        if self.count is not None:
            return self.count
        fraction = DEFAULT_FRACTION if self.fraction is None else self.fraction
        return max(1, int(fraction * d_out * d_in + 0.5))


def layer_generator(seed: int, layer: int) -> torch.Generator:
    """The private CPU generator of layer ``layer``'s draw."""
    return torch.Generator().manual_seed(seed * _SEED_STRIDE + layer)


def sample_positions(size: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """n distinct integers of [0, size), a uniformly random subset (int64, in draw order)."""
    if 2 * n > size:
        return torch.randperm(size, generator=generator)[:n]
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < n:
        need = n - chosen.numel()
        draws = torch.randint(0, size, (max(2 * need, 64),), generator=generator)
        values, inverse = torch.unique(draws, return_inverse=True)
        order = torch.arange(draws.numel())
        first = torch.full((values.numel(),), draws.numel()).scatter_reduce(0, inverse, order, "amin")
        fresh = draws[torch.sort(first).values]  # each value once, at its first draw, in draw order
        fresh = fresh[~torch.isin(fresh, chosen)]
        chosen = torch.cat([chosen, fresh[:need]])
    return chosen


@register(
    "random-sparse",
    config=RandomSparseConfig,
    summary="Random sparse: trainable deltas at uniformly random entries of W (count or fraction per layer, seeded)",
    formula="count, or max(1, round(fraction·d_out·d_in)) (fraction 0.01 by default)",
)
class RandomSparseDelta(SparseDelta):
    def __init__(self, geometry: Geometry, config: RandomSparseConfig, *, bank=None, layer: int = 0):
        super().__init__(geometry, config, bank=bank, layer=layer)
        size = self.d_out * self.d_in
        n = config.entries(self.d_out, self.d_in)
        if n > size:
            raise ConfigError(
                f"random-sparse: count={n} exceeds the {size} entries of a ({self.d_out} x {self.d_in}) "
                f"{self.kind} layer; use count <= {size}, or fraction."
            )
        self.set_support(sample_positions(size, n, layer_generator(config.seed, layer)))

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: RandomSparseConfig) -> int:
        return config.entries(d_out, d_in)
