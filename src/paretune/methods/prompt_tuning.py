"""Prompt tuning (Lester, Al-Rfou & Constant 2021, "The Power of Scale for Parameter-Efficient
Prompt Tuning"): n trainable virtual-token embeddings P ∈ R^{n×d} put before the input's
embeddings; the model is frozen and only P trains (n·d numbers).

Attached to the model's input embedding (kind "embedding"): the adapted output of the embedding
is [P; E(ids)] along the sequence dimension. A forward pre-hook on the model (see
:mod:`paretune.methods.virtual_tokens`) calls the embedding on the input ids and passes the result
as ``inputs_embeds`` (as PEFT does: a model such as BERT sizes its position and token type
embeddings from the ids' length, so the longer sequence must come in as embeddings), and makes
the rest of the call fit: a 2-D attention mask gets
n ones in front, token-level labels (same shape as the input ids) n entries -100 in front, token
type ids n zeros in front (PEFT's ``PeftModelForSequenceClassification``), given position ids
become (0..n-1, p + n); a call with ``inputs_embeds`` instead of ids gets P put before them there.

Choices, stated (following PEFT 0.21: ``peft/tuners/prompt_tuning/model.py`` and
``PeftModelForCausalLM.forward`` in ``peft/peft_model.py``):

* The outputs keep the virtual positions, as PEFT's: a causal LM's logits are (batch, n + length,
  vocab) and its loss ignores the virtual positions through the -100 labels; a sequence
  classifier's pooled output sees them like any token (BERT's pooler reads position 0, the first
  virtual token, as PEFT's does). PEFT drops given position ids; here they are kept, after the
  prompt's 0..n-1, which gives PEFT's result when they are the default 0..length-1.
* ``init="random"``: N(0, 1) entries, as PEFT's ``nn.Embedding`` (Lester et al. draw uniform in
  [-0.5, 0.5]); ``"sample_vocab"``: the embeddings of n token ids drawn uniformly from the
  vocabulary (PEFT's SAMPLE_VOCAB; Lester et al. sample from the 5,000 most common tokens, which
  needs token frequencies the model does not have); ``"text"``: the embeddings of ``init_text``'s
  tokens (``tokenizer``: a name or path for ``AutoTokenizer``), cut to n or repeated up to n as
  PEFT's TEXT. Draws use a generator seeded by ``seed``.
* P is kept in float32 on a half-precision base (``adapter_dtype``) and cast to the embedding's
  dtype when put in front.
* Zero start is not defined: the virtual tokens change the outputs from the first step whatever
  their values (an adapter that starts equal to the base does not exist for this method).
* Not mergeable (the virtual tokens are inputs, not a weight change): merge raises a clear error.
* The hook goes on the outermost module above the embedding whose forward takes ``input_ids``
  or ``inputs_embeds``; another method on the same embedding should be added before this one (it
  sees the longer output otherwise).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.dtypes import adapter_dtype
from ..core.geometry import Geometry
from ..core.registry import register
from ..errors import ConfigError, TargetError
from . import virtual_tokens as vt

INITS = ("random", "sample_vocab", "text")


@dataclasses.dataclass
class PromptTuningConfig(AdapterConfig):
    """``num_virtual_tokens``: n; ``init``: "random" | "sample_vocab" | "text" (with ``init_text``
    and ``tokenizer``); ``seed``: for the random draws."""

    INIT_ONLY = ("init", "init_text", "tokenizer", "seed")

    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str | None = None
    tokenizer: str | None = None
    seed: int = 0

    def validate(self) -> None:
        self._positive_int("num_virtual_tokens")
        self._one_of("init", INITS)
        self._seed("seed")
        if self.init == "text":
            self._require(isinstance(self.init_text, str) and bool(self.init_text.strip()), "init_text",
                          self.init_text, 'init="text" needs the text whose token embeddings start the prompt')
            self._require(isinstance(self.tokenizer, str) and bool(self.tokenizer), "tokenizer", self.tokenizer,
                          'init="text" needs a tokenizer name or path (the base model\'s) to tokenize init_text')


def input_embedding_name(model: nn.Module, method: str) -> str:
    """The module name of ``model``'s input embedding (``get_input_embeddings()``)."""
    from ..core.inject import embedding_names

    names = embedding_names(model, "input")
    if names:
        return sorted(names)[0]
    raise TargetError(
        f"{method}: no input embedding found on this {type(model).__name__} (get_input_embeddings()); pass "
        "targets=[...] with the name of the embedding of the input tokens."
    )


