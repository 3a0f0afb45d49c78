"""(IA)³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning"): learned vectors rescale the attention keys and values and the feed-forward
network's inner activations; every vector starts at ones, so the adapted model starts equal to the base.

Following PEFT's IA3 (``peft/tuners/ia3/layer.py``, ``model.py``; PEFT 0.21), a target is either

* a *feed-forward* module: l ∈ R^{d_in} rescales its input, ``out = W (x ⊙ l) + b`` (on the down
  projection of an MLP this is the paper's rescaling of the inner activation); or
* any other module: l ∈ R^{d_out} rescales its output, ``out = (W x + b) ⊙ l`` (keys, values).

Trainable per layer: d_in for a feed-forward module, d_out otherwise.

Which modules are feed-forward: ``feedforward_modules``, a list of module names / name suffixes
(matched as ``targets`` are: the whole name or its end after a dot) or a regular expression
matched against the whole module name (as PEFT's ``re.fullmatch``). Every entry must match an
adapted module, and a regex at least one, else :class:`~paretune.errors.TargetError`. ``None``
(the default) stands for the feed-forward modules of PEFT's
``TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING`` for the architectures listed in
:data:`ARCHITECTURES`: ``down_proj`` (Llama, Mistral, Qwen2/3, Gemma), ``output.dense`` (BERT,
RoBERTa: like PEFT's suffix match this includes ``attention.output.dense``), ``mlp.c_proj``
(GPT-2), ``fc2`` (OPT, BART, Phi). The choice is made per module from its name, so with
explicit ``targets`` on another architecture a module whose name ends in one of these suffixes
scales its input and every other one its output (PEFT instead asks for ``feedforward_modules``).

Default targets (``targets=None``) per architecture, from PEFT's
``TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING``: Llama, Mistral ``k_proj, v_proj,
down_proj``; Qwen2/3, Gemma ``q_proj, v_proj, down_proj``; BERT, RoBERTa ``key, value,
output.dense``; GPT-2 ``c_attn, mlp.c_proj``; OPT ``q_proj, k_proj, fc2``; BART, Phi ``q_proj,
v_proj, fc2``. Another architecture is refused with a :class:`~paretune.errors.TargetError`
asking for ``targets=...``.

Merging is exact: ``W ← W·diag(l)`` (columns) for a feed-forward module, ``W ← diag(l)·W`` and
``b ← l ⊙ b`` (rows) otherwise, as PEFT's ``Linear.merge``. ΔW = W·(l − 1) is a function of W, so
unmerge recovers it from the merged weight, ΔW = W_merged·(1 − 1/l) (PEFT divides by l + 1e-8); an
entry of l exactly 0 has erased its row or column and unmerge is refused.

Several adapters on one layer: the output case multiplies whatever comes in, ``out = base_out ⊙ l``
(with two (IA)³ adapters this is PEFT's product of their vectors); the input case adds
``W₀((l − 1) ⊙ x)`` with the frozen W₀, so merge an (IA)³ adapter before others on the same layer.
Kinds: Linear and GPT-2 Conv1D (PEFT's Conv1D path is its Linear layer with the transposed weight).
"""

from __future__ import annotations

import dataclasses
import re
import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.dtypes import adapter_dtype
from ..core.geometry import Geometry
from ..core.inject import targets_by_model_type
from ..core.registry import register
from ..errors import ParetuneError, TargetError

# model_type -> (default targets, feed-forward modules among them): PEFT's constants.py mappings
ARCHITECTURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mistral": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen3": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "bert": (("key", "value", "output.dense"), ("output.dense",)),
    "roberta": (("key", "value", "output.dense"), ("output.dense",)),
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "opt": (("q_proj", "k_proj", "fc2"), ("fc2",)),
    "bart": (("q_proj", "v_proj", "fc2"), ("fc2",)),
    "phi": (("q_proj", "v_proj", "fc2"), ("fc2",)),
}
DEFAULT_FEEDFORWARD: tuple[str, ...] = tuple(sorted({s for _, ff in ARCHITECTURES.values() for s in ff}))


def _suffix_hit(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def is_feedforward(name: str, feedforward_modules: list[str] | str | None) -> bool:
    """Whether the module called ``name`` scales its input (see the module docstring)."""
    if feedforward_modules is None:
        feedforward_modules = list(DEFAULT_FEEDFORWARD)
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, name) is not None
    return any(_suffix_hit(name, s) for s in feedforward_modules)


def default_targets(model: nn.Module) -> list[str]:
    """PEFT's (IA)³ targets for the model's architecture (``model.config.model_type``)."""
    targets, _ = targets_by_model_type(
        model, ARCHITECTURES, "ia3",
        "Pass targets=[...] (the key and value projections and the feed-forward down projection) and, if its "
        "names differ from the defaults, feedforward_modules=[...].")
    return list(targets)


