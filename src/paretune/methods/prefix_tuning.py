"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation"): every attention layer ℓ attends, besides the input's keys and values, to n trainable
key and value vectors P_k^ℓ, P_v^ℓ ∈ R^{n×d_kv}; the model is frozen.

Hosted on each attention block (kind "block": Llama ``self_attn``, GPT-2 ``attn``, BERT
``attention.self``); the block's
output is left as it is. The prefixes reach the attention through transformers' cache interface:
a forward pre-hook on the model (see :mod:`paretune.methods.virtual_tokens`) passes a
``DynamicCache`` pre-filled with every layer's (P_k, P_v) (layer index = the attention's
``layer_idx``), and a 2-D attention mask gets n ones in front, so each query sees the n prefixes
and then the input causally. Given position ids move by n (PEFT's ``_adjust_prompt_learning_kwargs``);
without them the model counts positions from the cache's length, so the input's positions start
at n, as with PEFT. The outputs are the input's positions only (logits (batch, length, vocab)).

Reparameterisation (``prefix_projection=True``; Li & Liang §4.3, PEFT's ``PrefixEncoder``):
P = MLP(E) with E ∈ R^{n×d} (d = the model's hidden size), MLP = Linear(d, h) → tanh →
Linear(h, L·2·d_kv), h = ``encoder_hidden_size``. E and the first Linear are shared by all layers
(held in the adapter's bank, saved once); the second Linear's rows for layer ℓ (its keys, then
its values, PEFT's layout) are that layer's own parameters. Only the MLP's output is needed at
inference; it is recomputed on each call here (a few small matrix products).

Choices, stated (PEFT 0.21: ``peft/tuners/prefix_tuning/model.py``, ``peft/peft_model.py``
``get_prompt``, ``peft/utils/other.py`` ``_prepare_prompt_learning_config``):

* Prefix width d_kv = the attention's key/value width (number of key/value heads × head_dim),
  as PEFT on grouped-query models. The MLP's input width is the hidden size d (Li & Liang's code:
  the embedding width; PEFT uses d_kv, which differs on grouped-query models).
* Initialisation: P (or E) N(0, 1), as PEFT's ``nn.Embedding``; the MLP's Linears as
  ``nn.Linear`` (kaiming-uniform). Li & Liang also initialise from real words' activations;
  not offered. Draws use a generator seeded by ``seed``.
* ``encoder_hidden_size`` default 512, Li & Liang's ``mid_dim``. ``num_virtual_tokens`` default
  10, their table-to-text setting.
* The prefixes are float32 on a half-precision base and cast to the model's dtype in the cache.
* The adapter must cover attention layers 0..L-1 (the cache's layers; PEFT adapts every layer).
* A model whose forward takes no cache (``cache`` / ``past_key_values``, or ``**kwargs`` passed on
  to a backbone that does, as transformers 5's BERT classifiers), or an attention block without a
  ``layer_idx`` and a cache argument, is refused with a TargetError.
* BERT-style encoders (``attention.self`` blocks): with a cache, transformers' ``BertEmbeddings``
  numbers the input's positions from the cache's length, so they start at n (given position ids
  move by n, as on every model). PEFT 0.21 refuses BERT classifiers under transformers 5 (it
  looks for a ``past_key_values`` argument, now named ``cache``), so there is no PEFT comparison
  there.
* On a call with a cache that already holds tokens (generation after the first step) nothing is
  added: the prefixes are in it; a 2-D mask shorter than cache + input gets its n ones.
* Zero start is not defined (the prefixes change every attention output from the start).
* Not mergeable (merge raises a clear error).

Trainable: 2·n·d_kv per layer; with the MLP, h·2·d_kv + 2·d_kv per layer plus n·d + d·h + h
shared (Li & Liang count n·L·2·d_kv without the MLP, as here).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.bank import Bank
from ..core.config import AdapterConfig
from ..core.delta import SharedInBank
from ..core.dtypes import adapter_dtype
from ..core.geometry import Geometry
from ..core.registry import register
from ..errors import ParetuneError, TargetError
from . import virtual_tokens as vt

# the attention blocks, per architecture family
ATTENTION_SITES = {
    "llama": r"(?:.*\.)?layers\.\d+\.self_attn",
    "gpt2": r"(?:.*\.)?h\.\d+\.attn",
    "bert": r"(?:.*\.)?layer\.\d+\.attention\.self",
}
SHARED = ("prefix_embedding", "prefix_w1", "prefix_b1")


@dataclasses.dataclass
class PrefixTuningConfig(AdapterConfig):
    """``num_virtual_tokens``: n; ``prefix_projection``: P = MLP(E) (``encoder_hidden_size``: its
    hidden width); ``seed``: for the random init."""

    INIT_ONLY = ("seed",)

    num_virtual_tokens: int = 10
    prefix_projection: bool = False
    encoder_hidden_size: int = 512
    seed: int = 0

    def validate(self) -> None:
        self._positive_int("num_virtual_tokens")
        self._flag("prefix_projection")
        self._positive_int("encoder_hidden_size")
        self._seed("seed")


def attention_targets(model: nn.Module, method: str) -> str:
    """A regex of the attention blocks of a Llama-style, GPT-2 or BERT-style model."""
    import re

    names = vt_names(model)
    for pattern in ATTENTION_SITES.values():
        if any(re.fullmatch(pattern, n) for n in names):
            return pattern
    raise TargetError(
        f"{method}: no default attention layers for a {type(model).__name__} (known: Llama-style, GPT-2 and BERT "
        "module names). Pass targets=... naming each attention block, whose forward must take a cache."
    )


def vt_names(model: nn.Module) -> list[str]:
    from ..core.inject import iter_modules

    return [n for n, _ in iter_modules(model) if n]


def default_targets(model: nn.Module) -> str:
    """The attention blocks (Llama ``model.layers.N.self_attn``, GPT-2 ``transformer.h.N.attn``, BERT
    ``bert.encoder.layer.N.attention.self``)."""
    return attention_targets(model, "prefix-tuning")


def kv_shape(attention: nn.Module, method: str, where: str) -> tuple[int, int, int]:
    """(layer index, key/value heads, head_dim) of an attention block that takes a cache."""
    try:
        params = inspect.signature(attention.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        params = {}
    layer_idx = getattr(attention, "layer_idx", None)
    if not any(n in params for n in vt.CACHE_NAMES) or not isinstance(layer_idx, int):
        raise TargetError(
            f"{method}: {where} ({type(attention).__name__}) takes no key/value cache with a layer index; prefix "
            "tuning needs attention blocks whose forward takes cache= (transformers' Llama-style or GPT-2 "
            "attention). Choose those as targets."
        )
    cfg = getattr(attention, "config", None)
    head_dim = getattr(attention, "head_dim", None) or getattr(attention, "attention_head_size", None)
    heads = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", None)
    if not isinstance(head_dim, int) or not isinstance(heads, int):
        raise TargetError(f"{method}: cannot read the number of key/value heads and head_dim of {where} "
                          f"({type(attention).__name__}); it needs .head_dim and a config with num_key_value_heads "
                          "or num_attention_heads.")
    return layer_idx, heads, head_dim


def kv_width(geometry: Geometry) -> int:
    _, heads, head_dim = kv_shape(geometry.base, "prefix-tuning", geometry.name)
    return heads * head_dim


def _check_model(model: nn.Module, method: str) -> None:
    if vt.cache_name(model, through_kwargs=True) is None:
        raise TargetError(
            f"{method}: {type(model).__name__}'s forward takes no key/value cache (cache= / past_key_values=), "
            "through which the prefixes reach the attention layers; prefix tuning needs a model that takes one "
            "(a transformers model such as Llama, GPT-2 or BERT)."
        )


class PrefixBase(SharedInBank):
    """The prefixes of one attention layer; the first layer built registers the model-level hook,
    which fills a cache with every layer's prefixes (the layers find each other through the bank's
    ``members`` list)."""

    mergeable = False
    shared_names = SHARED

    def setup_prefix(self, config: Any) -> None:
        """Call after ``super().__init__`` (``self.bank`` from :meth:`make_bank`)."""
        g = self.geometry
        self.n = config.num_virtual_tokens
        members = self.bank.members
        if members:  # the adapter's other layers are in the same model: no search of the live modules
            model = members[0]._model[0]
            host = vt.host_in(model, g, self.method)
        else:
            host, model = vt.locate(g, self.method)
            _check_model(model, self.method)
        self.layer_idx, self.heads, self.head_dim = kv_shape(g.base, self.method, g.name)
        self.d_kv = self.heads * self.head_dim
        self.projection = bool(config.prefix_projection)
        w = g.weight
        dtype = adapter_dtype(w)
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + self.layer_idx)
        if self.projection:
            h = config.encoder_hidden_size
            w2 = torch.empty(2 * self.d_kv, h)
            nn.init.kaiming_uniform_(w2, a=math.sqrt(5), generator=gen)
            bound = 1 / math.sqrt(h)
            self.prefix_w2 = nn.Parameter(w2.to(w.device, dtype))
            self.prefix_b2 = nn.Parameter(torch.empty(2 * self.d_kv).uniform_(-bound, bound, generator=gen)
                                          .to(w.device, dtype))
        else:
            self.prefix_key = nn.Parameter(torch.randn(self.n, self.d_kv, generator=gen).to(w.device, dtype))
            self.prefix_value = nn.Parameter(torch.randn(self.n, self.d_kv, generator=gen).to(w.device, dtype))
        self._host = (host,)  # plain attributes: not registered as sub-modules
        self._model = (model,)
        self._owner: tuple[nn.Module, ...] = (self,)  # the delta its host runs (MAM wraps this one)
        self._hook: vt.ModelHook | None = None
        self.first = not members
        if any(m.layer_idx == self.layer_idx for m in members):
            raise TargetError(f"{self.method}: two targets are attention layer {self.layer_idx}; choose each attention "
                              "block once.")
        members.append(self)
        if self.first:
            self._hook = vt.ModelHook(model, self._before, self._after)

    # -- shared tensors (the reparameterisation's E and first Linear) -------------------------------
    def _stored(self) -> dict[str, torch.Tensor]:
        """This layer's own parameters; the shared ones with the first layer built."""
        out = {n: p for n, p in self.named_parameters() if not n.startswith("bank.")}
        if self.projection and self.first:
            out.update({n: getattr(self.bank, n) for n in SHARED})
        return out

    @classmethod
    def prefix_bank(cls, geometries: list[Geometry], config: Any) -> Bank:
        bank = Bank(members=[])
        if config.prefix_projection and geometries:
            d, h, n = geometries[0].d_out, config.encoder_hidden_size, config.num_virtual_tokens
            w = geometries[0].weight
            dtype = adapter_dtype(w)
            gen = torch.Generator().manual_seed(config.seed)
            w1 = torch.empty(h, d)
            nn.init.kaiming_uniform_(w1, a=math.sqrt(5), generator=gen)
            bound = 1 / math.sqrt(d)
            bank.prefix_embedding = nn.Parameter(torch.randn(n, d, generator=gen).to(w.device, dtype))
            bank.prefix_w1 = nn.Parameter(w1.to(w.device, dtype))
            bank.prefix_b1 = nn.Parameter(torch.empty(h).uniform_(-bound, bound, generator=gen).to(w.device, dtype))
        return bank

    def kv(self, batch: int, dtype: torch.dtype,
           hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of this layer's prefix, each (batch, heads, n, head_dim); ``hidden``:
        tanh(E W1ᵀ + b1) when the MLP is on (computed once for all layers)."""
        if self.projection:
            out = F.linear(hidden, self.prefix_w2, self.prefix_b2)
            k, v = out[:, :self.d_kv], out[:, self.d_kv:]
        else:
            k, v = self.prefix_key, self.prefix_value

        def heads(t: torch.Tensor) -> torch.Tensor:
            t = t.view(self.n, self.heads, self.head_dim).permute(1, 0, 2).to(dtype)
            return t.unsqueeze(0).expand(batch, -1, -1, -1)

        return heads(k), heads(v)

    # -- the model-level hook ---------------------------------------------------------------------
    def _before(self, kw: dict[str, Any]) -> dict[str, Any] | None:
        members = [m for m in self.bank.members if vt.running(m._owner[0], m._host[0])]
        if not members:
            return None
        key, cache = vt.get_cache(kw)
        filled = cache is not None and getattr(cache, vt.FILLED, False)
        fresh = filled or vt.cached_length(cache) == 0
        vt.extend_common(kw, self.n, fresh, labels=False)
        if not fresh:
            return kw
        layers = sorted(m.layer_idx for m in members)
        if layers != list(range(len(layers))):
            raise ParetuneError(
                f"{self.method}: the adapter's attention layers are {layers}; the cache needs prefixes for layers "
                f"0..{len(layers) - 1} without gaps. Target every attention block (targets=None does)."
            )
        batch, _ = vt.input_length(kw)
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache()
            key = vt.cache_name(self._model[0], through_kwargs=True)
        embeds = kw.get("inputs_embeds")
        dtype = embeds.dtype if embeds is not None else self.geometry.weight.dtype
        hidden = None
        if self.projection:
            b = self.bank
            hidden = torch.tanh(F.linear(b.prefix_embedding, b.prefix_w1, b.prefix_b1))
        for m in sorted(members, key=lambda m: m.layer_idx):
            k, v = m.kv(batch, dtype, hidden)
            cache.update(k, v, m.layer_idx)
        setattr(cache, vt.FILLED, True)
        self._filled = cache
        kw[key] = cache
        return kw

    def _after(self) -> None:
        cache = self.__dict__.pop("_filled", None)
        if cache is not None and hasattr(cache, vt.FILLED):
            delattr(cache, vt.FILLED)

    def restore_base(self) -> None:
        """Remove the hooks on the model and leave the bank's list of layers."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        members = self.bank.members
        if self in members:
            members.remove(self)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return base_out  # the prefixes act inside the attention, through the cache

    @classmethod
    def prefix_layer_count(cls, d_kv: int, config: Any) -> int:
        if config.prefix_projection:
            return config.encoder_hidden_size * 2 * d_kv + 2 * d_kv
        return 2 * config.num_virtual_tokens * d_kv

    @classmethod
    def prefix_shared_count(cls, shapes: list[tuple[int, int]], config: Any) -> int:
        if not config.prefix_projection or not shapes:
            return 0
        d, h, n = shapes[0][0], config.encoder_hidden_size, config.num_virtual_tokens
        return n * d + d * h + h

    def extra_repr(self) -> str:
        mlp = ", through the MLP" if self.projection else ""
        return f"{self.method}: layer {self.layer_idx}, {self.n} prefixes of {self.heads}x{self.head_dim}{mlp}"


@register(
    "prefix-tuning",
    config=PrefixTuningConfig,
    summary="Prefix tuning (Li & Liang 2021): n trainable key/value prefixes in every attention layer, through "
            "the model's cache",
    formula="2·n·d_kv per attention layer (d_kv: key/value width); with the MLP h·2·d_kv + 2·d_kv per layer "
            "+ n·d + d·h + h shared",
    kinds=("block",),
    default_targets=default_targets,
)
class PrefixTuningDelta(PrefixBase):
    """P_k, P_v (n × d_kv) of one attention layer, or its rows of the reparameterising MLP."""

    def __init__(self, geometry: Geometry, config: PrefixTuningConfig, *, bank: nn.Module | None = None,
                 layer: int = 0):
        super().__init__(geometry, config, bank=bank, layer=layer)
        self.setup_prefix(config)

    @classmethod
    def make_bank(cls, geometries: list[Geometry], config: PrefixTuningConfig) -> Bank:
        return cls.prefix_bank(geometries, config)

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: PrefixTuningConfig) -> int:
        """Per layer, with d_kv = d_out (no grouped-query attention); :meth:`layer_formula` reads
        the layer's real key/value width."""
        return cls.prefix_layer_count(d_out, config)

    @classmethod
    def layer_formula(cls, geometry: Geometry, config: PrefixTuningConfig) -> int:
        return cls.prefix_layer_count(kv_width(geometry), config)

    @classmethod
    def shared_formula(cls, shapes: list[tuple[int, int]], config: PrefixTuningConfig) -> int:
        return cls.prefix_shared_count(shapes, config)
