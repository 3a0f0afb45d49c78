"""Adapters on a quantised base (QLoRA's arrangement): zero start, gradients only in the adapter,
merge / unmerge with the requantisation warning, refusal of PiSSA."""

from __future__ import annotations

import pytest
import torch

import paretune
from paretune.compress import QuantizedLinear, quantize
from paretune.compress.quantized import relative_error
from paretune.core.geometry import QuantizedMergeWarning
from paretune.errors import TargetError

VOCAB = 50
IDS = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(cfg).float().eval()


def quantized(bits: int = 4):
    return quantize(tiny_llama(), bits=bits, group_size=8, progress=False)


@pytest.mark.parametrize("method, options", [
    ("lora", {"r": 2}),
    ("vera", {"r": 2}),
    ("ia3", {}),
])
def test_adapter_on_a_quantized_base_starts_at_zero_and_trains_only_itself(method, options):
    model = quantized()
    with torch.no_grad():
        before = model(IDS).logits
    targets = ["q_proj", "v_proj", "down_proj"] if method != "vera" else ["q_proj", "o_proj"]
    extra = {"feedforward_modules": ["down_proj"]} if method == "ia3" else {}
    paretune.adapt(model, method, targets=targets, **options, **extra)
    hosts = [m for m in model.modules() if isinstance(m, paretune.core.host.Host)]
    assert hosts and all(isinstance(h.base, QuantizedLinear) for h in hosts)
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, before, atol=1e-6)  # the adapter starts at zero change
    model.train()
    model(IDS, labels=IDS).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".deltas." in n for n in trainable)
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_lora_training_moves_the_output_and_leaves_the_codes():
    model = quantized()
    packed = {n: m.packed.clone() for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    paretune.adapt(model, "lora", r=2, targets=["q_proj", "v_proj"])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    first = None
    for _ in range(5):
        loss = model(IDS, labels=IDS).loss
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first
    for n, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            assert torch.equal(m.packed, packed[n.removesuffix(".base")])


def randomize_adapter(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("bits", [8, 2])
def test_merge_requantizes_and_warns_with_the_measured_error(bits):
    model = quantized(bits)
    paretune.adapt(model, "lora", r=2, targets=["q_proj"])
    randomize_adapter(model)
    host = model.model.layers[0].self_attn.q_proj
    exact = host.base.dequantized_weight() + host.deltas["default"].delta_weight().detach()
    with torch.no_grad():
        adapted = model(IDS).logits
    quantised_hosts = [n for n, m in model.named_modules() if n.endswith("q_proj") and isinstance(
        getattr(m, "base", None), type(host.base))]
    with pytest.warns(QuantizedMergeWarning, match=rf"merging adapter 'default' into {len(quantised_hosts)} quantised") as rec:
        paretune.merge(model)
    err = relative_error(host.base.dequantized_weight(), exact)
    # one summary warning for every quantised q_proj, each layer's measured error in it
    summary = [w.message for w in rec if isinstance(w.message, QuantizedMergeWarning)]
    assert len(summary) == 1
    per_layer = {name: e for name, e, _ in summary[0].layers}
    assert set(per_layer) == set(quantised_hosts) and "model.layers.0.self_attn.q_proj" in per_layer
    assert per_layer["model.layers.0.self_attn.q_proj"] == pytest.approx(err, rel=1e-6)
    assert f"{max(per_layer.values()):.3g}" in str(summary[0])
    assert 0 < err < {8: 0.01, 2: 0.5}[bits]
    # every entry within half a scale of W + ΔW
    s = host.base.scales.float().repeat_interleave(8, dim=1)
    assert bool(((host.base.dequantized_weight() - exact).abs() <= s / 2 + 1e-6).all())
    with torch.no_grad():
        merged = model(IDS).logits
    assert torch.allclose(merged, adapted, atol={8: 0.05, 2: 5.0}[bits])


def test_unmerge_is_approximate_and_warns():
    model = quantized(8)
    original = model.model.layers[0].self_attn.q_proj.dequantized_weight().clone()
    paretune.adapt(model, "lora", r=2, targets=["q_proj"])
    randomize_adapter(model)
    base = model.model.layers[0].self_attn.q_proj.base
    with pytest.warns(QuantizedMergeWarning):
        paretune.merge(model)
    s_merge = base.scales.float().repeat_interleave(8, dim=1)
    with pytest.warns(QuantizedMergeWarning, match="unmerging"):
        paretune.unmerge(model)
    s_back = base.scales.float().repeat_interleave(8, dim=1)
    back = base.dequantized_weight()
    # not the original codes: each of the two requantisations adds at most half a scale per entry
    assert relative_error(back, original) > 0
    assert bool(((back - original).abs() <= s_merge / 2 + s_back / 2 + 1e-5).all())


def test_pissa_is_refused_on_a_quantized_base_and_the_model_is_untouched():
    model = quantized()
    packed = model.model.layers[0].self_attn.q_proj.packed.clone()
    with pytest.raises(TargetError, match="changes the base weight.*lora"):
        paretune.adapt(model, "pissa", r=2, targets=["q_proj"])
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantizedLinear) and torch.equal(q.packed, packed)
    assert paretune.adapters(model) == {}
