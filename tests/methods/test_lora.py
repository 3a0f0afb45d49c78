"""LoRA (Hu et al. 2021) and rsLoRA: zero start, A's init distributions, scaling, dropout, counts."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import paretune
from paretune.core.host import Host
from paretune.errors import ConfigError
from paretune.methods.lora import LoraConfig, LoraDelta


def one_linear(d_in: int = 4, d_out: int = 4, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out))


def delta_of(model: nn.Module, name: str = "default") -> LoraDelta:
    hosts = [m for m in model.modules() if isinstance(m, Host)]
    assert hosts
    return hosts[0].deltas[name]


# -- initialisation ---------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_zero_B_at_init_gives_the_base_model(make_llama, llama_batch, init):
    base = make_llama()
    model = make_llama()
    paretune.adapt(model, "lora", r=4, init=init)
    for host in (m for m in model.modules() if isinstance(m, Host)):
        d = host.deltas["default"]
        assert torch.count_nonzero(d.B) == 0
        assert torch.count_nonzero(d.A) == d.A.numel()  # A is random, not zero
    with torch.no_grad():
        assert torch.equal(model(llama_batch).logits, base(llama_batch).logits)


def test_default_init_is_kaiming():
    assert LoraConfig().init == "kaiming"


def test_kaiming_init_matches_nn_linear_distribution():
    """kaiming-uniform with a=sqrt(5): U(-1/sqrt(d_in), 1/sqrt(d_in)), std 1/sqrt(3 d_in)."""
    d_in, r = 256, 32
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, 64))
    paretune.adapt(model, "lora", r=r)
    a = delta_of(model).A.detach()
    bound = 1 / math.sqrt(d_in)
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.98 * bound  # fills the interval (8192 draws)
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.05 * bound / math.sqrt(3)
    assert abs(a.mean().item()) < 0.05 * bound


def test_gaussian_init_has_std_one_over_r():
    d_in, r = 256, 16
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, 64))
    paretune.adapt(model, "lora", r=r, init="gaussian")
    a = delta_of(model).A.detach()
    assert abs(a.std().item() - 1 / r) < 0.05 / r
    assert abs(a.mean().item()) < 0.05 / r
    # a normal, not a uniform: its tails pass sqrt(3)·std, where a uniform of that std ends
    assert a.abs().max() > 2.5 / r
    assert torch.count_nonzero(delta_of(model).B) == 0


def test_random_init_has_nonzero_B_with_std_one_over_r():
    r = 8
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 128))
    model = nn.Sequential(nn.Linear(64, 128))
    model.load_state_dict(base.state_dict())
    paretune.adapt(model, "lora", r=r, init="random")
    b = delta_of(model).B.detach()
    assert abs(b.std().item() - 1 / r) < 0.1 / r
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert not torch.allclose(model(x), base(x))


def test_unknown_init_is_a_clear_error():
    with pytest.raises(ConfigError, match="init.*kaiming"):
        paretune.adapt(one_linear(), "lora", init="orthogonal")


def test_embedding_swaps_the_zero_factor():
    """On an embedding (as in the reference code) A = 0 and B ~ N(0, 1): still a zero start."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(200, 64))
    paretune.adapt(model, "lora", r=8, targets=["0"])
    d = delta_of(model)
    assert d.A.shape == (8, 200) and d.B.shape == (64, 8)
    assert torch.count_nonzero(d.A) == 0
    assert abs(d.B.std().item() - 1.0) < 0.1


# -- scaling ------------------------------------------------------------------------------------

@pytest.mark.parametrize("rslora, scale", [(False, 16 / 4), (True, 16 / math.sqrt(4))])
def test_scaling_alpha_over_r_or_sqrt_r(rslora, scale):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    w, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    paretune.adapt(model, "lora", r=4, alpha=16, rslora=rslora, init="random")
    d = delta_of(model)
    assert d.scaling == scale == LoraConfig(r=4, alpha=16, rslora=rslora).scaling
    A, B = d.A.detach(), d.B.detach()
    assert torch.equal(d.delta_weight(), scale * (B @ A))

    x = torch.randn(7, 6, dtype=torch.float64)
    with torch.no_grad():
        got = model(x.float()).double()
    want = x @ w.double().T + b.double() + scale * (x @ A.double().T @ B.double().T)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    paretune.merge(model)
    torch.testing.assert_close(model[0].base.weight.detach(), w + scale * (B @ A), atol=1e-6, rtol=0)


def test_rslora_and_lora_agree_at_rank_one():
    assert LoraConfig(r=1, alpha=3, rslora=True).scaling == LoraConfig(r=1, alpha=3).scaling == 3


# -- dropout ------------------------------------------------------------------------------------

