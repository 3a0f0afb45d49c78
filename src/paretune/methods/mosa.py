"""MoSA (Zhang et al. 2023/2024, "MoSA: Mixture of Sparse Adapters for Visual Efficient Tuning",
arXiv 2312.02923).

A standard bottleneck adapter A(h) = W_up f(W_down h + b_down) + b_up (the ``bottleneck`` method's
adapter, with its styles, placements, initialisation and targets: W_up = 0 so the adapted model
starts equal to the base) whose up projection is split into N = ``n_experts`` non-overlapping sparse
adapters: a fixed random partition of W_up's entries into N equal parts M_1 … M_N (Σ_i M_i = 1,
M_i ⊙ M_j = 0). While training, each step activates one of them: the adapter runs with W_up ⊙ M_e,
so only that part of W_up (with W_down and both biases) is used and updated. After training, and in
every evaluation-mode pass, the parts merge back into the complete adapter
Σ_i W_up ⊙ M_i = W_up: the same cost and size as the plain bottleneck adapter.

Pinned to the authors' released code (``Theia-4869/MoSA``): ``src/utils/pruner.py``
(``Pruner.divide(mode="all")``: random scores split at their 1/N quantiles into N disjoint masks),
``src/models/vit_adapter/vit_mosa.py`` (one expert drawn uniformly at random per training forward
of each block; ``merge(mode="add")`` sums the experts) and the training scripts
(``scripts/mosa/...``: ``EXPERT_NUM=4``, ``SHARE="down"``: the down projection is shared by all
experts and only the up projection is split).

Choices, stated:

* ``partition="entries"`` (default) is the released code's element-wise split;
  ``partition="units"`` splits the bottleneck's hidden units instead (W_up's columns, so sub-adapter
  i is the rows S_i of W_down and the columns S_i of W_up: N narrower adapters that add up to the
  full one).
* The partition is drawn from a generator seeded by ``seed`` and the layer's index, so it is never
  saved (a load regenerates it).
* Which sub-adapter is active is drawn per optimizer step, not per forward pass (the released code
  draws with Python's global ``random`` in each forward): the index is a function of (``seed``,
  layer, step), kept up to date by :meth:`on_step`, so runs are reproducible and a resumed run
  draws exactly what the uninterrupted one would. Each adapted layer draws independently, as each
  block does in the released code. Outside the trainer (no ``on_step``) every training pass uses
  the draw of step 0.
* The up projection's bias is one dense vector trained at every step (the released code keeps a
  full bias per expert, trained only when that expert is active, and sums them on merge).
* The released recipe's extra consistency term (a symmetric KL divergence between two stochastic
  forward passes, ``ADDITIONAL``/``REG_WEIGHT`` in its trainer) needs two passes of the whole model
  and is not part of this adapter. The paper's hierarchical sparse strategy is not implemented
  beyond the per-layer draws described here.
* Not mergeable into the base weight (the adapter is non-linear), as ``bottleneck``.

Trainable per adapted module: as ``bottleneck`` (2·d·m + m + d for a series adapter).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..core.geometry import Geometry
from ..core.registry import register
from ..errors import ConfigError
from .bottleneck import BottleneckConfig, BottleneckDelta, placements_of, resolve_targets

PARTITIONS = ("entries", "units")


@dataclasses.dataclass
class MosaConfig(BottleneckConfig):
    """The ``bottleneck`` options, plus ``n_experts``: N sparse adapters the up projection is split
    into; ``partition``: "entries" | "units"; ``seed``: the partition's and the draws' seed."""

    n_experts: int = 4
    partition: str = "entries"
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        self._positive_int("n_experts")
        self._one_of("partition", PARTITIONS)
        self._seed("seed")


def default_targets(model: nn.Module, config: MosaConfig | None = None) -> str:
    """The hosts of ``config``'s placement and style, as the ``bottleneck`` method's."""
    config = config if config is not None else MosaConfig()
    return resolve_targets(model, placements_of(config.placement), config.series, "mosa")


def _partition(shape: tuple[int, int], n: int, by_units: bool, generator: torch.Generator) -> torch.Tensor:
    """An int64 tensor of ``shape`` giving each entry of W_up its sparse adapter in 0..n-1: a random
    equal split of the entries (or of the columns, broadcast down each column)."""
    count = shape[1] if by_units else shape[0] * shape[1]
    order = torch.randperm(count, generator=generator)
    owner = torch.empty(count, dtype=torch.long)
    owner[order] = torch.arange(count) * n // count  # equal parts, sizes differing by at most one
    return owner.expand(shape[0], -1).clone() if by_units else owner.view(shape)


@register(
    "mosa",
    config=MosaConfig,
    summary="MoSA (Zhang et al. 2023): a bottleneck adapter whose up projection is split into N sparse "
            "adapters, one trained per step, merged back into the full adapter after training",
    formula="2·d·m + m + d, as bottleneck (m = d // reduction_factor, or bottleneck)",
    kinds=("linear", "conv1d", "block"),
    default_targets=default_targets,
)
class MosaDelta(BottleneckDelta):
    """The bottleneck adapter, with W_up ⊙ M_e in training-mode passes (e: the step's draw)."""

    def __init__(self, geometry: Geometry, config: MosaConfig, *, bank: nn.Module | None = None, layer: int = 0):
        super().__init__(geometry, config, bank=bank, layer=layer)
        n = config.n_experts
        parts = self.m if config.partition == "units" else self.m * self.d_out
        if n > parts:
            what = "bottleneck units" if config.partition == "units" else "entries of the up projection"
            raise ConfigError(
                f"mosa: n_experts={n} exceeds the {parts} {what} of {geometry.name or 'an adapted layer'}, "
                f"leaving empty sparse adapters; choose n_experts <= {parts} or a wider bottleneck."
            )
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + layer)
        owner = _partition((self.d_out, self.m), n, config.partition == "units", gen)
        self.register_buffer("owner", owner.to(self.up.device), persistent=False)  # regenerated, not saved
        self.step = 0

    def expert(self) -> int:
        """The sparse adapter active in this step's training passes."""
        gen = torch.Generator().manual_seed((self.config.seed * 1_000_003 + self.layer) * 1_000_033 + self.step)
        return int(torch.randint(self.config.n_experts, (1,), generator=gen))

    def mask(self, expert: int | None = None) -> torch.Tensor:
        """M_e: 1 on the entries of W_up that sparse adapter ``expert`` (default: this step's) owns."""
        e = self.expert() if expert is None else expert
        return (self.owner == e).to(self.up.dtype)

    def project(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        if which == "up" and self.training:
            return self.up * self.mask(), self.up_bias
        return super().project(which)

    def on_step(self, step: int, total: int) -> None:
        self.step = step  # the draw is a function of the step: calling it twice changes nothing

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.config.n_experts} sparse adapters ({self.config.partition})"
