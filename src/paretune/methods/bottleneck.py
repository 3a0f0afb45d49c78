"""Bottleneck adapters: series (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for
NLP"; Pfeiffer et al. 2021, "AdapterFusion") and parallel (He et al. 2022, "Towards a Unified View
of Parameter-Efficient Transfer Learning"), with the placements compared by LLM-Adapters (Hu et al.
2023, "LLM-Adapters: An Adapter Family for Parameter-Efficient Fine-Tuning of Large Language
Models").

One adapter is a small module ``A(h) = W_up · f(W_down · h + b_down) + b_up`` with
W_down ∈ R^{m×d}, W_up ∈ R^{d×m}, m = d // ``reduction_factor`` (or ``bottleneck`` = m directly)
and f the ``non_linearity``. It attaches to a sub-layer of every Transformer layer:

* ``style="series"`` (Houlsby; Pfeiffer's one-adapter-per-layer placement): out = h + s·A(h), h the
  sub-layer's output projection's output. Hosted on that Linear (Llama ``mlp.down_proj`` /
  ``self_attn.o_proj``, BERT ``layer.N.output.dense`` / ``attention.output.dense``, GPT-2
  ``mlp.c_proj`` / ``attn.c_proj``), so on BERT the adapter acts before the sub-layer's dropout,
  residual and LayerNorm: LN(dense(x) + A(dense(x)) + residual), Houlsby's insertion point;
* ``style="parallel"`` (He et al.): out = sublayer(x) + s·A(x), x the sub-layer's input. Hosted on
  the whole block (Llama ``mlp`` / ``self_attn``, GPT-2 ``mlp`` / ``attn``). BERT splits each
  sub-layer in two modules and adds residual and LayerNorm inside the second (``BertOutput``,
  ``BertSelfOutput``, whose second argument ``input_tensor`` is the sub-layer's input). There the
  adapter is hosted on that second module: a forward pre-hook on it reads ``input_tensor`` and one on
  its ``LayerNorm`` reads the LayerNorm's input z = dropout(dense(·)) + input_tensor; the adapted
  output is base_out + LN(z + s·A(input_tensor)) − LN(z), which is LN(z + s·A(x)) (He et al.'s
  adapter added before the residual's LayerNorm) when it runs alone, and stays an additive change
  when several adapters stack on the block. The hooks only record tensors; :meth:`restore_base`
  (called by unload, remove and a failed adapt) removes them;
* ``style="scaled-parallel"``: parallel with s = 4 (He et al.'s best setting, their "scaled PA");
  ``scaling`` overrides s for any style (default 1.0 for series and parallel).

``placement``: "ffn" (default, Pfeiffer's and LLM-Adapters' best), "attn" or "both";
:func:`default_targets` resolves it for Llama-style, BERT-style and GPT-2 models. On other models
pass ``targets=``: a series adapter may sit on any Linear / GPT-2 Conv1D (A maps its output,
width d_out); a parallel one on any block (A maps its input) or on a Linear (A: d_in → m → d_out,
LLM-Adapters' ``parallel_adapter`` on a single Linear).

Choices, stated:

* Initialisation (the papers' code: He et al.'s ``init_option="lora"``, AdapterHub's
  ``init_weights="mam_adapter"`` in ``adapters/methods/modeling.py``, LLM-Adapters' ``mam_adapter``
  in ``peft/src/peft/tuners/bottleneck.py``): W_down kaiming-uniform(a=√5) as ``nn.Linear``,
  W_up = 0, both biases 0, so the adapted model starts equal to the base.
* Biases in both projections, as He et al.'s and Houlsby's adapters (LLM-Adapters drops them).
* m = d // reduction_factor with d the host's output width (the hidden size for the default
  targets); reduction_factor 16 as AdapterHub's Pfeiffer / Houlsby configs. m = 0 is refused.
* ``dropout`` on the adapter's input, as LLM-Adapters' ``adapter_dropout`` (default 0).
* The adapter computes in float32 on a half-precision base (``adapter_dtype``).
* Input-dependent (the non-linearity): ``mergeable = False``; merge raises a clear error.

Trainable per adapted module: 2·d·m + m + d (series, or parallel on a block); parallel on a Linear
(d_in ≠ d_out): m·(d_in + d_out) + m + d_out.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.dtypes import adapter_dtype
from ..core.geometry import Geometry
from ..core.registry import register
from ..errors import ConfigError, ParetuneError, TargetError

STYLES = ("series", "parallel", "scaled-parallel")
PLACEMENTS = ("ffn", "attn", "both")
NON_LINEARITIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "identity": lambda h: h,
}
SCALED_PARALLEL_SCALING = 4.0  # He et al. 2022, §4.3: "scaled PA", s = 4

# Where each placement attaches, per architecture family: (series host, parallel host) as regexes
# over whole module names. Series: the sub-layer's output projection; parallel: the whole block.
SITES: dict[str, dict[str, tuple[str, str]]] = {
    "llama": {
        "ffn": (r"(?:.*\.)?layers\.\d+\.mlp\.down_proj", r"(?:.*\.)?layers\.\d+\.mlp"),
        "attn": (r"(?:.*\.)?layers\.\d+\.self_attn\.o_proj", r"(?:.*\.)?layers\.\d+\.self_attn"),
    },
    "bert": {
        "ffn": (r"(?:.*\.)?layer\.\d+\.output\.dense", r"(?:.*\.)?layer\.\d+\.output"),
        "attn": (r"(?:.*\.)?layer\.\d+\.attention\.output\.dense", r"(?:.*\.)?layer\.\d+\.attention\.output"),
    },
    "gpt2": {
        "ffn": (r"(?:.*\.)?h\.\d+\.mlp\.c_proj", r"(?:.*\.)?h\.\d+\.mlp"),
        "attn": (r"(?:.*\.)?h\.\d+\.attn\.c_proj", r"(?:.*\.)?h\.\d+\.attn"),
    },
}


@dataclasses.dataclass
class BottleneckConfig(AdapterConfig):
    """``style``: "series" | "parallel" | "scaled-parallel"; ``placement``: "ffn" | "attn" |
    "both"; ``reduction_factor``: m = d // reduction_factor, unless ``bottleneck`` gives m;
    ``non_linearity``: relu | gelu | silu | tanh | identity; ``scaling``: s (None: 1, or 4 for
    scaled-parallel); ``dropout``: on the adapter's input."""

    style: str = "series"
    placement: str = "ffn"
    reduction_factor: int = 16
    bottleneck: int | None = None
    non_linearity: str = "relu"
    scaling: float | None = None
    dropout: float = 0.0

    def validate(self) -> None:
        self._one_of("style", STYLES)
        self._one_of("placement", PLACEMENTS)
        self._positive_int("reduction_factor")
        if self.bottleneck is not None:
            self._positive_int("bottleneck")
        self._one_of("non_linearity", tuple(NON_LINEARITIES))
        if self.scaling is not None:
            self._non_negative("scaling")
        self._probability("dropout")

    @property
    def s(self) -> float:
        """The scale of the adapter's output."""
        if self.scaling is not None:
            return float(self.scaling)
        return SCALED_PARALLEL_SCALING if self.style == "scaled-parallel" else 1.0

    @property
    def series(self) -> bool:
        return self.style == "series"

    def width(self, d: int, method: str = "bottleneck") -> int:
        """m for a host of output width d; a ConfigError if it would be zero."""
        if self.bottleneck is not None:
            return self.bottleneck
        m = d // self.reduction_factor
        if m < 1:
            raise ConfigError(
                f"{method}: reduction_factor={self.reduction_factor} exceeds the width {d} of an adapted layer, "
                f"leaving a bottleneck of 0; choose reduction_factor <= {d} or give bottleneck=m directly."
            )
        return m


