"""VeRA (Kopiczko et al. 2024): counts, zero start, shared seeded bank, save/load of the vectors
only, gradients, and equality with PEFT's VeRA (same bases for the same seed, same ΔW)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

import paretune

from layer_chain import (SHAPES, TARGETS, assert_bad_options_refused, assert_merge_round_trip,
                         assert_only_these_get_gradients, assert_save_load_exact, assert_trainable_count, chain,
                         deltas, peft_pairs, randomise)


# -- counts and init ---------------------------------------------------------------------------

@pytest.mark.parametrize("d_in,d_out", SHAPES)
@pytest.mark.parametrize("r", [1, 4, 64])
def test_trainable_count_is_r_plus_d_out(d_in, d_out, r):
    model = nn.Sequential(nn.Linear(d_in, d_out))
    paretune.adapt(model, "vera", r=r)
    assert_trainable_count(model, r + d_out)


def test_count_over_layers_of_several_shapes():
    model = chain()
    paretune.adapt(model, "vera", r=6, targets=TARGETS)
    expected = sum(6 + d_out for _, d_out in [(8, 16), (16, 8), (8, 12), (12, 12), (12, 30), (30, 7)])
    assert paretune.count(model)["trainable"] == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_zero_delta_at_init(make_llama, llama_batch):
    base, model = make_llama(), make_llama()
    paretune.adapt(model, "vera", r=16, d_initial=0.3)
    for d in deltas(model).values():
        assert torch.count_nonzero(d.lambda_b) == 0
        assert torch.all(d.lambda_d == 0.3)
        assert torch.count_nonzero(d.delta_weight()) == 0
    with torch.no_grad():
        assert torch.equal(model(llama_batch).logits, base(llama_batch).logits)


def test_default_rank_is_the_papers():
    model = nn.Sequential(nn.Linear(8, 4))
    paretune.adapt(model, "vera")
    assert deltas(model)["0"].lambda_d.shape == (256,)


def test_bases_are_kaiming_uniform_with_gain_sqrt2():
    model = nn.Sequential(nn.Linear(512, 256))
    paretune.adapt(model, "vera", r=128)
    a, b = deltas(model)["0"].bases()
    for t, fan_in in ((a, 512), (b, 128)):
        bound = math.sqrt(6 / fan_in)
        assert t.abs().max() <= bound and t.abs().max() > 0.98 * bound
        assert abs(t.std().item() - bound / math.sqrt(3)) < 0.03 * bound


# -- shared, seeded bank -----------------------------------------------------------------------

def test_layers_share_one_bank_sliced_from_the_largest_dims():
    model = chain()
    paretune.adapt(model, "vera", r=5, targets=TARGETS)
    ds = list(deltas(model).values())
    bank = ds[0].bank
    assert all(d.bank is bank for d in ds)
    assert bank.A.shape == (5, 30) and bank.B.shape == (30, 5)  # max d_in = 30, max d_out = 30
    for d in ds:
        a, b = d.bases()
        assert a.data_ptr() == bank.A.data_ptr() and b.data_ptr() == bank.B.data_ptr()
        assert a.shape == (5, d.d_in) and b.shape == (d.d_out, 5)
    assert not any("bank" in k for k in model.state_dict())  # never in a state dict


def test_bank_stays_shared_after_moving_to_float64():
    model = chain()
    paretune.adapt(model, "vera", r=5, targets=TARGETS)
    randomise(model)
    x = torch.randn(3, 8)
    with torch.no_grad():
        ref = model(x).double()
    model.to(torch.float64)
    ds = list(deltas(model).values())
    assert all(d.bank is ds[0].bank for d in ds)
    assert ds[0].bank.A.dtype == torch.float64 and ds[0].lambda_b.dtype == torch.float64
    assert len({d.bases()[0].data_ptr() for d in ds}) == 1
    with torch.no_grad():
        torch.testing.assert_close(model(x.double()), ref, atol=1e-4, rtol=1e-5)


def test_bases_depend_on_the_seed_only():
    m1, m2, m3 = chain(), chain(1), chain()
    paretune.adapt(m1, "vera", r=5, targets=TARGETS, seed=7)
    paretune.adapt(m2, "vera", r=5, targets=TARGETS, seed=7)
    paretune.adapt(m3, "vera", r=5, targets=TARGETS, seed=8)
    b1, b2, b3 = (next(iter(deltas(m).values())).bank for m in (m1, m2, m3))
    assert torch.equal(b1.A, b2.A) and torch.equal(b1.B, b2.B)
    assert not torch.equal(b1.A, b3.A)


# -- merge, save / load, gradients -------------------------------------------------------------

def test_merged_equals_unmerged():
    model = chain()
    paretune.adapt(model, "vera", r=5, targets=TARGETS)
    randomise(model)
    assert_merge_round_trip(model, torch.randn(4, 8), atol=1e-4, rtol=1e-5)


def test_save_load_stores_only_the_vectors(tmp_path):
    model = chain()
    paretune.adapt(model, "vera", r=64, targets=TARGETS)
    randomise(model)
    assert_save_load_exact(model, tmp_path / "a", torch.randn(4, 8))

    path = tmp_path / "a" / "adapter.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert keys == {f"{t}.{v}" for t in TARGETS for v in ("lambda_b", "lambda_d")}
    vector_bytes = 4 * sum(64 + d_out for d_out in (16, 8, 12, 12, 30, 7))
    bank_bytes = 4 * 2 * 64 * 30
    assert path.stat().st_size < vector_bytes + 2048 < bank_bytes + vector_bytes
    assert paretune.count(model)["stored_bytes"] == vector_bytes


def test_only_the_vectors_get_gradients():
    model = chain()
    paretune.adapt(model, "vera", r=5, targets=TARGETS)
    randomise(model)
    model(torch.randn(4, 8)).pow(2).sum().backward()
    assert_only_these_get_gradients(model, ("lambda_b", "lambda_d"))


def test_dropout_acts_in_training_only():
    model = nn.Sequential(nn.Linear(8, 8))
    paretune.adapt(model, "vera", r=4, dropout=0.5)
    randomise(model)
    x = torch.randn(64, 8)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("bad", [{"r": 0}, {"r": -2}, {"r": 2.5}, {"dropout": 1.0}, {"seed": -1},
                                 {"d_initial": float("nan")}, {"rank": 4}])
def test_bad_options_are_config_errors(bad):
    assert_bad_options_refused("vera", bad)


# -- equality with PEFT ------------------------------------------------------------------------

def _peft_pair(model_fn, targets, r, seed=0, **peft_kw):
    from peft import VeraConfig, get_peft_model

    ours, theirs = model_fn(), model_fn()
    paretune.adapt(ours, "vera", r=r, seed=seed, targets=targets)
    peft_model = get_peft_model(theirs, VeraConfig(r=r, target_modules=targets, projection_prng_key=seed, **peft_kw))

    def copy(d, layer, g):
        d.lambda_b.copy_(0.3 * torch.randn(d.lambda_b.shape, generator=g))
        d.lambda_d.copy_(0.3 * torch.randn(d.lambda_d.shape, generator=g))
        layer.vera_lambda_b["default"].copy_(d.lambda_b)
        layer.vera_lambda_d["default"].copy_(d.lambda_d)

    return ours, peft_model, peft_pairs(ours, peft_model, targets, copy)


@pytest.mark.parametrize("seed", [0, 1234])
def test_equals_peft_on_linear_layers(seed):
    ours, peft_model, pairs = _peft_pair(chain, TARGETS, r=6, seed=seed)
    for d, layer in pairs:
        a, b = d.bases()
        assert torch.equal(a, layer.vera_A["default"][:, : d.d_in])
        assert torch.equal(b, layer.vera_B["default"][: d.d_out])
        torch.testing.assert_close(d.delta_weight(), layer.get_delta_weight("default"), atol=1e-5, rtol=0)
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peft_model(x), atol=1e-5, rtol=0)


def test_equals_peft_on_gpt2_conv1d():
    from transformers.pytorch_utils import Conv1D

    def gpt2_like() -> nn.Sequential:
        torch.manual_seed(0)
        model = nn.Sequential(Conv1D(24, 8), Conv1D(8, 24))  # Conv1D(nf=out, nx=in)
        for m in model:
            nn.init.normal_(m.weight, std=0.3)
        return model

    ours, peft_model, pairs = _peft_pair(gpt2_like, ["0", "1"], r=4, fan_in_fan_out=True)
    for d, layer in pairs:
        torch.testing.assert_close(d.delta_weight().T, layer.get_delta_weight("default"), atol=1e-5, rtol=0)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peft_model(x), atol=1e-5, rtol=0)
