"""Subspace training: θ = θ₀ + P·θ_d (Li, Farkhoor, Liu & Yosinski, ICLR 2018, "Measuring the
Intrinsic Dimension of Objective Landscapes") and its structure-aware form SAID, θᵢ = θ₀ᵢ +
λᵢ·(P·θ_d)ᵢ (Aghajanyan, Zettlemoyer & Gupta, ACL 2021, "Intrinsic Dimensionality Explains the
Effectiveness of Language Model Fine-Tuning").

Every adapted module's weight (and bias, with ``bias=True``) moves only inside one random
``dim``-dimensional subspace of all the adapted parameters: one trainable vector θ_d, shared by
every layer, starts at zero (so the adapted model starts equal to the base, as both papers), and
each layer's slice of P·θ_d is its ΔW (and Δb). Only θ_d (and SAID's scalars) train and are saved,
with the seed that regenerates P. The intrinsic dimension d90 of a task is the smallest ``dim`` that
reaches 90% of full training's metric: :func:`paretune.measure.intrinsic_dimension`.

Choices, stated:

* P is one block per adapted module, drawn from a per-layer seed derived (SHA-256) from ``seed``
  and the layer's index, with unit-norm columns per block (the public PyTorch ports of the papers'
  code used by SAID normalise per parameter tensor, as here; Li et al. describe the whole of P's
  columns as unit length: per-block normalisation makes each block's scale independent of how many
  modules are adapted). ``projection="fastfood"`` (default; Li et al.'s choice for large D, SAID's
  only one) or ``"dense"`` (N(0, 1) entries, Li et al.'s choice for small networks); see
  :mod:`paretune.methods.subspace_projection`. A dense P is cached in memory when all the adapter's
  blocks together take at most ``CACHE_LIMIT`` bytes (``cache="auto"``), otherwise regenerated in the
  forward and backward pass; "always" / "never" force either; the numbers are the same.
* ``said=True``: one scalar λ per adapted module (weight and bias share it), initialised to one as
  the reference's ``intrinsic_parameter_said = torch.ones(...)``, and, as there, the m scalars are
  part of ``dim``: the projection has dim − m coordinates (so dim must exceed m).
* ``dim`` may not exceed the number of adapted parameters D (the subspace would not be one):
  a :class:`ConfigError` before anything changes on the model. Which parameters: the adapted
  modules' weights, plus their biases with ``bias=True`` (the papers project every parameter; pick
  the modules with ``targets``: LayerNorms are not adaptable modules here and stay at θ₀).
* Trainable: ``dim`` numbers for the whole adapter (:meth:`SubspaceDelta.shared_formula`), not per
  layer. Stored: θ_d (with the first module) and each module's λ; P is regenerated from the seed.
* Under ``torch.no_grad`` (evaluation) each layer's ΔW is cached until θ_d or λ changes.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..core.bank import Bank
from ..core.config import AdapterConfig
from ..core.delta import SharedInBank, add_dense
from ..core.dtypes import adapter_dtype
from ..core.geometry import Geometry
from ..core.registry import register
from ..errors import ConfigError
from .subspace_projection import DenseProjection, FastfoodProjection, projection_seed

CACHE_LIMIT = 1024**3  # bytes of cached dense projection per adapter under cache="auto"


@dataclasses.dataclass
class SubspaceConfig(AdapterConfig):
    """``dim``: trainable numbers of the whole adapter (SAID's scalars included); ``projection``:
    "fastfood" or "dense"; ``said``: one trainable scale per adapted module (SAID); ``bias``: the
    adapted modules' biases are in the subspace too; ``seed``: regenerates P; ``cache``: keep a dense
    P in memory ("auto": when it fits ``CACHE_LIMIT``)."""

    dim: int = 1000
    projection: str = "fastfood"
    said: bool = False
    bias: bool = True
    seed: int = 0
    cache: str = "auto"

    def validate(self) -> None:
        self._positive_int("dim")
        self._one_of("projection", ("fastfood", "dense"))
        self._flag("said")
        self._flag("bias")
        self._seed("seed")
        self._one_of("cache", ("auto", "always", "never"))


def _size(geometry: Geometry, config: SubspaceConfig) -> int:
    """Parameters of one adapted module in the subspace: d_out·d_in, plus d_out for its bias."""
    has_bias = config.bias and geometry.bias is not None
    return geometry.d_out * geometry.d_in + (geometry.d_out if has_bias else 0)


def projected_dim(config: SubspaceConfig, modules: int) -> int:
    """Coordinates of θ_d: ``dim``, less SAID's one scalar per module."""
    return config.dim - modules if config.said else config.dim


def check_dim(config: SubspaceConfig, sizes: list[int]) -> None:
    total = sum(sizes)
    if config.dim > total:
        raise ConfigError(
            f"subspace: dim={config.dim} exceeds the {total:,} parameters of the {len(sizes)} adapted module(s); "
            f"choose dim <= {total:,} or adapt more modules (targets=...)."
        )
    if config.said and config.dim <= len(sizes):
        raise ConfigError(
            f"subspace: dim={config.dim} with said=True leaves no projected coordinates: SAID spends one of the "
            f"dim numbers on each of the {len(sizes)} adapted modules; choose dim > {len(sizes)}."
        )


@register(
    "subspace",
    config=SubspaceConfig,
    summary="Subspace training (Li et al. 2018; SAID, Aghajanyan et al. 2020): θ = θ₀ + P·θ_d, one seeded "
            "random (Fastfood or dense) projection of a dim-vector shared by all layers",
    formula="dim for the whole adapter, shared by its layers (said=True: dim − m shared + 1 per layer)",
)
class SubspaceDelta(SharedInBank):
    """This layer's block of P (a projection module) and, with SAID, its scale; θ_d lives in the
    bank, the same parameter in every layer of the adapter, saved once with the first layer."""

    shared_names = ("theta_d",)

    @classmethod
    def make_bank(cls, geometries: list[Geometry], config: SubspaceConfig) -> Bank:
        sizes = [_size(g, config) for g in geometries]
        check_dim(config, sizes)
        k = projected_dim(config, len(geometries))
        weight = geometries[0].weight
        dtype = adapter_dtype(weight)
        dense_bytes = sum(sizes) * k * torch.empty((), dtype=dtype).element_size()
        cache = config.cache == "always" or (config.cache == "auto" and dense_bytes <= CACHE_LIMIT)
        bank = Bank(cache=cache)
        bank.theta_d = nn.Parameter(torch.zeros(k, dtype=dtype, device=weight.device))
        return bank

    def __init__(self, geometry: Geometry, config: SubspaceConfig, *, bank: Bank | None = None, layer: int = 0):
        if bank is None:  # built alone (not through adapt): a subspace of this layer only
            bank = self.make_bank([geometry], config)
        super().__init__(geometry, config, bank=bank, layer=layer)
        w = geometry.weight
        self.dtype = adapter_dtype(w)
        self.size = _size(geometry, config)
        self.has_bias = self.size > self.d_out * self.d_in
        k = bank.theta_d.numel()
        seed = projection_seed(config.seed, layer, config.projection)
        if config.projection == "fastfood":
            self.proj = FastfoodProjection(self.size, k, seed, dtype=self.dtype, device=w.device)
        else:
            self.proj = DenseProjection(self.size, k, seed, cache=bank.cache, dtype=self.dtype, device=w.device)
        self.said_scale = nn.Parameter(torch.ones(1, dtype=self.dtype, device=w.device)) if config.said else None
        self._cache: tuple | None = None  # (versions, device, dtype) -> (ΔW, Δb), filled under no_grad

    @property
    def theta_d(self) -> nn.Parameter:
        return self.bank.theta_d

    def deltas(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ΔW (d_out, d_in), Δb (d_out,) or None): this layer's slice of [λ·] P·θ_d."""
        theta = self.theta_d
        key = (theta._version, None if self.said_scale is None else self.said_scale._version, theta.device, theta.dtype)
        if not torch.is_grad_enabled() and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        v = self.proj(theta.to(self.dtype))
        if self.said_scale is not None:
            v = v * self.said_scale
        n = self.d_out * self.d_in
        out = (v[:n].view(self.d_out, self.d_in), v[n:] if self.has_bias else None)
        self._cache = None if torch.is_grad_enabled() else (key, out)
        return out

    def _apply(self, fn, recurse=True):
        self._cache = None  # a dtype or device move invalidates the cached ΔW
        return super()._apply(fn, recurse)

    # -- the contract ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        dw, db = self.deltas()
        out = add_dense(self, x, base_out, dw)
        if db is not None:
            db = db.to(out.dtype)
            out = out + (db.view(-1, 1, 1) if self.kind == "conv2d" else db)
        return out

    def delta_weight(self) -> torch.Tensor:
        return self.deltas()[0]

    def delta_bias(self) -> torch.Tensor | None:
        return self.deltas()[1]

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: SubspaceConfig) -> int:
        return 1 if config.said else 0

    @classmethod
    def shared_formula(cls, shapes: list[tuple[int, int]], config: SubspaceConfig) -> int:
        return projected_dim(config, len(shapes))

    def extra_repr(self) -> str:
        return (f"{self.method}: d_in={self.d_in}, d_out={self.d_out}, {self.config.projection} P "
                f"({self.size} x {self.theta_d.numel()}){', said' if self.said_scale is not None else ''}")