# -- targets ----------------------------------------------------------------------------------

def _module_names(model: nn.Module) -> list[str]:
    from ..core.inject import iter_modules  # (a host stands for its base under the same name)

    return [n for n, _ in iter_modules(model) if n]


def architecture(model: nn.Module) -> str | None:
    """"llama", "bert" or "gpt2" when the model's module names follow that family, else None."""
    names = _module_names(model)
    for family, sites in SITES.items():
        pattern = re.compile(sites["ffn"][0])
        if any(pattern.fullmatch(n) for n in names):
            return family
    return None


def resolve_targets(model: nn.Module, placements: tuple[str, ...], series: bool, method: str) -> str:
    """A regex selecting the hosts of ``placements`` ("ffn", "attn") for a series (the output
    projections) or parallel (the blocks) adapter; TargetError for a model of unknown family or
    one without such a sub-layer."""
    family = architecture(model)
    if family is None:
        raise TargetError(
            f"{method}: no default placement for a {type(model).__name__} (known: Llama-style, BERT-style and "
            "GPT-2 module names). Pass targets=...: for a series adapter the output projection of each "
            "feed-forward (or attention) sub-layer, for a parallel one the sub-layer module itself."
        )
    names = _module_names(model)
    patterns = []
    for placement in placements:
        pattern = SITES[family][placement][0 if series else 1]
        if not any(re.fullmatch(pattern, n) for n in names):
            raise TargetError(
                f"{method}: placement {placement!r} found no {'attention' if placement == 'attn' else 'feed-forward'} "
                f"sub-layer in this {type(model).__name__} (looked for {pattern}); choose another placement or "
                "pass targets=..."
            )
        patterns.append(pattern)
    return "|".join(f"(?:{p})" for p in patterns)


