"""VeRA (Kopiczko, Blankevoort & Asano, ICLR 2024, "VeRA: Vector-based Random Matrix Adaptation").

ΔW = Λ_b B Λ_d A with Λ_b = diag(b), Λ_d = diag(d). A ∈ R^{r×d_in} and B ∈ R^{d_out×r} are frozen
random matrices shared by every adapted layer of the adapter; only the vectors d ∈ R^r (init
``d_initial``) and b ∈ R^{d_out} (init 0, so ΔW = 0 at the start) train. Trainable per layer:
r + d_out.

Choices made here (stated):

* The bases are PEFT's for the same seed (``seed`` = PEFT's ``projection_prng_key``): one CPU
  ``torch.Generator`` seeded with ``seed`` draws A, then B, in float32, each uniform on
  ±√(6 / fan_in) (kaiming-uniform with gain √2; fan_in = the bank's width for A, r for B). The
  bank is sized to the largest d_in and d_out among the targeted layers and each layer uses its
  top-left slice, as PEFT does, so the same seed and targets give PEFT's A and B exactly.
* The bases are never saved (PEFT's ``save_projection=False``): ``load`` regenerates them from
  the seed and the targets' shapes; the adapter file holds only b and d of each layer.
* ``r`` defaults to 256, the paper's and PEFT's default.
* On a half-precision base the bases and vectors stay float32 (PEFT casts the bases to the
  base's dtype); on a float64 base they are float64 (drawn in float32, then cast).
* Dropout (``dropout``) acts on the input of the adapter branch only, as in PEFT.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..core.bank import Bank
from ..core.config import AdapterConfig
from ..core.dtypes import adapter_dtype
from ..core.geometry import Geometry
from ..core.lowrank import LowRankDelta
from ..core.registry import register


@dataclasses.dataclass
class VeraConfig(AdapterConfig):
    r: int = 256
    d_initial: float = 0.1
    dropout: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        self._positive_int("r")
        self._require(isinstance(self.d_initial, (int, float)) and not isinstance(self.d_initial, bool)
                      and math.isfinite(self.d_initial), "d_initial", self.d_initial, "it must be a finite number")
        self._probability("dropout")
        self._seed("seed")


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """float32 uniform on ±√3·√2/√fan_in (fan_in = shape[1]), drawn from ``generator``."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


@register(
    "vera",
    config=VeraConfig,
    summary="VeRA (Kopiczko et al. 2024): ΔW = diag(b)·B·diag(d)·A with frozen random A, B shared by all "
            "layers (regenerated from a seed); only the vectors d and b train",
    formula="r + d_out",
    kinds=("linear", "conv1d"),
)
class VeraDelta(LowRankDelta):
    """VeRA as a low-rank delta: A' = diag(d)·A, B' = diag(b)·B, scaling 1."""

    def __init__(self, geometry: Geometry, config: VeraConfig, *, bank: Bank | None = None, layer: int = 0):
        if bank is None:  # built alone (not through adapt): a bank for this layer only
            bank = self.make_bank([geometry], config)
        super().__init__(geometry, config, bank=bank, layer=layer)
        w = geometry.weight
        dtype = adapter_dtype(w)
        self.lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_initial), dtype=dtype, device=w.device))
        self.lambda_b = nn.Parameter(torch.zeros(self.d_out, dtype=dtype, device=w.device))
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None

    @classmethod
    def make_bank(cls, geometries: list[Geometry], config: VeraConfig) -> Bank:
        d_in = max(g.d_in for g in geometries)
        d_out = max(g.d_out for g in geometries)
        gen = torch.Generator(device="cpu").manual_seed(config.seed)
        a = kaiming_uniform((config.r, d_in), gen)  # drawn first, as PEFT
        b = kaiming_uniform((d_out, config.r), gen)
        w = geometries[0].weight
        dtype = adapter_dtype(w)
        return Bank(A=a.to(w.device, dtype), B=b.to(w.device, dtype))

    def bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices of the shared bank: A (r, d_in), B (d_out, r)."""
        return self.bank.A[:, : self.d_in], self.bank.B[: self.d_out, :]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.bases()
        dtype = self.lambda_d.dtype
        return self.lambda_d[:, None] * a.to(dtype), self.lambda_b[:, None] * b.to(dtype)

    def stored_state(self) -> dict[str, torch.Tensor]:
        return {"lambda_b": self.lambda_b.detach(), "lambda_d": self.lambda_d.detach()}

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: VeraConfig) -> int:
        return config.r + d_out
