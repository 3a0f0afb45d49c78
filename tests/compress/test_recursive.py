"""Relaxed Recursive Transformers: exact recovery at full rank, pure tying at rank 0, counts, files."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from paretune.compress.recursive import (DepthLayer, count_unique, load_recursive, make_recursive, recursive_counts,
                                         save_recursive)
from paretune.errors import AdapterFileError, ConfigError


def tiny_llama(layers: int = 4, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # distinct norm scales per layer, so tying visibly changes the model
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


IDS = torch.randint(2, 50, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("init", ["average", "stepwise"])
def test_full_rank_recovers_original(init):
    base = tiny_llama()
    ref = base(IDS).logits
    rec = make_recursive(copy.deepcopy(base), num_blocks=2, init=init, lora_rank=64)
    assert all(isinstance(m, DepthLayer) for m in rec.model.layers)
    torch.testing.assert_close(rec(IDS).logits, ref, atol=2e-5, rtol=1e-5)
    # generation with a key/value cache: one cache entry per depth, same tokens as the original
    assert torch.equal(rec.generate(IDS, max_new_tokens=5, do_sample=False),
                       base.generate(IDS, max_new_tokens=5, do_sample=False))


def test_stepwise_rank0_equals_repeated_layers():
    base = tiny_llama(layers=6)
    n, k = 6, 3
    ref_model = copy.deepcopy(base)
    ref_model.model.layers = nn.ModuleList([ref_model.model.layers[(d % k) * (n // k)] for d in range(n)])
    ref = ref_model(IDS, use_cache=False).logits
    rec = make_recursive(copy.deepcopy(base), num_blocks=k, init="stepwise", lora_rank=0)
    torch.testing.assert_close(rec(IDS, use_cache=False).logits, ref, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(ref, base(IDS).logits, atol=1e-3)  # tying does change the model
    blocks = [m.block for m in rec.model.layers]
    assert blocks[0] is blocks[3] and blocks[1] is blocks[4] and blocks[0] is not blocks[1]


def test_average_init_is_mean_of_tied_layers():
    base = tiny_llama()
    rec = make_recursive(copy.deepcopy(base), num_blocks=2, init="average", lora_rank=0)
    for b in range(2):
        block = rec.model.layers[b].block
        for name, p in block.named_parameters():
            tied = [dict(base.model.layers[d].named_parameters())[name] for d in (b, b + 2)]
            torch.testing.assert_close(p, (tied[0] + tied[1]) / 2)


def test_low_rank_lora_is_truncated_svd_of_residual():
    base = tiny_llama()
    rec = make_recursive(copy.deepcopy(base), num_blocks=2, init="average", lora_rank=3)
    depth = rec.model.layers[2]
    w_block = depth.block.self_attn.q_proj.weight
    residual = base.model.layers[2].self_attn.q_proj.weight - w_block
    u, s, vh = torch.linalg.svd(residual.double())
    best = (u[:, :3] * s[:3]) @ vh[:3]
    got = depth.lora_B["self_attn__q_proj__weight"] @ depth.lora_A["self_attn__q_proj__weight"]
    torch.testing.assert_close(got.double(), best, atol=1e-6, rtol=1e-5)


def test_parameter_counts():
    base = tiny_llama()
    per_layer = sum(p.numel() for p in base.model.layers[0].parameters())
    other = count_unique(base) - 4 * per_layer
    rec0 = make_recursive(copy.deepcopy(base), num_blocks=2, init="stepwise", lora_rank=0)
    assert count_unique(rec0) == other + 2 * per_layer
    r = 2
    rec = make_recursive(copy.deepcopy(base), num_blocks=2, init="average", lora_rank=r)
    lin = [m for m in base.model.layers[0].modules() if isinstance(m, nn.Linear)]
    vectors = per_layer - sum(m.weight.numel() for m in lin)
    relax = 4 * (sum(r * (m.in_features + m.out_features) for m in lin) + vectors)
    c = recursive_counts(rec)
    assert c == {"total": other + 2 * per_layer + relax, "shared_blocks": 2 * per_layer, "relaxation": relax,
                 "other": other}


def test_gradients_reach_shared_block_and_lora():
    rec = make_recursive(tiny_llama(), num_blocks=2, init="average", lora_rank=2)
    rec(IDS, labels=IDS).loss.backward()
    depth = rec.model.layers[1]
    assert depth.block.mlp.up_proj.weight.grad is not None and depth.block.mlp.up_proj.weight.grad.abs().sum() > 0
    assert depth.lora_B["mlp__up_proj__weight"].grad.abs().sum() > 0
    assert depth.vector_delta["input_layernorm__weight"].grad is not None


def test_save_load_round_trip(tmp_path):
    rec = make_recursive(tiny_llama(), num_blocks=2, init="average", lora_rank=2)
    with torch.no_grad():
        rec.model.layers[3].lora_A["mlp__down_proj__weight"].add_(0.1)  # a trained-looking change
    save_recursive(rec, tmp_path / "rec")
    fresh = tiny_llama(seed=5)
    load_recursive(fresh, tmp_path / "rec")
    torch.testing.assert_close(fresh(IDS).logits, rec(IDS).logits)
    assert fresh.model.layers[0].block is fresh.model.layers[2].block
    assert count_unique(fresh) == count_unique(rec)
    with pytest.raises(AdapterFileError, match="layers"):
        load_recursive(tiny_llama(layers=6), tmp_path / "rec")
    with pytest.raises(AdapterFileError, match="missing"):
        load_recursive(tiny_llama(), tmp_path / "nothing")


def test_bad_input():
    with pytest.raises(ConfigError, match="divisor"):
        make_recursive(tiny_llama(), num_blocks=3)
    with pytest.raises(ConfigError, match="init"):
        make_recursive(tiny_llama(), num_blocks=2, init="first")
    with pytest.raises(ConfigError, match="lora_rank"):
        make_recursive(tiny_llama(), num_blocks=2, lora_rank=-1)
    rec = make_recursive(tiny_llama(), num_blocks=2)
    with pytest.raises(ConfigError, match="already recursive"):
        make_recursive(rec, num_blocks=2)
    with pytest.raises(ConfigError, match="model.model.layers"):
        make_recursive(nn.Linear(3, 3), num_blocks=1)
    with pytest.raises(ConfigError, match="not recursive"):
        save_recursive(tiny_llama(), "/tmp/never-written")
