"""BitNet b1.58: the BitLinear forward against the paper's formulas, straight-through gradients,
conversion, freezing to int8 ternary codes, files."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from paretune.compress.bitnet import (BitLinear, TernaryLinear, freeze_ternary, load_ternary,
                                      prepare_bitnet_training, save_ternary, ternary_summary, to_bitnet)
from compress_models import tiny_llama
from paretune.errors import AdapterFileError, ConfigError, TargetError


def formula(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """The paper's forward in float64 NumPy, written out independently."""
    gamma = np.mean(np.abs(w))
    w_t = np.clip(np.round(w / (gamma + eps)), -1, 1) * gamma
    m = np.maximum(np.max(np.abs(x), axis=-1, keepdims=True), eps)
    x_q = np.clip(np.round(x * 127 / m), -128, 127) * m / 127
    return x_q @ w_t.T + b


def test_forward_equals_formula():
    torch.manual_seed(0)
    lin = nn.Linear(24, 10)
    bit = BitLinear.from_linear(lin)
    x = torch.randn(3, 5, 24)
    x[0, 0] = 0.0  # a token of zeros: no NaN
    got = bit(x).detach().double().numpy()
    want = formula(x.double().numpy(), lin.weight.detach().double().numpy(), lin.bias.detach().double().numpy())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.all(np.isfinite(got))


def test_weights_ternary_and_activations_8bit():
    torch.manual_seed(1)
    bit = BitLinear(16, 8, bias=False)
    w = bit.weight.detach()
    gamma = w.abs().mean()
    x = torch.randn(64, 16)  # more tokens than inputs: the weight is identifiable below
    x_q = bit.quantized_input(x).detach()
    levels = x_q * 127 / x.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)  # integer levels, one scale per token
    assert levels.abs().max() <= 127 + 1e-4
    out = bit(x).detach()
    w_eff = torch.linalg.lstsq(x_q.double(), out.double()).solution.T.float()  # the weight the layer really used
    torch.testing.assert_close(w_eff / gamma, (w_eff / gamma).round(), atol=1e-3, rtol=0)
    assert set((w_eff / gamma).round().unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_gradients_pass_straight_through():
    torch.manual_seed(2)
    bit = BitLinear(12, 6)
    x = torch.randn(5, 12, requires_grad=True)
    g = torch.randn(5, 6)
    (bit(x) * g).sum().backward()
    # reference: the quantised tensors as leaves; STE means the same gradients reach W and x
    w_q = (torch.clamp(torch.round(bit.weight / (bit.weight.abs().mean() + 1e-5)), -1, 1)
           * bit.weight.abs().mean()).detach().requires_grad_()
    m = x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    x_q = (torch.clamp(torch.round(x * 127 / m), -128, 127) * m / 127).detach().requires_grad_()
    (nn.functional.linear(x_q, w_q, bit.bias.detach()) * g).sum().backward()
    torch.testing.assert_close(bit.weight.grad, w_q.grad)
    torch.testing.assert_close(x.grad, x_q.grad)


def test_training_lowers_loss():
    torch.manual_seed(3)
    bit = BitLinear(8, 4)
    target = nn.Linear(8, 4)
    x = torch.randn(64, 8)
    y = target(x).detach()
    opt = torch.optim.Adam(bit.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = (bit(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def test_to_bitnet_converts_linear_layers_but_head():
    model = tiny_llama()
    ids = torch.randint(2, 50, (2, 7))
    to_bitnet(model)
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["lm_head"] == "Linear"
    assert kinds["model.layers.0.self_attn.q_proj"] == "BitLinear"
    assert sum(v == "BitLinear" for v in kinds.values()) == 2 * 7
    assert torch.isfinite(model(ids).logits).all()
    only = to_bitnet(tiny_llama(), targets=["q_proj", "v_proj"])
    assert sum(isinstance(m, BitLinear) for m in only.modules()) == 4
    with pytest.raises(TargetError, match="matched no Linear"):
        to_bitnet(tiny_llama(), targets=["nope"])
    with pytest.raises(ConfigError, match="only once"):
        to_bitnet(model)
    with pytest.raises(ConfigError, match="act_bits"):
        to_bitnet(tiny_llama(), act_bits=1)


def test_gpt2_conv1d_weight_is_transposed():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(4)
    conv = Conv1D(6, 10)  # nf=6 outputs, nx=10 inputs; weight (10, 6)
    bit = BitLinear.from_linear(conv)
    x = torch.randn(3, 10)
    want = formula(x.double().numpy(), conv.weight.detach().double().numpy().T, conv.bias.detach().double().numpy())
    np.testing.assert_allclose(bit(x).detach().double().numpy(), want, rtol=1e-4, atol=1e-5)


def test_prepare_for_training_and_freeze(tmp_path):
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    prepare_bitnet_training(model)
    prepare_bitnet_training(model)  # idempotent (a resumed run)
    assert all(p.requires_grad for m in model.modules() if isinstance(m, BitLinear) for p in m.parameters())
    ids = torch.randint(2, 50, (2, 7))
    before = model(ids).logits.detach()
    freeze_ternary(model)
    assert not any(isinstance(m, BitLinear) for m in model.modules())
    tern = [m for m in model.modules() if isinstance(m, TernaryLinear)]
    assert len(tern) == 14 and all(m.codes.dtype == torch.int8 for m in tern)
    assert all(set(m.codes.unique().tolist()) <= {-1, 0, 1} for m in tern)
    torch.testing.assert_close(model(ids).logits, before)  # same outputs as while training
    s = ternary_summary(model)
    assert s["ternary_weights"] == sum(m.codes.numel() for m in tern) and 0 < s["zero_fraction"] < 1
    save_ternary(model, tmp_path / "t")
    fresh = tiny_llama(seed=9)
    load_ternary(fresh, tmp_path / "t")
    torch.testing.assert_close(fresh(ids).logits, before)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight or not model.config.tie_word_embeddings
    with pytest.raises(ConfigError, match="no BitLinear"):
        freeze_ternary(tiny_llama())
    with pytest.raises(ConfigError, match="no ternary"):
        save_ternary(tiny_llama(), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(AdapterFileError, match="missing"):
        load_ternary(tiny_llama(), tmp_path / "absent")


def test_input_norm_option():
    torch.manual_seed(5)
    lin = nn.Linear(8, 3)
    bit = BitLinear.from_linear(lin, input_norm=True)
    x = torch.randn(2, 8) * 7
    xn = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    want = formula(xn.double().numpy(), lin.weight.detach().double().numpy(), lin.bias.detach().double().numpy())
    np.testing.assert_allclose(bit(x).detach().double().numpy(), want, rtol=1e-4, atol=1e-5)
    frozen = copy.deepcopy(bit)
    m = nn.Sequential(frozen)
    freeze_ternary(m)
    torch.testing.assert_close(m(x), bit(x).detach())
