"""Mix-and-Match adapter (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer
Learning", §4.4): prefix tuning on the attention sub-layer and a scaled parallel adapter on the
feed-forward sub-layer of every layer, as one adapter (one name, one save / load).

* Attention blocks (Llama ``self_attn``, GPT-2 ``attn``, BERT ``attention.self``): prefix tuning as
  :mod:`paretune.methods.prefix_tuning` (n = ``num_virtual_tokens`` key/value prefixes per layer
  through the model's cache; ``prefix_projection`` for Li & Liang's MLP).
* Feed-forward blocks (Llama ``mlp``, GPT-2 ``mlp``, BERT ``output``, where the adapter's output is
  added before the residual's LayerNorm): the parallel adapter of
  :mod:`paretune.methods.bottleneck` (``style="scaled-parallel"``): out = FFN(x) + s·(W_up f(W_down x
  + b_down) + b_up), W_up = 0 at the start, s = ``scaling``.

Choices, stated: the defaults are the paper's MAM setting, prefix length 30 (their l = 30) and
bottleneck 512 (their r = 512) with s = 4; f = ReLU; no reparameterising MLP for the prefixes by
default (He et al.'s own code was not checked for it; set ``prefix_projection=True`` for Li &
Liang's). A block is treated as attention when its name is an attention block of a known family
(or, for other names, when its forward takes a key/value cache), else as feed-forward.
Zero start is not defined (the prefixes change the outputs from the start); not mergeable.

Trainable: 2·n·d_kv per attention layer (with the MLP as prefix tuning's), 2·d·m + m + d per
feed-forward layer.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from ..core.bank import Bank
from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.geometry import Geometry
from ..core.registry import register
from . import virtual_tokens as vt
from .bottleneck import NON_LINEARITIES, SITES, BottleneckConfig, BottleneckDelta
from .prefix_tuning import ATTENTION_SITES, PrefixBase, attention_targets, kv_width


@dataclasses.dataclass
class MamConfig(AdapterConfig):
    """Prefix part: ``num_virtual_tokens``, ``prefix_projection``, ``encoder_hidden_size``, ``seed``;
    feed-forward adapter: ``bottleneck`` (m), ``non_linearity``, ``scaling`` (s), ``dropout``."""

    INIT_ONLY = ("seed",)

    num_virtual_tokens: int = 30
    prefix_projection: bool = False
    encoder_hidden_size: int = 512
    bottleneck: int = 512
    non_linearity: str = "relu"
    scaling: float = 4.0
    dropout: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        self._positive_int("num_virtual_tokens")
        self._flag("prefix_projection")
        self._positive_int("encoder_hidden_size")
        self._positive_int("bottleneck")
        self._one_of("non_linearity", tuple(NON_LINEARITIES))
        self._non_negative("scaling")
        self._probability("dropout")
        self._seed("seed")

    def adapter_config(self) -> BottleneckConfig:
        """The feed-forward adapter's options."""
        return BottleneckConfig(style="scaled-parallel", placement="ffn", bottleneck=self.bottleneck,
                                non_linearity=self.non_linearity, scaling=self.scaling, dropout=self.dropout)


def default_targets(model: nn.Module) -> str:
    """The attention and feed-forward blocks of a Llama-style, GPT-2 or BERT-style model."""
    attn = attention_targets(model, "mam")
    family = next(f for f, p in ATTENTION_SITES.items() if p == attn)
    return f"(?:{attn})|(?:{SITES[family]['ffn'][1]})"


def is_attention(geometry: Geometry) -> bool:
    """Whether MAM puts prefixes (True) or the parallel adapter (False) on this block."""
    name = geometry.name
    if any(re.fullmatch(p, name) for p in ATTENTION_SITES.values()):
        return True
    if any(re.fullmatch(sites["ffn"][1], name) for sites in SITES.values()):
        return False
    return vt.cache_name(geometry.base) is not None


class _MamPrefix(PrefixBase):
    """MAM's prefix part on one attention block."""

    def __init__(self, geometry: Geometry, config: MamConfig, *, bank: nn.Module | None, layer: int):
        super().__init__(geometry, config, bank=bank, layer=layer)
        self.setup_prefix(config)


@register(
    "mam",
    config=MamConfig,
    summary="MAM adapter (He et al. 2022): prefix tuning on the attention + a scaled parallel adapter (s = 4) on "
            "the feed-forward sub-layer",
    formula="attention layer: 2·n·d_kv; feed-forward layer: 2·d·m + m + d",
    kinds=("block",),
    default_targets=default_targets,
)
class MamDelta(Delta):
    """One block of a MAM adapter: ``part`` is the prefix part (attention) or the scaled parallel
    adapter (feed-forward)."""

    mergeable = False

    def __init__(self, geometry: Geometry, config: MamConfig, *, bank: nn.Module | None = None, layer: int = 0):
        super().__init__(geometry, config, bank=bank, layer=layer)
        self.attention = is_attention(geometry)
        if self.attention:
            self.part: Delta = _MamPrefix(geometry, config, bank=bank, layer=layer)
            self.part._owner = (self,)  # the delta the host runs (a tuple: not a sub-module)
        else:
            self.part = BottleneckDelta(geometry, config.adapter_config(), layer=layer)

    @classmethod
    def make_bank(cls, geometries: list[Geometry], config: MamConfig) -> Bank:
        return PrefixBase.prefix_bank([g for g in geometries if is_attention(g)], config)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return self.part(x, base_out)

    def restore_base(self) -> None:
        self.part.restore_base()

    def stored_state(self) -> dict[str, torch.Tensor]:
        return self.part.stored_state()

    @torch.no_grad()
    def load_stored(self, state: dict[str, torch.Tensor], where: str = "") -> None:
        self.check_stored(state, where)
        self.part.load_stored(state, where)

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: MamConfig) -> int:
        """A feed-forward block's count (:meth:`layer_formula` tells attention blocks apart)."""
        return BottleneckDelta.trainable_formula(d_out, d_in, config.adapter_config())

    @classmethod
    def layer_formula(cls, geometry: Geometry, config: MamConfig) -> int:
        if is_attention(geometry):
            return PrefixBase.prefix_layer_count(kv_width(geometry), config)
        return cls.trainable_formula(geometry.d_out, geometry.d_in, config)

    @classmethod
    def shared_formula(cls, shapes: list[tuple[int, int]], config: MamConfig) -> int:
        return PrefixBase.prefix_shared_count(shapes, config)

    def extra_repr(self) -> str:
        return f"{self.method}: {'prefixes' if self.attention else 'scaled parallel adapter'}"

