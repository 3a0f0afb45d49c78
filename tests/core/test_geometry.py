"""Each host kind read as a (d_out, d_in) matrix: the adapted forward equals the base op run with
W + ΔW laid out in the base's own layout (computed here independently of the engine's merge)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import paretune
from paretune.core.geometry import geometry_for
from paretune.errors import ParetuneError


def _delta(model, name="m"):
    host = model.get_submodule(name)
    return host.deltas["default"].delta_weight().detach()


def _adapted(base: nn.Module) -> nn.Module:
    model = nn.Module()
    model.m = base
    paretune.adapt(model, "lora", targets=["m"], r=3, alpha=6, init="random")
    return model


def test_linear():
    torch.manual_seed(0)
    base = nn.Linear(7, 5)
    w, b = base.weight.detach().clone(), base.bias.detach().clone()
    model = _adapted(base)
    x = torch.randn(4, 2, 7)
    dw = _delta(model)
    assert dw.shape == (5, 7)
    torch.testing.assert_close(model.m(x), F.linear(x, w + dw, b), atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d():
    torch.manual_seed(0)
    base = Conv1D(5, 7)  # weight (in=7, out=5)
    nn.init.normal_(base.weight, std=0.3)
    w, b = base.weight.detach().clone(), base.bias.detach().clone()
    model = _adapted(base)
    x = torch.randn(4, 2, 7)
    dw = _delta(model)
    assert dw.shape == (5, 7)  # matrix layout (d_out, d_in), whatever the native one
    torch.testing.assert_close(model.m(x), x @ (w + dw.T) + b, atol=1e-5, rtol=1e-5)


def test_embedding():
    torch.manual_seed(0)
    base = nn.Embedding(11, 6)
    w = base.weight.detach().clone()
    model = _adapted(base)
    ids = torch.randint(0, 11, (3, 4))
    dw = _delta(model)
    assert dw.shape == (6, 11)  # a map from one-hot ids (d_in = vocabulary) to vectors
    assert torch.count_nonzero(dw) > 0
    torch.testing.assert_close(model.m(ids), F.embedding(ids, w + dw.T), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1),
                                dict(kernel_size=(2, 3), dilation=2), dict(kernel_size=1)])
def test_conv2d(kw):
    torch.manual_seed(0)
    base = nn.Conv2d(3, 4, **kw)
    w, b = base.weight.detach().clone(), base.bias.detach().clone()
    model = _adapted(base)
    x = torch.randn(2, 3, 9, 9)
    dw = _delta(model)
    assert dw.shape == (4, 3 * w.shape[2] * w.shape[3])
    want = F.conv2d(x, w + dw.reshape(w.shape), b, stride=base.stride, padding=base.padding, dilation=base.dilation)
    torch.testing.assert_close(model.m(x), want, atol=1e-5, rtol=1e-5)


def test_grouped_conv_is_rejected_with_a_clear_error():
    model = nn.Module()
    model.m = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(ParetuneError, match="group"):
        paretune.adapt(model, "lora", targets=["m"], r=2)
    assert isinstance(model.m, nn.Conv2d)  # left untouched


def test_unsupported_module_has_no_geometry():
    assert geometry_for(nn.LayerNorm(4, elementwise_affine=False)) is None  # no γ to adapt
    assert geometry_for(nn.ReLU()) is None  # no Linear inside: not a block
    assert geometry_for(nn.LayerNorm(4)).kind == "norm"
    assert geometry_for(nn.Linear(3, 2)).kind == "linear"


@pytest.mark.parametrize("make", [lambda: nn.Linear(7, 5), lambda: Conv1D(5, 7), lambda: nn.Embedding(7, 5),
                                  lambda: nn.Conv2d(3, 5, 2), lambda: nn.Linear(7, 5).to(torch.bfloat16)])
def test_add_at_writes_only_the_given_entries_of_the_matrix_view(make):
    torch.manual_seed(0)
    g = geometry_for(make())
    before = g.matrix().detach().float().contiguous().clone()
    flat = torch.tensor([0, 3, g.d_in + 1, g.d_out * g.d_in - 1])
    values = torch.tensor([0.5, -1.0, 2.0, 0.25])
    g.add_at(flat, values)
    want = before.clone().view(-1)
    want[flat] += values
    tol = 1e-2 if g.weight.dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(g.matrix().float(), want.view(g.d_out, g.d_in), atol=tol, rtol=tol)
    untouched = torch.ones(g.d_out * g.d_in, dtype=torch.bool)
    untouched[flat] = False
    assert torch.equal(g.matrix().float().reshape(-1)[untouched], before.reshape(-1)[untouched])
    g.add_at(flat, values, sign=-1.0)
    torch.testing.assert_close(g.matrix().float(), before, atol=tol, rtol=tol)
