"""k-bit adapters (Jie et al. 2023): quantisation-aware training of an adapter's weight tensors,
packed storage, and loading that serves exactly the dequantised weights."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from scipy.stats import norm

import paretune
from paretune.core import quant
from paretune.core.host import Host
from paretune.errors import AdapterFileError, ConfigError, ParetuneError


def test_one_bit_codes_are_the_half_normal_medians():
    values, bounds = quant.codebook(1)
    assert bounds == (0.0,)
    assert values == pytest.approx((norm.ppf(0.25), norm.ppf(0.75)), abs=1e-12)


@pytest.mark.parametrize("bits", [2, 4])
def test_codes_are_a_fixed_point_of_median_cells(bits):
    """Each code is the N(0, 1) median of its cell and each boundary the midpoint of its codes."""
    values, bounds = quant.codebook(bits)
    assert len(values) == 2**bits and list(values) == sorted(values)
    edges = [0.0, *norm.cdf(bounds), 1.0]
    for i, v in enumerate(values):
        assert v == pytest.approx(norm.ppf((edges[i] + edges[i + 1]) / 2), abs=1e-6)
    assert list(bounds) == pytest.approx([(a + b) / 2 for a, b in zip(values, values[1:])], abs=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_unpack_round_trip(bits):
    idx = torch.randint(0, 2**bits, (7, 5), generator=torch.Generator().manual_seed(bits))
    packed = quant.pack(idx, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(35 * bits / 8)
    assert torch.equal(quant.unpack(packed, bits, 35).view(7, 5), idx)


def test_kbit_forward_quantises_and_backward_is_straight_through():
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    q = quant.KBit(1)(w)
    mean, std = w.detach().mean(), w.detach().std()
    codes = torch.tensor(quant.codebook(1)[0], dtype=torch.float64)
    want = torch.where(w.detach() > mean, codes[1], codes[0]) * std + mean
    torch.testing.assert_close(q.detach(), want)
    assert q.detach().unique().numel() == 2
    g = torch.randn(6, 4, dtype=torch.float64)
    (gw,) = torch.autograd.grad(q, w, g)
    # the reference's straight-through form: wb = q(z).data + z - z.data; weight = wb·σ + μ (σ, μ of w)
    w2 = w.detach().clone().requires_grad_()
    m2, s2 = w2.mean(), w2.std()
    z2 = (w2 - m2) / (s2 + quant.EPS)
    ((want - mean) / std + (z2 - z2.detach())).mul(s2).add(m2).backward(g)
    torch.testing.assert_close(gw, w2.grad)
    assert gw.abs().min() > 0  # a hard quantiser would pass no gradient


def adapted_llama(make_llama, bits=1, **options):
    model = make_llama()
    paretune.adapt(model, "lora", r=4, bits=bits, **options)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".deltas." in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(n)))
    return model


def test_a_one_bit_lora_trains_quantised(make_llama, ids):
    model = adapted_llama(make_llama)
    for _, host in paretune.core.inject.hosts(model):
        d = host.deltas["default"]
        assert d.A.unique().numel() <= 2 and d.B.unique().numel() <= 2
    model(ids).logits.square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "original" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_the_file_is_a_32nd_plus_scales_and_loads_to_the_same_outputs(make_llama, ids, tmp_path):
    model = adapted_llama(make_llama)
    with torch.no_grad():
        ref = model(ids).logits
    paretune.save(model, tmp_path / "q")
    tensors = load_file(str(tmp_path / "q" / "adapter.safetensors"))
    sizes = [t.numel() for _, h in paretune.core.inject.hosts(model) for t in (h.deltas["default"].A,
                                                                                 h.deltas["default"].B)]
    file_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert file_bytes == sum(math.ceil(n / 8) for n in sizes) + 8 * len(sizes)  # 1 bit each, plus μ and σ
    assert file_bytes <= sum(sizes) * 4 / 32 + 8 * len(sizes)  # a 32nd of float32, plus the scales
    assert paretune.count(model)["stored_bytes"] == file_bytes
    fresh = make_llama()
    paretune.load(fresh, tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, ref, atol=0, rtol=0)  # the dequantised weights exactly
    assert paretune.adapters(fresh)["default"].method == "lora"


def test_refused_where_nothing_or_something_else_is_stored(make_llama):
    model = make_llama()
    with pytest.raises(ParetuneError, match="no weight tensor"):
        paretune.adapt(model, "ia3", bits=1)  # only scaling vectors
    assert not any(isinstance(m, Host) for m in model.modules()) and paretune.adapters(model) == {}
    with pytest.raises(ConfigError, match="stores more"):
        paretune.adapt(model, "randlora", r=4, bits=1)
    with pytest.raises(ConfigError, match="bits=3"):
        paretune.adapt(model, "lora", bits=3)
    assert all(p.requires_grad for p in model.parameters())


def test_hot_swap_needs_the_same_bits(make_llama, tmp_path):
    paretune.save(adapted_llama(make_llama, bits=2), tmp_path / "two")
    model = adapted_llama(make_llama, bits=1)
    with pytest.raises(AdapterFileError, match="2-bit adapter"):
        paretune.hot_swap(model, tmp_path / "two")


@pytest.mark.parametrize("bits", [1, 4])
def test_any_method_with_weight_matrices_bottleneck_too(make_llama, ids, tmp_path, bits):
    model = make_llama()
    paretune.adapt(model, "bottleneck", bottleneck=4, bits=bits)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".deltas." in n:
                p.normal_(0, 0.3)
        ref = model(ids).logits
    assert paretune.count(model)["trainable"] == paretune.count(model)["formula"]
    paretune.save(model, tmp_path / "b")
    fresh = make_llama()
    paretune.load(fresh, tmp_path / "b")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, ref, atol=0, rtol=0)
    biases = sum(h.deltas["default"].up_bias.numel() * 4 + h.deltas["default"].down_bias.numel() * 4
                 for _, h in paretune.core.inject.hosts(model))
    packed = sum(math.ceil(h.deltas["default"].up.numel() * bits / 8) + math.ceil(h.deltas["default"].down.numel()
                 * bits / 8) + 16 for _, h in paretune.core.inject.hosts(model))
    assert paretune.count(fresh)["stored_bytes"] == biases + packed
