"""ScaLearn (Frohmann, Holtermann, Masoudian, Lauscher & Rekabsaz, ACL 2024, "ScaLearn: Simple and
Highly Parameter-Efficient Task Transfer by Learning to Scale"; reference code CPJKU/ScaLearn,
``adapter-transformers/src/transformers/adapters/modeling.py``, classes ``ScaLearn`` and
``ScaLearnPlusPlus``, and ``configuration.py``).

Two-stage transfer: adapters trained on source tasks stay frozen, and a target task learns only how
much of each source adapter's output to use. On every layer where the sources sit,

    out = base_out + Σ_k ω_k ⊙ a_k,    a_k = source k's change of the layer's output,

with ω_k ∈ R^d (``shape="vector"``, ScaLearn) or a scalar (``shape="scalar"``, ScaLearnUniform),
per layer or one set for all layers (``shared=True``: ScaLearn++ and ScaLearnUniform++).

Choices, stated:

* The sources are adapters already on the model, by name (``sources=[...]``), of any method: a_k
  is what source k adds to the layer's output given the same input (for the reference's bottleneck
  adapters, the adapter's output before the residual). The sources must be neither active (they
  would be applied twice) nor merged; :func:`paretune.adapt` freezes them, as every earlier adapter.
  Saving stores ω only: load the sources (same names) before loading a ScaLearn adapter.
* Default targets: every module where all sources have a delta (the reference attaches ScaLearn
  where the source adapters are). A targeted module without every source is refused.
* Init as the reference's ``omega_init_type="avg"``, ``omega_init_scale=2.0``: ω ~ N(2/n, 0.001²)
  for n sources, drawn from ``seed``; ``dropout`` on ω (the reference's ``dropout_ratio``; 0 by
  default, the paper's scripts use 0 or 0.3). The ablations (``take_mean``, ``take_softmax``) are
  not offered.
* Not mergeable: ω scales the sources' outputs, which for non-linear sources (bottleneck adapters)
  is not a weight change; merge raises a clear error.

Trainable: n·d per layer (vector) or n (scalar); shared: n·d (vector; every layer must then have the
same output width d) or n (scalar) for the whole adapter.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..core.bank import Bank
from ..core.config import AdapterConfig
from ..core.delta import SharedInBank
from ..core.dtypes import adapter_dtype
from ..core.geometry import Geometry
from ..core.registry import register
from ..core.state import state_of
from ..errors import ConfigError

INIT_STD = 0.001  # the reference's torch.normal(init, 0.001, shape)


@dataclasses.dataclass
class ScaLearnConfig(AdapterConfig):
    """``sources``: names of the frozen source adapters; ``shape``: "vector" (ScaLearn) or "scalar"
    (ScaLearnUniform); ``shared``: one ω for all layers (the ++ variants); ``init_scale``: ω starts at
    init_scale / n; ``dropout``: on ω while training; ``seed``: ω's init."""

    sources: list[str] = dataclasses.field(default_factory=list)
    shape: str = "vector"
    shared: bool = False
    init_scale: float = 2.0
    dropout: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        self._require(isinstance(self.sources, (list, tuple)) and len(self.sources) > 0
                      and all(isinstance(s, str) and s for s in self.sources)
                      and len(set(self.sources)) == len(self.sources), "sources", self.sources,
                      "give the names of one or more distinct adapters already on the model (ScaLearn combines "
                      "adapters trained before it)")
        self._one_of("shape", ("vector", "scalar"))
        self._flag("shared")
        self._non_negative("init_scale")
        self._probability("dropout")
        self._seed("seed")


def _check_sources(model_state: Any, config: ScaLearnConfig) -> None:
    missing = [s for s in config.sources if s not in model_state.adapters]
    if missing:
        raise ConfigError(f"scalearn: source adapters {missing} are not on the model (it has "
                          f"{sorted(model_state.adapters) or 'none'}); add or load them first, under these names.")
    busy = [s for s in config.sources if s in model_state.active or s in model_state.merged]
    if busy:
        raise ConfigError(f"scalearn: source adapters {busy} are active or merged, so they would also run on their own; "
                          "paretune.unmerge them and paretune.set_active(model, []) before adding ScaLearn.")