def default_targets(model: nn.Module) -> list[str]:
    """The model's input embedding."""
    return [input_embedding_name(model, "prompt-tuning")]


def init_token_ids(config: PromptTuningConfig, vocab: int) -> torch.Tensor | None:
    """The token ids whose embeddings start the prompt (None for ``init="random"``)."""
    n = config.num_virtual_tokens
    if config.init == "sample_vocab":
        gen = torch.Generator().manual_seed(config.seed)
        return torch.randint(0, vocab, (n,), generator=gen)
    if config.init == "text":
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(config.tokenizer)
        except Exception as e:
            raise ConfigError(f"prompt-tuning: tokenizer={config.tokenizer!r} could not be loaded ({e}); give the "
                              "base model's tokenizer name or local path.") from None
        ids = list(tok(config.init_text)["input_ids"])
        if not ids:
            raise ConfigError(f"prompt-tuning: init_text={config.init_text!r} gives no tokens.")
        ids = (ids * math.ceil(n / len(ids)))[:n]
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ConfigError(f"prompt-tuning: the tokenizer gives ids {bad[:5]} outside the embedding's {vocab} rows; "
                              "use the base model's own tokenizer.")
        return torch.tensor(ids, dtype=torch.long)
    return None


@register(
    "prompt-tuning",
    config=PromptTuningConfig,
    summary="Prompt tuning (Lester et al. 2021): n trainable virtual-token embeddings before the input's",
    formula="n·d, d = the embedding width",
    kinds=("embedding",),
    default_targets=default_targets,
)
class PromptTuningDelta(Delta):
    """P (n × d), put before the embedding's output; the model-level hook extends mask and labels."""

    mergeable = False
    weightable = False  # it lengthens the sequence: its output is not the base output plus a change

    def __init__(self, geometry: Geometry, config: PromptTuningConfig, *, bank: nn.Module | None = None,
                 layer: int = 0):
        super().__init__(geometry, config, bank=bank, layer=layer)
        if layer > 0:
            raise TargetError("prompt-tuning: the targets select several embeddings; choose the one input embedding "
                              "(targets=None picks it).")
        self.n = config.num_virtual_tokens
        w = geometry.weight
        dtype = adapter_dtype(w)
        ids = init_token_ids(config, self.d_in)
        if ids is None:
            gen = torch.Generator().manual_seed(config.seed)
            prompt = torch.randn(self.n, self.d_out, generator=gen)
        else:
            prompt = w.detach()[ids.to(w.device)].float().cpu()
        self.prompt = nn.Parameter(prompt.to(w.device, dtype))
        self._armed = False
        self._hook: vt.ModelHook | None = None
        host, model = vt.locate(geometry, self.method)
        self._host = (host,)  # plain attributes: not registered as sub-modules
        self._model = (model,)
        self._hook = vt.ModelHook(model, self._before, self._after)

    # -- the model-level hook --------------------------------------------------------------------
    def _before(self, kw: dict[str, Any]) -> dict[str, Any] | None:
        if not vt.running(self, self._host[0]):
            return None
        _, cache = vt.get_cache(kw)
        fresh = vt.cached_length(cache) == 0
        vt.extend_common(kw, self.n, fresh, labels=True)
        if fresh:
            embeds = kw.get("inputs_embeds")
            if embeds is None:  # [P; E(ids)] from the embedding itself, as inputs_embeds (PEFT's way)
                self._armed = True
                try:
                    kw["inputs_embeds"] = self._host[0](kw["input_ids"])
                finally:
                    self._armed = False
                kw["input_ids"] = None
            else:
                kw["inputs_embeds"] = self._prepend(embeds)
        return kw

    def _after(self) -> None:
        self._armed = False

    def restore_base(self) -> None:
        """Remove the hooks on the model (nothing else changed on the base)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._armed = False

    # -- the contract ------------------------------------------------------------------------------
    def _prepend(self, out: torch.Tensor) -> torch.Tensor:
        p = self.prompt.to(out.dtype)
        if out.dim() == 2:
            return torch.cat([p, out], dim=0)
        return torch.cat([p.expand(*out.shape[:-2], self.n, self.d_out), out], dim=-2)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if not self._armed:  # the embedding called outside a model call, or on a cached step
            return base_out
        return self._prepend(base_out)

    @classmethod
    def trainable_formula(cls, d_out: int, d_in: int, config: PromptTuningConfig) -> int:
        return config.num_virtual_tokens * d_out

    def extra_repr(self) -> str:
        return f"{self.method}: {self.n} virtual tokens of width {self.d_out}"