@dataclasses.dataclass
class IA3Config(AdapterConfig):
    """``feedforward_modules``: the targets whose input l rescales (names / suffixes, or a regex
    matched against the whole name); None: the defaults of the module docstring."""

    feedforward_modules: list[str] | str | None = None

    def validate(self) -> None:
        v = self.feedforward_modules
        if isinstance(v, tuple):
            self.feedforward_modules = v = list(v)
        if v is None:
            return
        if isinstance(v, str):
            try:
                re.compile(v)
            except re.error as e:
                self._require(False, "feedforward_modules", v, f"it is not a valid regular expression ({e})")
            return
        self._require(isinstance(v, list) and all(isinstance(s, str) and s for s in v), "feedforward_modules", v,
                      "give None, a list of module names / suffixes such as ['down_proj'], or a regex string")


@register(
    "ia3",
    config=IA3Config,
    summary="(IA)³ (Liu et al. 2022): learned vectors rescale keys, values (outputs) and feed-forward inputs; "
            "init ones; mergeable",
    formula="d_in (feed-forward module) or d_out (other modules)",
    kinds=("linear", "conv1d"),
    default_targets=default_targets,
)
class IA3Delta(Delta):
    depends_on_base = True

    def __init__(self, geometry: Geometry, config: IA3Config, *, bank: nn.Module | None = None, layer: int = 0):
        super().__init__(geometry, config, bank=bank, layer=layer)
        w = geometry.weight
        self.feedforward = is_feedforward(geometry.name, config.feedforward_modules)
        size = self.d_in if self.feedforward else self.d_out
        self.l = nn.Parameter(torch.ones(size, dtype=adapter_dtype(w), device=w.device))

    @classmethod
    def make_bank(cls, geometries: list[Geometry], config: IA3Config) -> None:
        """Nothing is shared; checks that every explicit ``feedforward_modules`` entry names an
        adapted module (before any delta is built, so a refusal leaves the model as it was)."""
        ff = config.feedforward_modules
        names = [g.name for g in geometries]
        if ff is None:
            return None
        if isinstance(ff, str):
            if not any(re.fullmatch(ff, n) for n in names):
                raise TargetError(
                    f"ia3: feedforward_modules={ff!r} matches none of the adapted modules ({', '.join(names)}); "
                    "it must match whole names of targets whose input is rescaled."
                )
            return None
        unknown = [s for s in ff if not any(_suffix_hit(n, s) for n in names)]
        if unknown:
            raise TargetError(
                f"ia3: feedforward_modules {unknown} match none of the adapted modules ({', '.join(names)}); "
                "feed-forward modules must be among the targets (add them to targets or fix the names)."
            )
        return None

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        l = self.l
        if not self.feedforward:
            return (base_out.to(l.dtype) * l).to(base_out.dtype)
        w = self.geometry.matrix()
        h = x.to(l.dtype) * (l - 1)
        return base_out + F.linear(h.to(w.dtype), w).to(base_out.dtype)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The input case alone: base(x ⊙ l), one product with W instead of two."""
        if not self.feedforward:
            return None
        return self.geometry.base((x.to(self.l.dtype) * self.l).to(x.dtype))

    # -- merging -----------------------------------------------------------------------------
    def _scale(self) -> torch.Tensor:
        """l as a (d_out, 1) or (1, d_in) factor of the (d_out, d_in) matrix view."""
        return self.l.view(1, -1) if self.feedforward else self.l.view(-1, 1)

    def delta_weight(self) -> torch.Tensor:
        w = self.geometry.matrix().to(self.l.dtype)
        return w * (self._scale() - 1)

    def delta_bias(self) -> torch.Tensor | None:
        b = self.geometry.bias
        if self.feedforward or b is None:
            return None
        return b.to(self.l.dtype) * (self.l - 1)

    def merged_deltas(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ΔW = W·(1 − 1/l) (and Δb = b·(1 − 1/l)) from the merged W = W₀·l, in float64."""
        l64 = self.l.detach().double()
        if bool((l64 == 0).any()):
            raise ParetuneError(
                f"ia3: {self.geometry.name or 'a layer'} has l entries equal to 0, which erased rows or columns of "
                "the merged weight; it cannot be unmerged. Reload the base model instead."
            )
        g = self.geometry
        shape = (1, -1) if self.feedforward else (-1, 1)
        dw = g.matrix().double() * (1 - 1 / l64.view(shape))
        db = None
        if not self.feedforward and g.bias is not None:
            db = g.bias.double() * (1 - 1 / l64)
        return dw, db

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: IA3Config) -> int:
        """d_out: a module that scales its output (a feed-forward one scales its input: see
        :meth:`layer_formula`, which knows the module's name)."""
        return d_out

    @classmethod
    def layer_formula(cls, geometry: Geometry, config: IA3Config) -> int:
        """d_in for a feed-forward module (its input is scaled), d_out otherwise."""
        return geometry.d_in if is_feedforward(geometry.name, config.feedforward_modules) else geometry.d_out

    def extra_repr(self) -> str:
        return f"ia3: d_in={self.d_in}, d_out={self.d_out}, scales={'input' if self.feedforward else 'output'}"

