"""Tiny models for the method tests, built from configs with fixed seeds (CPU, no download).

Every fixture here is a *factory*: calling it twice gives two identical, independent models,
so a test can adapt one and keep the other as the untouched base (or load a saved adapter
onto a fresh copy).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from docs_example import DOCS_EXAMPLE, docs_example_registered

LLAMA_VOCAB = 64


def build_llama(seed: int = 0):
    """A random 2-layer Llama: hidden 32, 4 heads (2 KV heads), MLP 64, vocab 64, float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=LLAMA_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    model = LlamaForCausalLM(cfg).float()
    model.eval()
    return model


def build_mlp(seed: int = 0) -> nn.Sequential:
    """A toy MLP: 8 -> 16 -> 12 -> 4 with biases."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4))
    model.eval()
    return model


class MixedKinds(nn.Module):
    """One module of every other host kind: Embedding, GPT-2 Conv1D, Conv2d."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(20, 8)
        self.proj = Conv1D(12, 8)  # GPT-2 layout: weight (in=8, out=12)
        self.conv = nn.Conv2d(3, 5, kernel_size=3, padding=1)

    def forward(self, ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(self.emb(ids)).flatten(1)  # (batch, seq * 12)
        pixels = self.conv(image).flatten(1)  # (batch, 5 * h * w)
        return torch.cat([tokens, pixels], dim=1)


def build_mixed(seed: int = 0) -> MixedKinds:
    torch.manual_seed(seed)
    model = MixedKinds()
    with torch.no_grad():  # Conv1D starts at std 0.02; give every weight a comparable scale
        model.proj.weight.normal_(0, 0.3)
    model.eval()
    return model


@pytest.fixture
def make_llama():
    return build_llama


@pytest.fixture
def make_mlp():
    return build_mlp


@pytest.fixture
def make_mixed():
    return build_mixed


@pytest.fixture
def llama_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(2, LLAMA_VOCAB, (2, 7), generator=g)


@pytest.fixture
def mlp_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 8, generator=g)


@pytest.fixture
def mixed_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 20, (2, 6), generator=g), torch.randn(2, 3, 6, 6, generator=g)


@pytest.fixture(autouse=True)
def _docs_example_method(request):
    """A test parametrized with the docs example's method name runs with that method registered."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("method") != DOCS_EXAMPLE:
        yield
        return
    with docs_example_registered():
        yield
