"""Tiny random transformers models for the adapter-module tests (BERT, GPT-2 and a 16-wide Llama),
built from configs with fixed seeds (CPU, no download), and the last hidden states of a run
(imported as a plain module: pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 50


def build_bert(seed: int = 0, hidden: int = 16, layers: int = 1):
    """A random BERT classifier: 2 heads, intermediate 2·hidden, no dropout, 3 labels."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
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