def default_targets(model: nn.Module, config: ScaLearnConfig | None = None) -> list[str]:
    """Every module where all the sources have a delta, in model order."""
    config = config if config is not None else ScaLearnConfig()
    st = state_of(model)
    config.validate()
    _check_sources(st, config)
    sets = [set(st.adapters[s].targets) for s in config.sources]
    common = set.intersection(*sets)
    first = st.adapters[config.sources[0]].targets
    return [t for t in first if t in common]


@register(
    "scalearn",
    config=ScaLearnConfig,
    summary="ScaLearn (Frohmann et al. 2024): frozen source adapters mixed by learned scalings of their outputs "
            "(vector or scalar, per layer or shared: ScaLearn, ScaLearnUniform, ++)",
    formula="n·d_out (vector) or n (scalar) per layer, n sources; shared=True: once for all layers",
    kinds=("linear", "conv1d", "embedding", "conv2d", "norm", "block"),
    default_targets=default_targets,
)
class ScaLearnDelta(SharedInBank):
    """ω for this layer (or the bank's shared ω); the sources are read from the host."""

    mergeable = False
    shared_names = ("omega",)

    @classmethod
    def make_bank(cls, geometries: list[Geometry], config: ScaLearnConfig) -> Bank:
        hosts = [g.host for g in geometries]
        _check_sources(hosts[0].state, config)
        lacking = [g.name for g in geometries if any(s not in g.host.deltas for s in config.sources)]
        if lacking:
            raise ConfigError(f"scalearn: {lacking[:5]} {'...' if len(lacking) > 5 else ''}lack a delta of every source "
                              f"({', '.join(config.sources)}); target only modules where all sources sit (the default).")
        bank = Bank()
        if config.shared:
            widths = {g.d_out for g in geometries}
            if config.shape == "vector" and len(widths) > 1:
                raise ConfigError(f"scalearn: shared=True with shape='vector' needs one output width, but the targets "
                                  f"have {sorted(widths)}; use shape='scalar' or shared=False.")
            bank.omega = nn.Parameter(_init(config, widths.pop() if config.shape == "vector" else 1, geometries[0], 0))
        return bank

    def __init__(self, geometry: Geometry, config: ScaLearnConfig, *, bank: Bank | None = None, layer: int = 0):
        if bank is None:
            bank = self.make_bank([geometry], config)
        super().__init__(geometry, config, bank=bank, layer=layer)
        self.sources = tuple(config.sources)
        d = self.d_out if config.shape == "vector" else 1
        self.omega_layer = None if config.shared else nn.Parameter(_init(config, d, geometry, layer + 1))
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None

    @property
    def omega(self) -> torch.Tensor:
        return self.bank.omega if self.omega_layer is None else self.omega_layer

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        deltas = self.geometry.host.deltas
        omega = self.drop(self.omega) if self.drop is not None else self.omega
        out = base_out
        channel = self.geometry.channel_dim()
        for k, name in enumerate(self.sources):
            change = deltas[name](x, base_out.clone()) - base_out  # (a delta may add into what it is given)
            w = omega[k].to(change.dtype)
            if channel != -1 and w.numel() > 1:  # a conv2d's channels sit on dimension 1
                w = w.view(-1, *([1] * (change.dim() - 2)))
            out = out + w * change
        return out

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: ScaLearnConfig) -> int:
        if config.shared:
            return 0
        return len(config.sources) * (d_out if config.shape == "vector" else 1)

    @classmethod
    def shared_formula(cls, shapes: list[tuple[int, int]], config: ScaLearnConfig) -> int:
        if not config.shared or not shapes:
            return 0
        return len(config.sources) * (shapes[0][0] if config.shape == "vector" else 1)

    def extra_repr(self) -> str:
        return f"scalearn: sources={list(self.sources)}, omega={tuple(self.omega.shape)}"


def _init(config: ScaLearnConfig, d: int, geometry: Geometry, stream: int) -> torch.Tensor:
    """ω ~ N(init_scale / n, 0.001²), (n, d), from ``seed`` and a per-layer stream."""
    n = len(config.sources)
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + stream)
    omega = torch.normal(config.init_scale / n, INIT_STD, (n, d), generator=gen)
    return omega.to(geometry.weight.device, adapter_dtype(geometry.weight))
