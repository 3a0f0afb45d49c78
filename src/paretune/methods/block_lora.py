"""Block-LoRA (Zhou et al., 2025, "One Head Eight Arms: Block Matrix based Low Rank Adaptation
for CLIP-based Few-Shot Learning").

The paper partitions LoRA's factors into blocks and shares every down-projection block. What
paretune takes from it (the paper's abstract and its summary in research/methods.md; no public
reference code was available to pin more): split the input into n equal chunks x₁ … x_n and
LoRA's A (r × d_in) into n column blocks A₁ … A_n; with every Aₖ equal to one shared
A_s (r × ⌈d_in/n⌉),

    A x = Σₖ Aₖ xₖ = A_s (Σₖ xₖ),     ΔW = s · B [A_s, A_s, …, A_s],

so the down projection costs one addition of chunks and one small matmul, and A has n times
fewer numbers. B (d_out × r) is LoRA's. Init and scaling as LoRA: A_s kaiming-uniform, B = 0,
s = alpha / r. Choice made here: when n does not divide d_in, the last chunk is zero-padded
(equivalently, its copy of A_s is cut to the chunk's width).

Trainable per layer: r·⌈d_in/n⌉ + r·d_out.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..core.dtypes import adapter_dtype
from ..core.geometry import Geometry
from ..core.lowrank import LowRankDelta
from ..core.registry import register
from ..errors import ConfigError
from .lora import LowRankConfig


@dataclasses.dataclass
class BlockLoraConfig(LowRankConfig):
    blocks: int = 4

    def validate(self) -> None:
        super().validate()
        self._positive_int("blocks")


@register(
    "block-lora",
    config=BlockLoraConfig,
    summary="Block-LoRA (Zhou et al. 2025): LoRA whose down projection is one block shared by n input chunks",
    formula="r·(⌈d_in/blocks⌉ + d_out)",
    kinds=("linear", "conv1d"),
)
class BlockLoraDelta(LowRankDelta):
    """A low-rank delta whose forward applies the shared block to the summed chunks (cheaper than
    the full A it stands for, which :meth:`factors` gives for merging and export)."""

    def __init__(self, geometry: Geometry, config: BlockLoraConfig, **context):
        super().__init__(geometry, config, **context)
        if config.blocks > self.d_in:
            raise ConfigError(
                f"block-lora: blocks={config.blocks} exceeds d_in={self.d_in} of a {self.kind} layer; "
                "use at most d_in blocks."
            )
        w = geometry.weight
        dtype = adapter_dtype(w)
        self.chunk = math.ceil(self.d_in / config.blocks)
        self.pad = self.chunk * config.blocks - self.d_in
        self.scaling = config.scaling
        self.A = nn.Parameter(torch.empty(config.r, self.chunk, dtype=dtype, device=w.device))
        self.B = nn.Parameter(torch.zeros(self.d_out, config.r, dtype=dtype, device=w.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        x = x.to(self.A.dtype)
        if self.drop is not None:
            x = self.drop(x)
        if self.pad:
            x = F.pad(x, (0, self.pad))
        summed = x.unflatten(-1, (self.config.blocks, self.chunk)).sum(-2)
        return base_out + F.linear(F.linear(summed, self.A), self.B * self.scaling).to(base_out.dtype)

    def full_A(self) -> torch.Tensor:
        """The (r, d_in) down projection the shared block stands for."""
        return self.A.repeat(1, self.config.blocks)[:, : self.d_in]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.full_A(), self.B

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: BlockLoraConfig) -> int:
        return config.r * (math.ceil(d_in / config.blocks) + d_out)