def placements_of(placement: str) -> tuple[str, ...]:
    return ("attn", "ffn") if placement == "both" else (placement,)


def default_targets(model: nn.Module, config: BottleneckConfig | None = None) -> str:
    """The hosts of ``config``'s placement and style on a Llama-style, BERT-style or GPT-2 model
    (without a config: series after the feed-forward sub-layer, the defaults)."""
    config = config if config is not None else BottleneckConfig()
    return resolve_targets(model, placements_of(config.placement), config.series, "bottleneck")


# -- the adapter module ----------------------------------------------------------------------------

def _takes_input_tensor(block: nn.Module) -> bool:
    try:
        return "input_tensor" in inspect.signature(block.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return False


def post_norm_block(geometry: Geometry) -> bool:
    """A block that adds the residual and applies its LayerNorm itself (BERT's ``BertOutput`` and
    ``BertSelfOutput``: forward(hidden_states, input_tensor) -> LayerNorm(dense(...) + input_tensor))."""
    base = geometry.base
    return geometry.kind == "block" and hasattr(base, "LayerNorm") and _takes_input_tensor(base)


def _raw(module: nn.Module) -> nn.Module:
    """The module a host wraps (another method may host the LayerNorm), else the module."""
    from ..core.host import Host

    return module.base if isinstance(module, Host) else module


class BottleneckBase(Delta):
    """The adapter's wiring (series, parallel, parallel inside a post-LayerNorm block); subclasses
    give the down and up maps through :meth:`project` (plain Linear maps here, PHM maps for
    Compacter). ``self.d_a`` is the adapter's input width, ``self.m`` its bottleneck."""

    mergeable = False

    def setup(self, config: Any, m: int) -> None:
        """Common state; call after ``super().__init__``."""
        g = self.geometry
        self.series = config.style == "series" if hasattr(config, "style") else True
        if self.kind not in ("linear", "conv1d", "block"):
            raise TargetError(f"{self.method}: cannot attach to a {self.kind} layer ({g.name or type(g.base).__name__}); "
                              "target a Linear / Conv1D output projection or a sub-layer block.")
        self.post_norm = post_norm_block(g)
        if self.series and self.post_norm:
            raise TargetError(
                f"{self.method}: a series adapter on {g.name or type(g.base).__name__} would act after its LayerNorm; "
                f"target its output projection instead ({(g.name + '.dense') if g.name else 'its dense layer'})."
            )
        self.d_a = self.d_out if self.series else self.d_in
        self.m = m
        self.scaling = config.s
        self.act = NON_LINEARITIES[config.non_linearity]
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self._hooks: list[Any] = []
        self._seen: dict[str, torch.Tensor] = {}
        if self.post_norm:
            self._attach_hooks()

    # -- BERT-style blocks: record the sub-layer's input and the LayerNorm's input -------------
    def _attach_hooks(self) -> None:
        block = self.geometry.base

        def block_input(module, args, kwargs):
            t = args[1] if len(args) > 1 else kwargs.get("input_tensor")
            if t is not None:
                self._seen["x"] = t

        def norm_input(module, args):
            if args:
                self._seen["z"] = args[0]

        self._hooks = [block.register_forward_pre_hook(block_input, with_kwargs=True),
                       block.LayerNorm.register_forward_pre_hook(norm_input)]

    def restore_base(self) -> None:
        """Remove the hooks a post-LayerNorm block got (nothing else changed on the base)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._seen = {}

    # -- the contract --------------------------------------------------------------------------
    def project(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        """(weight, bias) of the down (m × d_a) or up (d_out × m) map."""
        raise NotImplementedError

    def adapter(self, h: torch.Tensor) -> torch.Tensor:
        """s·A(h) = s·(W_up f(W_down h + b_down) + b_up), computed in the adapter's precision."""
        w_down, b_down = self.project("down")
        w_up, b_up = self.project("up")
        h = h.to(w_down.dtype)
        if self.drop is not None:
            h = self.drop(h)
        out = F.linear(self.act(F.linear(h, w_down, b_down)), w_up, b_up)
        return out * self.scaling if self.scaling != 1.0 else out

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            return self._post_norm_forward(base_out)
        h = base_out if self.series else x
        return base_out + self.adapter(h).to(base_out.dtype)

    def _post_norm_forward(self, base_out: torch.Tensor) -> torch.Tensor:
        seen, self._seen = self._seen, {}
        if "x" not in seen or "z" not in seen:
            raise ParetuneError(
                f"{self.method}: {type(self.geometry.base).__name__} was called without its input_tensor argument "
                "or did not run its LayerNorm; a parallel adapter on it cannot find the sub-layer's input."
            )
        ln = _raw(self.geometry.base.LayerNorm)
        z = seen["z"]
        a = self.adapter(seen["x"]).to(z.dtype)
        norm = lambda v: F.layer_norm(v, ln.normalized_shape, ln.weight, ln.bias, ln.eps)  # noqa: E731
        return base_out + (norm(z + a) - norm(z)).to(base_out.dtype)

    def extra_repr(self) -> str:
        where = "series" if self.series else "parallel"
        return f"{self.method}: {where}, {self.d_a} -> {self.m} -> {self.d_out}, s={self.scaling:g}"


@register(
    "bottleneck",
    config=BottleneckConfig,
    summary="Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021; He et al. 2022; LLM-Adapters): "
            "h + s·up(f(down(·))) after (series) or beside (parallel) the FFN / attention sub-layer",
    formula="2·d·m + m + d, d = the layer's output width, m = d // reduction_factor (or bottleneck)",
    kinds=("linear", "conv1d", "block"),
    default_targets=default_targets,
)
class BottleneckDelta(BottleneckBase):
    """W_down (m × d_a) kaiming-uniform(a=√5), W_up (d_out × m) zero, both biases zero."""

    def __init__(self, geometry: Geometry, config: BottleneckConfig, *, bank: nn.Module | None = None,
                 layer: int = 0):
        super().__init__(geometry, config, bank=bank, layer=layer)
        self.setup(config, config.width(self.d_out))
        w = geometry.weight
        dtype = adapter_dtype(w)
        self.down = nn.Parameter(torch.empty(self.m, self.d_a, dtype=dtype, device=w.device))
        self.down_bias = nn.Parameter(torch.zeros(self.m, dtype=dtype, device=w.device))
        self.up = nn.Parameter(torch.zeros(self.d_out, self.m, dtype=dtype, device=w.device))
        self.up_bias = nn.Parameter(torch.zeros(self.d_out, dtype=dtype, device=w.device))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))

    def project(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.down, self.down_bias) if which == "down" else (self.up, self.up_bias)

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: BottleneckConfig) -> int:
        m = config.width(d_out)
        d_a = d_out if config.series else d_in
        return d_a * m + m + m * d_out + d_out
