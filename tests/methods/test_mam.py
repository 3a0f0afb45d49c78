"""MAM adapter (He et al. 2022): prefix tuning on the attention + a scaled parallel adapter on the
feed-forward sub-layer as one adapter. Checked: at its start (W_up = 0) it equals PEFT's prefix
tuning with the same prefixes; once moved it equals the two methods stacked (a prefix-tuning
adapter and a scaled-parallel bottleneck adapter with the same tensors); counts; one save / load;
removing it gives the base back (zero start is not defined: the prefixes act from the start);
BERT; bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import paretune
from paretune.core.host import Host
from paretune.errors import ConfigError, ParetuneError, TargetError
from paretune.methods.mam import MamConfig, default_targets

import tiny_transformers as tiny

N, M = 3, 4


@pytest.fixture
def batch():
    return tiny.padded_batch()


def parts(model: nn.Module, kind: str) -> list:
    return [getattr(layer, kind).deltas["default"].part for layer in model.model.layers]


def moved(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        g = torch.Generator().manual_seed(9)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def test_defaults_are_the_papers():
    c = MamConfig()
    assert (c.num_virtual_tokens, c.bottleneck, c.scaling) == (30, 512, 4.0)


def test_at_the_start_it_is_peft_prefix_tuning(batch):
    from peft import PrefixTuningConfig, get_peft_model

    ids, mask = batch
    model = tiny.build_llama16()
    paretune.adapt(model, "mam", num_virtual_tokens=N, bottleneck=M)
    twin = get_peft_model(tiny.build_llama16(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    with torch.no_grad():
        twin.prompt_encoder["default"].embedding.weight.copy_(
            torch.cat([torch.cat([d.prefix_key, d.prefix_value], 1) for d in parts(model, "self_attn")], 1))
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                               twin(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)
    assert all(torch.count_nonzero(d.up) == 0 for d in parts(model, "mlp"))


def test_equals_prefix_tuning_and_a_scaled_parallel_adapter_stacked(batch):
    ids, mask = batch
    model = tiny.build_llama16()
    paretune.adapt(model, "mam", num_virtual_tokens=N, bottleneck=M)
    moved(model)
    pair = tiny.build_llama16()
    paretune.adapt(pair, "prefix-tuning", name="prefix", num_virtual_tokens=N)
    paretune.adapt(pair, "bottleneck", name="adapter", style="scaled-parallel", bottleneck=M)
    with torch.no_grad():
        for ours, layer in zip(model.model.layers, pair.model.layers):
            pre, ffn = ours.self_attn.deltas["default"].part, ours.mlp.deltas["default"].part
            layer.self_attn.deltas["prefix"].prefix_key.copy_(pre.prefix_key)
            layer.self_attn.deltas["prefix"].prefix_value.copy_(pre.prefix_value)
            for name in ("down", "down_bias", "up", "up_bias"):
                getattr(layer.mlp.deltas["adapter"], name).copy_(getattr(ffn, name))
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                               pair(input_ids=ids, attention_mask=mask).logits, atol=1e-6, rtol=0)


def test_counts():
    model = tiny.build_llama16()  # d = 16, d_kv = 8, 2 layers
    paretune.adapt(model, "mam", num_virtual_tokens=5, bottleneck=M)
    cost = paretune.count(model)
    per_layer = 2 * 5 * 8 + (2 * 16 * M + M + 16)
    assert cost["trainable"] == cost["formula"] == 2 * per_layer
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == cost["trainable"]


def test_default_targets_are_attention_and_feed_forward_blocks():
    model = tiny.build_llama16()
    paretune.adapt(model, "mam", num_virtual_tokens=N, bottleneck=M)
    assert paretune.adapters(model)["default"].targets == [
        "model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn", "model.layers.1.mlp"]
    assert default_targets(tiny.build_bert()) == (r"(?:(?:.*\.)?layer\.\d+\.attention\.self)|"
                                                  r"(?:(?:.*\.)?layer\.\d+\.output)")
    with pytest.raises(TargetError):
        default_targets(nn.Sequential(nn.Linear(2, 2)))


def test_one_save_load_and_removal_gives_the_base(batch, tmp_path):
    ids, mask = batch
    base = tiny.build_llama16()(input_ids=ids, attention_mask=mask).logits
    model = tiny.build_llama16()
    paretune.adapt(model, "mam", num_virtual_tokens=N, bottleneck=M, prefix_projection=True, encoder_hidden_size=8)
    moved(model)
    expected = model(input_ids=ids, attention_mask=mask).logits
    paretune.save(model, tmp_path / "a")
    fresh = tiny.build_llama16()
    paretune.load(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(input_ids=ids, attention_mask=mask).logits, expected, atol=0, rtol=0)
    paretune.set_active(model, [])
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, base, atol=0, rtol=0)
    paretune.unload(model)
    assert tiny.hooks_of(model) == 0 and not any(isinstance(m, Host) for m in model.modules())
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, base, atol=0, rtol=0)


@pytest.mark.parametrize("options", [{"num_virtual_tokens": 0}, {"bottleneck": 0}, {"scaling": -1.0}])
def test_bad_options_are_refused(options):
    model = tiny.build_llama16()
    with pytest.raises(ConfigError):
        paretune.adapt(model, "mam", **options)
    assert paretune.adapters(model) == {} and tiny.hooks_of(model) == 0


def test_bert_gets_prefixes_and_the_adapter_before_the_layernorm(batch):
    """On BERT: the attention's prefixes and the parallel adapter on BertOutput; at the start (W_up = 0)
    the same outputs as prefix tuning alone with the same prefixes."""
    ids, mask = batch
    model = tiny.build_bert(layers=2)
    paretune.adapt(model, "mam", num_virtual_tokens=N, bottleneck=M)
    alone = tiny.build_bert(layers=2)
    paretune.adapt(alone, "prefix-tuning", num_virtual_tokens=N)
    with torch.no_grad():
        for ours, theirs in zip(model.bert.encoder.layer, alone.bert.encoder.layer):
            for name in ("prefix_key", "prefix_value"):
                getattr(theirs.attention.self.deltas["default"], name).copy_(
                    getattr(ours.attention.self.deltas["default"].part, name))
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                               alone(input_ids=ids, attention_mask=mask).logits, atol=1e-6, rtol=0)
    cost = paretune.count(model)
    assert cost["trainable"] == cost["formula"] == 2 * (2 * N * 16 + 2 * 16 * M + M + 16)


def test_a_model_that_takes_no_cache_is_refused_unchanged():
    model = tiny.NoCacheModel()
    with pytest.raises(TargetError, match="cache"):
        paretune.adapt(model, "mam", targets=r"inner\.model\.layers\.\d+\.(self_attn|mlp)", bottleneck=M)
    assert paretune.adapters(model) == {} and not any(isinstance(m, Host) for m in model.modules())
    assert tiny.hooks_of(model) == 0


def test_merge_is_refused():
    model = tiny.build_llama16()
    paretune.adapt(model, "mam", num_virtual_tokens=N, bottleneck=M)
    with pytest.raises(ParetuneError, match="cannot be merged"):
        paretune.merge(model)
