"""Prefix tuning (Li & Liang 2021): equality with PEFT's prefix tuning (same prefixes copied into
both) on a tiny grouped-query Llama (plain prefixes) and a multi-head Llama (the reparameterising
MLP), with a padded attention mask, labels and position ids; counts; save / load; removing the
adapter gives the base back (zero start is not defined for this method); generation; BERT (its
cache, against the base called with the prefixes in a cache by hand); bad input (a prefix length of
0, a model that takes no cache, a gap in the layers)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import paretune
from paretune.core.host import Host
from paretune.errors import ConfigError, ParetuneError, TargetError
from paretune.methods.prefix_tuning import PrefixTuningConfig, default_targets

import tiny_transformers as tiny

N = 3
H = 8  # encoder_hidden_size in the tests


def build_mha_llama(seed: int = 0):
    """tiny.build_llama16 with 2 key/value heads (no grouped-query attention): PEFT's MLP input width
    is then the hidden size, as ours."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=tiny.VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(cfg).float().eval()


@pytest.fixture
def batch():
    return tiny.padded_batch()


def deltas(model: nn.Module) -> list:
    return [layer.self_attn.deltas["default"] for layer in model.model.layers]


def peft_twin(build, model: nn.Module, projection: bool):
    """PEFT's prefix tuning on a fresh base with our tensors copied in: without the MLP its one
    (n, L·2·d_kv) embedding holds layer ℓ's keys then values at columns ℓ·2·d_kv...; with it, the
    last Linear's rows are laid out the same way."""
    from peft import PrefixTuningConfig as PeftConfig, get_peft_model

    twin = get_peft_model(build(), PeftConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                              prefix_projection=projection, encoder_hidden_size=H))
    enc = twin.prompt_encoder["default"]
    ds = deltas(model)
    with torch.no_grad():
        if projection:
            bank = ds[0].bank
            enc.embedding.weight.copy_(bank.prefix_embedding)
            enc.transform[0].weight.copy_(bank.prefix_w1)
            enc.transform[0].bias.copy_(bank.prefix_b1)
            enc.transform[2].weight.copy_(torch.cat([d.prefix_w2 for d in ds]))
            enc.transform[2].bias.copy_(torch.cat([d.prefix_b2 for d in ds]))
        else:
            enc.embedding.weight.copy_(torch.cat([torch.cat([d.prefix_key, d.prefix_value], 1) for d in ds], 1))
    return twin.eval()


# -- equality with PEFT ----------------------------------------------------------------------------

@pytest.mark.parametrize("build,projection", [(tiny.build_llama16, False), (build_mha_llama, True)],
                         ids=["gqa-plain", "mha-mlp"])
def test_equals_peft(batch, build, projection):
    ids, mask = batch
    model = build()
    paretune.adapt(model, "prefix-tuning", num_virtual_tokens=N, prefix_projection=projection,
                   encoder_hidden_size=H)
    twin = peft_twin(build, model, projection)
    pos = torch.arange(5).expand(2, 5)
    for kwargs in ({"attention_mask": mask, "labels": ids}, {"position_ids": pos}, {}):
        ours, theirs = model(input_ids=ids, **kwargs), twin(input_ids=ids, **kwargs)
        assert ours.logits.shape == (2, 5, tiny.VOCAB)  # the input's positions only
        torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
        if "labels" in kwargs:
            torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=0)
    base = build()(input_ids=ids, attention_mask=mask).logits
    assert (model(input_ids=ids, attention_mask=mask).logits - base).abs().max() > 1e-3


def test_the_cache_holds_each_layers_prefix_in_front(batch):
    """The prefixes reach layer ℓ as its first n keys / values (an independent reshaping of P)."""
    ids, _ = batch
    model = tiny.build_llama16()
    paretune.adapt(model, "prefix-tuning", num_virtual_tokens=N)
    out = model(input_ids=ids, use_cache=True)
    for d in deltas(model):
        keys, values = out.cache.layers[d.layer_idx].keys, out.cache.layers[d.layer_idx].values
        assert keys.shape == (2, 1, N + 5, 8)  # 1 key/value head of 8
        torch.testing.assert_close(keys[0, 0, :N], d.prefix_key.detach(), atol=0, rtol=0)
        torch.testing.assert_close(values[1, 0, :N], d.prefix_value.detach(), atol=0, rtol=0)


# -- counts ----------------------------------------------------------------------------------------

def test_counts():
    gqa = tiny.build_llama16()  # d_kv = 8, 2 layers
    paretune.adapt(gqa, "prefix-tuning", num_virtual_tokens=5)
    cost = paretune.count(gqa)
    assert cost["trainable"] == cost["formula"] == 2 * 5 * 8 * 2
    mha = build_mha_llama()  # d_kv = d = 16
    paretune.adapt(mha, "prefix-tuning", num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=H)
    cost = paretune.count(mha)
    per_layer = H * 2 * 16 + 2 * 16
    shared = 5 * 16 + 16 * H + H
    assert cost["trainable"] == cost["formula"] == 2 * per_layer + shared
    assert cost["stored_bytes"] == 4 * cost["trainable"]  # the shared tensors saved once
    assert sum(p.numel() for p in mha.parameters() if p.requires_grad) == cost["trainable"]


def test_default_targets():
    assert default_targets(tiny.build_llama16()) == r"(?:.*\.)?layers\.\d+\.self_attn"
    gpt2 = tiny.build_gpt2(layers=2)
    paretune.adapt(gpt2, "prefix-tuning", num_virtual_tokens=N)
    assert paretune.adapters(gpt2)["default"].targets == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert default_targets(tiny.build_bert()) == r"(?:.*\.)?layer\.\d+\.attention\.self"
    with pytest.raises(TargetError, match="targets="):
        default_targets(nn.Sequential(nn.Linear(2, 2)))


