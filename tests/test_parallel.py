"""paretune.parallel: the same inputs through several adapters in one pass equal each adapter alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import paretune
from paretune.errors import ParetuneError

VOCAB = 50


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def randomize(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".deltas." in name:  # every adapter's tensors, active or not
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def alone(model: nn.Module, name: str | None, **inputs) -> torch.Tensor:
    if name is None:
        paretune.set_active(model, [])
    else:
        paretune.set_active(model, name)
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def test_parallel_equals_each_adapter_alone():
    model = llama()
    paretune.adapt(model, "lora", name="a", r=2, targets=["q_proj", "v_proj"])
    paretune.adapt(model, "ia3", name="b")
    randomize(model)
    ids = torch.randint(2, VOCAB, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        outs = paretune.parallel(model, ["a", None, "b"], input_ids=ids, attention_mask=mask)
    assert len(outs) == 3 and all(o.logits.shape == (3, 6, VOCAB) for o in outs)
    expected = [alone(model, n, input_ids=ids, attention_mask=mask) for n in ["a", None, "b"]]
    for got, want in zip(outs, expected):
        torch.testing.assert_close(got.logits, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected[0], expected[1])  # the adapters do change the outputs


def test_parallel_on_a_plain_module_with_positional_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    paretune.adapt(model, "lora", name="a", r=2, targets=["0", "2"])
    paretune.adapt(model, "lora", name="b", r=1, targets=["2"])
    randomize(model)
    x = torch.randn(5, 4)
    with torch.no_grad():
        got = paretune.parallel(model, ["b", "a"], x)
        paretune.set_active(model, "a")
        want_a = model(x)
        paretune.set_active(model, "b")
        want_b = model(x)
    torch.testing.assert_close(got[0], want_b)
    torch.testing.assert_close(got[1], want_a)


def test_parallel_bad_input():
    model = nn.Sequential(nn.Linear(4, 2))
    paretune.adapt(model, "lora", name="a", r=1, targets=["0"])
    with pytest.raises(ParetuneError, match="at least one adapter"):
        paretune.parallel(model, [], torch.randn(2, 4))
    with pytest.raises(ParetuneError, match="tensor input"):
        paretune.parallel(model, ["a"], [1.0, 2.0])
    with pytest.raises(ParetuneError, match="zz"):
        paretune.parallel(model, ["a", "zz"], torch.randn(2, 4))


def test_parallel_refuses_virtual_tokens():
    model = llama()
    paretune.adapt(model, "prompt-tuning", name="p", num_virtual_tokens=2)
    ids = torch.randint(2, VOCAB, (2, 4))
    with pytest.raises(ParetuneError):
        paretune.parallel(model, ["p", None], input_ids=ids)
