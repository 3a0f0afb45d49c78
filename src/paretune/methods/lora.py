"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") and rsLoRA
(Kalajdzievski, 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA").

ΔW = s · B A with A ∈ R^{r×d_in}, B ∈ R^{d_out×r}; s = alpha / r, or alpha / sqrt(r) with
``rslora=True``. The paper initialises A at random and B at zero, so the adapted model starts
equal to the base. ``init`` picks A's distribution:

* ``"kaiming"`` (default): A ~ kaiming-uniform(a=sqrt(5)), as ``nn.Linear`` and the reference
  loralib code do; B = 0.
* ``"gaussian"``: A ~ N(0, 1/r²) (std 1/r), B = 0, as PEFT's "gaussian".
* ``"random"``: A kaiming as above and B ~ N(0, 1/r²): no zero start. Not from the paper: useful
  to test that merge/save paths move real numbers.

For embeddings the reference code swaps the roles (A = 0, B ~ N(0, 1)); paretune does the same.
Dropout (on the input of the adapter branch only, as in the paper's code) is skipped at p=0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.dtypes import adapter_dtype
from ..core.geometry import Geometry
from ..core.lowrank import LowRankDelta
from ..core.registry import register


@dataclasses.dataclass
class LowRankConfig(AdapterConfig):
    """Options shared by LoRA-shaped methods: rank, alpha, dropout, rsLoRA scaling."""

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False

    def validate(self) -> None:
        self._positive_int("r")
        self._non_negative("alpha")
        self._probability("dropout")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


@dataclasses.dataclass
class LoraConfig(LowRankConfig):
    INIT_ONLY: ClassVar[tuple[str, ...]] = ("init",)  # options hot_swap may see differ
    init: str = "kaiming"

    def validate(self) -> None:
        super().validate()
        self._one_of("init", ("kaiming", "gaussian", "random"))


@register(
    "lora",
    config=LoraConfig,
    summary="LoRA (Hu et al. 2021): ΔW = s·B·A, rank r; s = alpha/r (or alpha/sqrt(r) with rslora)",
    formula="r·(d_in + d_out)",
)
class LoraDelta(LowRankDelta):
    def __init__(self, geometry: Geometry, config: LoraConfig, **context):
        super().__init__(geometry, config, **context)
        w = geometry.weight
        dtype = adapter_dtype(w)
        self.scaling = config.scaling
        self.A = nn.Parameter(torch.empty(config.r, self.d_in, dtype=dtype, device=w.device))
        self.B = nn.Parameter(torch.empty(self.d_out, config.r, dtype=dtype, device=w.device))
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 and self.kind != "embedding" else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init, r = self.config.init, self.config.r
        if self.kind == "embedding":
            nn.init.zeros_(self.A)
            nn.init.normal_(self.B)
            if init == "random":
                nn.init.normal_(self.A, std=1 / r)
            return
        if init == "gaussian":
            nn.init.normal_(self.A, std=1 / r)
        else:
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        if init == "random":
            nn.init.normal_(self.B, std=1 / r)
        else:
            nn.init.zeros_(self.B)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.A, self.B

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: LoraConfig) -> int:
        return config.r * (d_in + d_out)