# -- the adapter's life ----------------------------------------------------------------------------

def test_inactive_removed_and_unloaded_adapters_give_the_base(batch):
    ids, mask = batch
    base = tiny.build_llama16()(input_ids=ids, attention_mask=mask).logits
    model = tiny.build_llama16()
    paretune.adapt(model, "prefix-tuning", num_virtual_tokens=N)
    paretune.set_active(model, [])
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, base, atol=0, rtol=0)
    paretune.remove(model, "default")
    assert tiny.hooks_of(model) == 0
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, base, atol=0, rtol=0)
    paretune.adapt(model, "prefix-tuning", num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=H)
    paretune.unload(model)
    assert tiny.hooks_of(model) == 0 and not any(isinstance(m, Host) for m in model.modules())
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, base, atol=0, rtol=0)


@pytest.mark.parametrize("projection", [False, True])
def test_save_load_gives_the_same_outputs(batch, tmp_path, projection):
    ids, mask = batch
    model = tiny.build_llama16()
    paretune.adapt(model, "prefix-tuning", num_virtual_tokens=N, prefix_projection=projection,
                   encoder_hidden_size=H, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.5)  # as if trained
    paretune.save(model, tmp_path / "a")
    fresh = tiny.build_llama16()
    paretune.load(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(input_ids=ids, attention_mask=mask).logits,
                               model(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)


def test_gradients_reach_the_prefixes_only(batch):
    ids, mask = batch
    model = build_mha_llama()
    paretune.adapt(model, "prefix-tuning", num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=H)
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".deltas.default." in n for n in got) and len(got) == 2 * 2 + 3


def test_generation_equals_greedy_decoding_without_cache(batch):
    ids, _ = batch
    model = tiny.build_llama16()
    paretune.adapt(model, "prefix-tuning", num_virtual_tokens=N)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        x = ids
        for _ in range(4):
            logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits
            x = torch.cat([x, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        base = tiny.build_llama16().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                             do_sample=False)
    assert torch.equal(out, x)
    assert not torch.equal(out, base)


# -- bad input -------------------------------------------------------------------------------------

def test_a_prefix_length_of_zero_is_refused():
    model = tiny.build_llama16()
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        paretune.adapt(model, "prefix-tuning", num_virtual_tokens=0)
    assert paretune.adapters(model) == {} and tiny.hooks_of(model) == 0
    assert PrefixTuningConfig().num_virtual_tokens == 10


def test_a_model_that_takes_no_cache_is_refused_unchanged(batch):
    ids, mask = batch
    model = tiny.NoCacheModel()
    before = model(ids, mask)
    with pytest.raises(TargetError, match="takes no key/value cache"):
        paretune.adapt(model, "prefix-tuning", targets=r"inner\.model\.layers\.\d+\.self_attn")
    assert paretune.adapters(model) == {} and tiny.hooks_of(model) == 0
    assert not any(isinstance(m, Host) for m in model.modules())
    torch.testing.assert_close(model(ids, mask), before, atol=0, rtol=0)


def test_bert_gets_the_prefixes_through_its_cache(batch):
    """On a BERT classifier (its forward passes cache= on to the encoder through **kwargs): the
    outputs equal the base called with a cache holding each layer's P_k, P_v (2 heads of 8) and a
    mask with n ones in front."""
    from transformers import DynamicCache

    ids, mask = batch
    model = tiny.build_bert(layers=2)
    paretune.adapt(model, "prefix-tuning", num_virtual_tokens=N)
    assert paretune.adapters(model)["default"].targets == [
        "bert.encoder.layer.0.attention.self", "bert.encoder.layer.1.attention.self"]
    assert paretune.count(model)["trainable"] == paretune.count(model)["formula"] == 2 * 2 * N * 16
    cache = DynamicCache()
    for i, layer in enumerate(model.bert.encoder.layer):
        d = layer.attention.self.deltas["default"]
        k, v = (t.detach().view(N, 2, 8).permute(1, 0, 2).expand(2, -1, -1, -1) for t in (d.prefix_key, d.prefix_value))
        cache.update(k, v, i)
    longer = torch.cat([torch.ones(2, N, dtype=torch.long), mask], 1)
    ref = tiny.build_bert(layers=2)(input_ids=ids, attention_mask=longer, cache=cache).logits
    out = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert (out - tiny.build_bert(layers=2)(input_ids=ids, attention_mask=mask).logits).abs().max() > 1e-4


def test_a_block_without_a_cache_is_refused():
    model = tiny.build_llama16()
    with pytest.raises(TargetError, match="takes no key/value cache"):
        paretune.adapt(model, "prefix-tuning", targets=["mlp"])
    assert not any(isinstance(m, Host) for m in model.modules()) and tiny.hooks_of(model) == 0


def test_a_gap_in_the_layers_is_a_clear_error(batch):
    ids, _ = batch
    model = tiny.build_llama16()
    paretune.adapt(model, "prefix-tuning", targets=["model.layers.1.self_attn"], num_virtual_tokens=N)
    with pytest.raises(ParetuneError, match="without gaps"):
        model(input_ids=ids)


def test_merge_is_refused():
    model = tiny.build_llama16()
    paretune.adapt(model, "prefix-tuning", num_virtual_tokens=N)
    with pytest.raises(ParetuneError, match="cannot be merged"):
        paretune.merge(model)
