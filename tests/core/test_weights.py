"""Weighted active adapters: set_active(model, names, weights) scales each adapter's change of
every output, so [0.5, 0.5] averages two adapters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import paretune
from paretune.errors import ParetuneError


def model_with_two(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4))
    paretune.adapt(model, "lora", name="a", r=2)
    paretune.adapt(model, "ia3", name="b", targets=["0"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".deltas." in n:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.5)
    return model


X = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_weights_scale_each_change_in_order():
    model = model_with_two()
    lin = model[0]
    base = lin.base(X)
    a = lin.deltas["a"](X, base.clone())  # (a delta may add into the tensor it is given)
    after_a = base + 0.25 * (a - base)
    b = lin.deltas["b"](X, after_a.clone())
    want = after_a + 2.0 * (b - after_a)
    paretune.set_active(model, ["a", "b"], weights=[0.25, 2.0])
    torch.testing.assert_close(model(X), want)
    paretune.set_active(model, ["a", "b"], weights=[1.0, 1.0])
    torch.testing.assert_close(model(X), lin.deltas["b"](X, lin.deltas["a"](X, base.clone())))


@torch.no_grad()
def test_average_of_two_loras_is_the_mean_of_their_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4))
    for name in ("a", "b"):
        paretune.adapt(model, "lora", name=name, r=2)
        d = model[0].deltas[name]
        d.B.normal_()
    base = model[0].base(X)
    changes = [model[0].deltas[n](X, base.clone()) - base for n in ("a", "b")]
    paretune.set_active(model, ["a", "b"], weights=[0.5, 0.5])
    torch.testing.assert_close(model(X), base + (changes[0] + changes[1]) / 2)
    paretune.adapt(model, "lora", name="c", r=2)  # adding an adapter keeps the others' weights
    paretune.set_active(model, ["a", "b"])  # and so does set_active without weights
    torch.testing.assert_close(model(X), base + (changes[0] + changes[1]) / 2)


def test_weights_and_merging_do_not_mix():
    model = model_with_two()
    paretune.set_active(model, ["a"], weights=[0.5])
    with pytest.raises(ParetuneError, match="weight 0.5"):
        paretune.merge(model, "a")
    paretune.set_active(model, ["a"], weights=[1.0])
    paretune.merge(model, "a")
    with pytest.raises(ParetuneError, match="merged into the base"):
        paretune.set_active(model, ["a"], weights=[0.5])
    with pytest.raises(ParetuneError, match="one number per adapter"):
        paretune.set_active(model, ["a", "b"], weights=[1.0])
    with pytest.raises(ParetuneError, match="finite"):
        paretune.set_active(model, ["a"], weights=[float("nan")])
