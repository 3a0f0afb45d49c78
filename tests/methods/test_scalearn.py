"""ScaLearn (Frohmann et al. 2024): frozen source adapters mixed by learned scalings of their
outputs. Checked against the formula written out (base + Σ ω_k ⊙ a_k), the reference's init, the
four variants' counts, save / load (sources first), gradients only on ω, and refused input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import paretune
from paretune.core.host import Host
from paretune.errors import ConfigError, ParetuneError

from layer_chain import deltas, randomise


def two_layer(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))


def with_sources(seed: int = 0) -> nn.Sequential:
    """Two trained-looking sources (LoRA, and a series bottleneck adapter on the same layers), off."""
    model = two_layer(seed)
    paretune.adapt(model, "lora", name="src_a", targets=["0", "2"], r=2)
    paretune.adapt(model, "bottleneck", name="src_b", targets=["0", "2"], bottleneck=3)
    randomise(model, seed=11, scale=0.5)
    paretune.set_active(model, [])
    return model


X = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))


def by_hand(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Layer by layer: h = W h + b, plus Σ_k ω_k ⊙ (source k's change of that layer's output)."""
    h = x
    for i, layer in enumerate([model[0], model[2]]):
        base = layer.base(h)
        ours = layer.deltas["mix"]
        out = base
        for k, src in enumerate(["src_a", "src_b"]):
            out = out + ours.omega[k] * (layer.deltas[src](h, base.clone()) - base)  # deltas may add in place
        h = torch.tanh(out) if i == 0 else out
    return h


@pytest.mark.parametrize("shape,shared", [("vector", False), ("scalar", False), ("scalar", True)])
def test_output_counts_and_init(shape, shared):
    """(shared vector ω: test_shared_vector_needs_one_width_and_works_on_equal_widths)"""
    model = with_sources()
    paretune.adapt(model, "scalearn", name="mix", sources=["src_a", "src_b"], shape=shape, shared=shared)
    assert paretune.active(model) == ["mix"]
    per_layer = [2 * (8 if shape == "vector" else 1), 2 * (5 if shape == "vector" else 1)]
    want = 2 if shared else sum(per_layer)
    cost = paretune.count(model, "mix")
    assert cost["trainable"] == cost["formula"] == want
    omegas = [dl.omega for dl in deltas(model, "mix").values()]
    for w in omegas:
        assert (w - 1.0).abs().max() < 0.01  # N(2/n, 0.001²) with n = 2
    with torch.no_grad():
        torch.testing.assert_close(model(X), by_hand(model, X))


def test_shared_vector_needs_one_width_and_works_on_equal_widths():
    with pytest.raises(ConfigError, match="one output width"):
        paretune.adapt(with_sources(), "scalearn", name="mix", sources=["src_a", "src_b"], shared=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
    paretune.adapt(model, "lora", name="s", r=2)
    randomise(model, seed=2)
    paretune.set_active(model, [])
    paretune.adapt(model, "scalearn", name="mix", sources=["s"], shared=True)
    thetas = {id(dl.omega) for dl in deltas(model, "mix").values()}
    assert len(thetas) == 1 and paretune.count(model, "mix")["trainable"] == 6


def test_only_omega_trains():
    model = with_sources()
    paretune.adapt(model, "scalearn", name="mix", sources=["src_a", "src_b"])
    model(X).square().sum().backward()
    for n, p in model.named_parameters():
        if ".deltas.mix." in n:
            assert n.endswith("omega_layer") and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n


def test_save_load_needs_the_sources_first(tmp_path):
    model = with_sources()
    paretune.adapt(model, "scalearn", name="mix", sources=["src_a", "src_b"], shape="scalar")
    randomise(model, seed=4)
    with torch.no_grad():
        ref = model(X)
    paretune.save(model, tmp_path / "mix", name="mix")
    for src in ("src_a", "src_b"):
        paretune.save(model, tmp_path / src, name=src)
    fresh = two_layer()
    with pytest.raises(ConfigError, match="not on the model"):
        paretune.load(fresh, tmp_path / "mix")
    assert not any(isinstance(m, Host) for m in fresh.modules())
    for src in ("src_a", "src_b"):
        paretune.load(fresh, tmp_path / src)
    paretune.set_active(fresh, [])
    paretune.load(fresh, tmp_path / "mix")
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), ref, atol=0, rtol=0)


def test_refused_input_leaves_the_model_as_it_was():
    model = with_sources()
    with pytest.raises(ConfigError, match="not on the model"):
        paretune.adapt(model, "scalearn", sources=["nope"])
    paretune.set_active(model, ["src_a"])
    with pytest.raises(ConfigError, match="active or merged"):
        paretune.adapt(model, "scalearn", sources=["src_a", "src_b"])
    paretune.set_active(model, [])
    paretune.adapt(model, "lora", name="src_c", targets=["0"], r=2)  # on the first layer only
    paretune.set_active(model, [])
    assert paretune.adapters(model)["src_c"].targets == ["0"]
    paretune.adapt(model, "scalearn", name="both", sources=["src_a", "src_c"])  # default: where both sit
    assert paretune.adapters(model)["both"].targets == ["0"]
    paretune.remove(model, "both")
    with pytest.raises(ConfigError, match="lack a delta"):
        paretune.adapt(model, "scalearn", sources=["src_a", "src_c"], targets=["0", "2"])
    assert sorted(paretune.adapters(model)) == ["src_a", "src_b", "src_c"]
    with pytest.raises(ConfigError, match="sources"):
        paretune.adapt(model, "scalearn", sources=[])
    with pytest.raises(ParetuneError, match="cannot be merged|input-dependent"):
        paretune.adapt(model, "scalearn", name="mix", sources=["src_a"])
        paretune.merge(model, "mix")
