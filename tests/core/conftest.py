"""Tiny models for the engine tests, built from configs with fixed seeds (CPU, no download).

Fixtures are factories: two calls give two identical, independent models, so a test can adapt
one and keep the other as the untouched base (or the PEFT side of a comparison)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

VOCAB = 50


def build_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(cfg).float().eval()


def build_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def build_bert(seed: int = 0, hidden: int = 16):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=2 * hidden, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, max_position_embeddings=32)
    return BertForSequenceClassification(cfg).eval()


class Toy(nn.Module):
    """An Embedding, a Linear and a Conv2d (stride 2, padding 1): every non-GPT-2 host kind."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lin = nn.Linear(8, 6)
        self.conv = nn.Conv2d(3, 4, kernel_size=3, stride=2, padding=1)

    def forward(self, ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.lin(self.emb(ids)).flatten(1), self.conv(image).flatten(1)], dim=1)


def build_toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy().eval()


@pytest.fixture
def make_llama():
    return build_llama


@pytest.fixture
def make_gpt2():
    return build_gpt2


@pytest.fixture
def make_bert():
    return build_bert


@pytest.fixture
def make_toy():
    return build_toy


@pytest.fixture
def ids():
    return torch.randint(2, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def toy_inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 20, (2, 5), generator=g), torch.randn(2, 3, 6, 6, generator=g)


@pytest.fixture
def perturb():
    return randomize


def randomize(model: nn.Module, std: float = 0.2, seed: int = 5) -> None:
    """Give every trainable tensor random values, so no delta is zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
