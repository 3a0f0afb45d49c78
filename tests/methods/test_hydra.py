"""Hydra: the two-branch forward, its exact merge into W and b (with and without a base bias), the
Woodbury unmerge, the last-merged-first-out rule, and dropout where the reference puts it (on each
branch's r-dim hidden activation, extremebird/Hydra vtab1k/hydra.py:60)."""

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


# -- dropout: on each branch's r-dim hidden activation, as the reference (vtab1k/hydra.py:60) -----

def _record(d):
    """Forward hooks: what enters each branch's down / up projection and what leaves down."""
    seen = {}
    handles = []
    for bname in ("parallel", "sequential"):
        branch = getattr(d, bname)

        def down_hook(mod, inp, out, bname=bname):
            seen[bname, "x"] = inp[0].detach().clone()
            seen[bname, "h"] = out.detach().clone()

        def up_hook(mod, inp, out, bname=bname):
            seen[bname, "h_dropped"] = inp[0].detach().clone()

        handles += [branch.down.register_forward_hook(down_hook), branch.up.register_forward_hook(up_hook)]
    return seen, handles


@pytest.mark.parametrize("alone", [True, False], ids=["hydra-alone", "after-another-delta"])
def test_train_mode_dropout_hits_only_the_hidden_activation(alone):
    """Train mode, dropout 0.5: each branch's input (x, and the frozen W₀x + b₀) enters untouched,
    the r-dim hidden activation is dropped (0 or h/(1-p)), and the output is the hand formula with
    those dropped activations. Checked on the fused path (Hydra alone) and the plain one."""
    p, s = 0.5, 0.7
    model = _model(d_in=16, d_out=12)
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    paretune.adapt(model, "hydra", r=12, scale=s, dropout=p, targets=["0"])
    _randomize(model)
    if not alone:  # a second, zero-init LoRA after it: Hydra runs through forward(x, base_out), not fused
        paretune.adapt(model, "lora", name="z", r=2, targets=["0"])
        assert torch.count_nonzero(_delta(model, "z").delta_weight()) == 0
    d = _delta(model)
    model.train()
    seen, handles = _record(d)
    x = torch.randn(8, 16)
    torch.manual_seed(0)
    y = model(x)
    for h in handles:
        h.remove()
    frozen = x @ w0.T + b0
    torch.testing.assert_close(seen["parallel", "x"], x, atol=0, rtol=0)  # x itself, not dropped
    torch.testing.assert_close(seen["sequential", "x"], frozen, atol=1e-6, rtol=1e-6)  # W₀x + b₀, not dropped
    for bname in ("parallel", "sequential"):
        h, hd = seen[bname, "h"], seen[bname, "h_dropped"]
        kept = hd != 0
        assert 0.2 < kept.float().mean().item() < 0.8  # some dropped, some kept (8·64 draws at p = 0.5)
        torch.testing.assert_close(hd[kept], h[kept] / (1 - p))
    hp, hs = seen["parallel", "h_dropped"], seen["sequential", "h_dropped"]
    want = frozen + s * (d.parallel.up(hp) + d.sequential.up(hs))
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


def test_train_mode_dropout_matches_a_hand_computation_with_the_same_seed():
    """Same seed, same masks: the output equals W₀x + b₀ + s·(U_p·drop(D_p x + c_p) + e_p) +
    s·(U_s·drop(D_s(W₀x + b₀) + c_s) + e_s), masks drawn parallel branch first."""
    p, s = 0.3, 1.5
    model = _model(d_in=10, d_out=6)
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    paretune.adapt(model, "hydra", r=6, scale=s, dropout=p, targets=["0"])
    _randomize(model)
    d = _delta(model)
    model.train()
    x = torch.randn(5, 10)
    torch.manual_seed(123)
    y = model(x)
    torch.manual_seed(123)
    frozen = x @ w0.T + b0
    hp = torch.nn.functional.dropout(d.parallel.down(x), p, training=True)
    hs = torch.nn.functional.dropout(d.sequential.down(frozen), p, training=True)
    want = frozen + s * (d.parallel.up(hp) + d.sequential.up(hs))
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    no_drop = frozen + s * (d.parallel.up(d.parallel.down(x)) + d.sequential.up(d.sequential.down(frozen)))
    assert not torch.allclose(y, no_drop)  # and the dropout did act


def test_eval_mode_dropout_does_nothing_and_merge_is_exact():
    model = _model(d_in=9, d_out=7)
    ref = _model(d_in=9, d_out=7)
    paretune.adapt(model, "hydra", r=3, scale=2.5, dropout=0.2, targets=["0"])
    paretune.adapt(ref, "hydra", r=3, scale=2.5, dropout=0.0, targets=["0"])
    _randomize(model)
    _randomize(ref)
    model.eval()
    ref.eval()
    x = torch.randn(6, 9)
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(model(x), want, atol=0, rtol=0)
        torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)  # deterministic
    paretune.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
    paretune.unmerge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
