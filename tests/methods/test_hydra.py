"""Hydra: the two-branch forward, its exact merge into W and b (with and without a base bias), the
Woodbury unmerge, and the last-merged-first-out rule."""

import pytest
import torch
from torch import nn

import paretune
from paretune.core.host import Host
from paretune.errors import ParetuneError


def _model(bias=True, d_in=9, d_out=7, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out, bias=bias)).eval()


def _randomize(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _delta(model, name="default"):
    return next(m for m in model.modules() if isinstance(m, Host)).deltas[name]


@pytest.mark.parametrize("bias", [True, False])
def test_trainable_count(bias):
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 12), nn.Linear(12, 5))
    paretune.adapt(model, "hydra", r=3, bias=bias, targets=["0", "1", "2"])
    shapes = [(16, 8), (12, 16), (5, 12)]
    want = sum(3 * (i + 3 * o) + (2 * 3 + 2 * o if bias else 0) for o, i in shapes)
    c = paretune.count(model)
    assert c["trainable"] == c["formula"] == want
    assert want == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_starts_at_the_base_with_the_reference_init():
    model = _model()
    x = torch.randn(4, 9)
    want = model(x)
    paretune.adapt(model, "hydra", r=2, targets=["0"])
    torch.testing.assert_close(model(x), want)
    d = _delta(model)
    for branch in (d.parallel, d.sequential):
        assert branch.up.weight.abs().sum() == 0 and branch.up.bias.abs().sum() == 0
        assert branch.down.bias.abs().sum() == 0 and branch.down.weight.abs().sum() > 0


def test_forward_is_the_paper_formula():
    model = _model()
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    paretune.adapt(model, "hydra", r=2, scale=0.7, targets=["0"])
    _randomize(model)
    d = _delta(model)
    x = torch.randn(5, 9)
    frozen = x @ w0.T + b0
    want = frozen + 0.7 * d.parallel(x) + 0.7 * d.sequential(frozen)
    torch.testing.assert_close(model(x), want)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("branch_bias", [True, False])
def test_merge_unmerge_is_exact(bias, branch_bias):
    model = _model(bias=bias)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    paretune.adapt(model, "hydra", r=3, scale=0.5, bias=branch_bias, targets=["0"])
    _randomize(model)
    x = torch.randn(6, 9)
    want = model(x)
    paretune.merge(model)
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
    paretune.unmerge(model)
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
    base = model[0].base
    torch.testing.assert_close(base.weight, original["0.weight"], atol=1e-5, rtol=1e-5)
    if bias:
        torch.testing.assert_close(base.bias, original["0.bias"], atol=1e-5, rtol=1e-5)
    else:
        assert base.bias is None  # the bias merge gave it is taken away again


def test_unmerge_order_is_last_in_first_out():
    model = _model()
    paretune.adapt(model, "hydra", name="h", r=2, targets=["0"])
    _randomize(model, 1)
    paretune.adapt(model, "lora", name="l", r=2, init="random", targets=["0"])
    x = torch.randn(3, 9)
    want = model(x)
    paretune.merge(model, "h")
    paretune.merge(model, "l")
    with pytest.raises(ParetuneError, match=r"unmerge \['l'\] first"):
        paretune.unmerge(model, "h")
    paretune.unmerge(model, "l")
    paretune.unmerge(model, "h")
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d_merge(make_mixed, mixed_batch):
    model = make_mixed()
    paretune.adapt(model, "hydra", r=2, targets=["proj"])
    _randomize(model)
    want = model(*mixed_batch)
    paretune.merge(model)
    torch.testing.assert_close(model(*mixed_batch), want, atol=1e-5, rtol=1e-5)
    plain = paretune.unload(model)
    torch.testing.assert_close(plain(*mixed_batch), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", [{"r": 0}, {"dropout": 1.0}, {"bias": "yes"}, {"scale": "big"}])
def test_bad_options(bad):
    with pytest.raises(paretune.ConfigError, match=next(iter(bad))):
        paretune.adapt(_model(), "hydra", targets=["0"], **bad)