def _subset_sum_layer(p: float) -> tuple[nn.Sequential, torch.Tensor]:
    """Linear(4 -> 3) with zero weight; LoRA r=1, A = 1ᵀ, B = 1, s = 1: the adapter adds sum(x) to
    every output, so with x = (1, 2, 4, 8) the added value names which inputs survived dropout."""
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    paretune.adapt(model, "lora", r=1, alpha=1, dropout=p)
    d = delta_of(model)
    with torch.no_grad():
        d.A.fill_(1.0)
        d.B.fill_(1.0)
    x = torch.tensor([1.0, 2.0, 4.0, 8.0]).repeat(256, 1)
    return model, x


def test_dropout_acts_on_the_adapter_input_in_train_mode_only():
    p = 0.5
    torch.manual_seed(0)
    model, x = _subset_sum_layer(p)
    bias = torch.tensor([0.5, -1.0, 2.0])

    model.train()
    with torch.no_grad():
        added = model(x) - bias  # the base branch (zero weight + bias) is never dropped
    # every output of a row gets the same adapter value: one mask on the input, shared by outputs
    assert torch.allclose(added, added[:, :1].expand_as(added))
    kept = added[:, 0] * (1 - p)  # inverted dropout scales survivors by 1/(1-p)
    assert torch.allclose(kept, kept.round(), atol=1e-5)
    kept = kept.round().long()
    assert ((kept >= 0) & (kept <= 15)).all()
    # per-input masks (not one mask on the rank-1 hidden value, which gives only 0 or 15)
    assert ((kept != 0) & (kept != 15)).any()
    # each input is kept about half the time
    bits = torch.stack([(kept >> i) & 1 for i in range(4)], dim=1).float()
    assert ((bits.mean(0) - (1 - p)).abs() < 0.1).all()

    model.eval()
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(first, second)
    torch.testing.assert_close(first - bias, torch.full_like(first, 15.0))


def test_no_dropout_module_at_p_zero(make_mlp, mlp_batch):
    model = make_mlp()
    paretune.adapt(model, "lora", r=2, dropout=0.0, init="random")
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    assert all(d.drop is None for h in model.modules() if isinstance(h, Host) for d in h.deltas.values())
    with torch.no_grad():
        model.train()
        t = model(mlp_batch)
        model.eval()
        assert torch.equal(t, model(mlp_batch))


def test_dropout_module_present_when_asked(make_mlp):
    model = make_mlp()
    paretune.adapt(model, "lora", r=2, dropout=0.1)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 3 and all(m.p == 0.1 for m in drops)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_dropout_out_of_range_is_a_clear_error(bad):
    with pytest.raises(ConfigError, match="dropout"):
        paretune.adapt(one_linear(), "lora", dropout=bad)


# -- counts ---------------------------------------------------------------------------------------

def test_trainable_count_is_r_times_din_plus_dout_per_linear(make_llama):
    r = 4
    model = make_llama()
    paretune.adapt(model, "lora", r=r)
    # per layer: q 32->32, k 32->16, v 32->16, o 32->32, gate 32->64, up 32->64, down 64->32
    per_layer = (32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) + (32 + 64) + (32 + 64) + (64 + 32)
    expected = 2 * r * per_layer
    cost = paretune.count(model)
    assert cost["trainable"] == cost["formula"] == expected == 4096
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    for host in (m for m in model.modules() if isinstance(m, Host)):
        d = host.deltas["default"]
        assert d.A.shape == (r, host.base.in_features) and d.B.shape == (host.base.out_features, r)
    assert LoraDelta.trainable_formula(7, 5, LoraConfig(r=3)) == 3 * (7 + 5)


def test_stored_bytes_are_the_float32_factors(make_mlp):
    model = make_mlp()
    paretune.adapt(model, "lora", r=2)
    # layers 8->16, 16->12, 12->4
    assert paretune.count(model)["stored_bytes"] == 4 * 2 * ((8 + 16) + (16 + 12) + (12 + 4))


# -- precision ------------------------------------------------------------------------------------

def test_adapter_trains_in_float32_on_a_bfloat16_base():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6)).to(torch.bfloat16)
    paretune.adapt(model, "lora", r=2, init="random")
    d = delta_of(model)
    assert d.A.dtype == d.B.dtype == torch.float32
    assert d.delta_weight().dtype == torch.float32
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(x)
    assert out.dtype == torch.bfloat16
    want = model[0].base(x).float() + d.scaling * (x.float() @ d.A.T @ d.B.T)
    torch.testing.assert_close(out.float(), want, atol=0.05, rtol=0.02)


def test_float64_adapter_keeps_float64_precision():
    """A float64 base gets a float64 adapter, and its dense ΔW is float64 too (not rounded to float32)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6)).double()
    paretune.adapt(model, "lora", r=2, init="random")
    d = delta_of(model)
    assert d.A.dtype == d.B.dtype == torch.float64
    dw = d.delta_weight()
    assert dw.dtype == torch.float64
    torch.testing.assert_close(dw, d.scaling * (d.B.detach() @ d.A.detach()), atol=1e-15, rtol=0)
