"""Subspace training (Li et al. 2018) and SAID (Aghajanyan et al. 2020): θ = θ₀ + [λ ⊙] P·θ_d.

Checked: the Walsh-Hadamard transform against scipy's Hadamard matrix; the Fastfood product
against the formula with H formed, its custom backward against autograd; a dense P cached and
regenerated give the same numbers and unit-norm columns; each layer's ΔW and Δb are its slice of
P·θ_d (P formed column by column from basis vectors); θ_d is one parameter shared by every layer;
counts (dim for the whole adapter, SAID's scalars included); stored bytes (θ_d and the scalars);
save / load; merge; seeds; refused options with the model left as it was; a short run learns."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from scipy.linalg import hadamard
from torch import nn

import paretune
from paretune.errors import ConfigError
from paretune.methods import subspace_projection as sp
from paretune.methods.subspace import SubspaceConfig

from layer_chain import (CHAIN_SHAPES, TARGETS, assert_merge_round_trip, assert_save_load_exact,
                         assert_trainable_count, chain, deltas, left_unchanged)

CPU = torch.device("cpu")
F64 = torch.float64
D_TOTAL = sum(o * i + o for o, i in CHAIN_SHAPES)  # chain()'s weights and biases: 1,151


def x_chain(n: int = 5) -> torch.Tensor:
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(1))


def set_theta(model: nn.Module, seed: int = 2, scale: float = 0.5) -> None:
    with torch.no_grad():
        theta = next(iter(deltas(model).values())).theta_d
        theta.copy_(torch.randn(theta.shape, generator=torch.Generator().manual_seed(seed)) * scale)


# -- the projections ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 32, 64, 2048])
def test_fwht_is_the_hadamard_matrix(n):
    x = torch.randn(3, n, dtype=F64)
    torch.testing.assert_close(sp.fwht(x), x @ torch.from_numpy(hadamard(n)).to(F64), atol=1e-9, rtol=1e-12)


def test_fwht_refuses_a_length_not_a_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        sp.fwht(torch.zeros(12))


@pytest.mark.parametrize("size,dim,length", [(300, 50, 512), (40, 100, 128), (64, 64, 64)])
def test_fastfood_product_and_its_backward(size, dim, length):
    proj = sp.FastfoodProjection(size, dim, 5, dtype=F64, device=CPU)
    assert proj.length == length  # the power of two at or above max(D, k)
    x = torch.randn(dim, dtype=F64, requires_grad=True)
    torch.testing.assert_close(proj(x), proj.reference(x))
    g = torch.randn(size, dtype=F64)
    (ours,) = torch.autograd.grad(proj(x), x, g)
    (ref,) = torch.autograd.grad(proj.reference(x), x, g)
    torch.testing.assert_close(ours, ref)


def fastfood_columns(proj) -> torch.Tensor:
    return torch.stack([proj(e) for e in torch.eye(proj.dim, dtype=F64)], dim=1)


def test_fastfood_columns_have_unit_norm_on_average():
    """σ = √(L·ΣG²) makes every column of H G Π H B exactly σ long; taking D of L rows and dividing by
    √(D/L) leaves columns of norm about one."""
    p = fastfood_columns(sp.FastfoodProjection(3000, 40, 1, dtype=F64, device=CPU))
    norms = p.norm(dim=0)
    assert abs(float(norms.pow(2).mean()) - 1) < 0.05 and float(norms.min()) > 0.8
    full = sp.FastfoodProjection(4096, 40, 1, dtype=F64, device=CPU)  # D = L: exactly one
    torch.testing.assert_close(fastfood_columns(full).norm(dim=0), torch.ones(40, dtype=F64))


def test_dense_projection_cached_equals_regenerated_and_columns_are_unit():
    x = torch.randn(30, dtype=F64, requires_grad=True)
    cached = sp.DenseProjection(9000, 30, 7, cache=True, dtype=F64, device=CPU)  # three chunks
    regen = sp.DenseProjection(9000, 30, 7, cache=False, dtype=F64, device=CPU)
    assert regen.matrix is None
    torch.testing.assert_close(cached.matrix.norm(dim=0), torch.ones(30, dtype=F64))
    torch.testing.assert_close(regen(x), cached(x))
    g = torch.randn(9000, dtype=F64)
    torch.testing.assert_close(torch.autograd.grad(regen(x), x, g)[0], torch.autograd.grad(cached(x), x, g)[0])


# -- the adapter -------------------------------------------------------------------------------

@pytest.mark.parametrize("projection", ["fastfood", "dense"])
@pytest.mark.parametrize("said", [False, True])
def test_each_layer_is_its_slice_of_p_theta(projection, said):
    model = chain().double()
    paretune.adapt(model, "subspace", targets=TARGETS, dim=60, projection=projection, said=said)
    set_theta(model)
    layers = deltas(model)
    theta = next(iter(layers.values())).theta_d.detach()
    for i, d in enumerate(layers.values()):
        if said:
            with torch.no_grad():
                d.said_scale.fill_(0.5 + i)
        p = fastfood_columns(d.proj) if projection == "fastfood" else d.proj.matrix
        v = (p @ theta) * (0.5 + i if said else 1.0)
        n = d.d_out * d.d_in
        torch.testing.assert_close(d.delta_weight(), v[:n].view(d.d_out, d.d_in))
        torch.testing.assert_close(d.delta_bias(), v[n:])


def test_theta_is_one_parameter_shared_by_every_layer_and_starts_at_zero():
    base, model = chain(), chain()
    paretune.adapt(model, "subspace", targets=TARGETS, dim=50)
    thetas = {id(d.theta_d) for d in deltas(model).values()}
    assert len(thetas) == 1
    x = x_chain()
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
    model(x).pow(2).sum().backward()
    grads = [n for n, p in model.named_parameters() if p.grad is not None]
    assert len(grads) == 1 and grads[0].endswith("bank.theta_d")  # named_parameters lists a shared one once
    assert all(not p.requires_grad for n, p in model.named_parameters() if "deltas" not in n)


@pytest.mark.parametrize("said", [False, True])
def test_counts_and_stored_bytes_are_dim(said, tmp_path):
    model = chain()
    paretune.adapt(model, "subspace", targets=TARGETS, dim=100, said=said)
    cost = assert_trainable_count(model, 100)
    assert cost["stored_bytes"] == 100 * 4
    k = 100 - len(TARGETS) if said else 100
    assert next(iter(deltas(model).values())).theta_d.numel() == k
    paretune.save(model, tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    expected = {"0.theta_d": (k,)} | ({f"{t}.said_scale": (1,) for t in TARGETS} if said else {})
    assert {n: tuple(t.shape) for n, t in tensors.items()} == expected
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == 400
    config = json.loads((tmp_path / "a" / "paretune.json").read_text())["config"]
    assert config["seed"] == 0 and config["projection"] == "fastfood"  # P comes back from these


@pytest.mark.parametrize("projection", ["fastfood", "dense"])
def test_merge_and_save_load(projection, tmp_path):
    def adapted():
        model = chain()
        paretune.adapt(model, "subspace", targets=TARGETS, dim=80, projection=projection, said=True, seed=4)
        set_theta(model)
        with torch.no_grad():
            for i, d in enumerate(deltas(model).values()):
                d.said_scale.fill_(1.5 - 0.2 * i)
        return model

    x = x_chain()
    assert_merge_round_trip(adapted(), x)
    loaded = assert_save_load_exact(adapted(), tmp_path / "s", x)
    assert not any(p.requires_grad for d in deltas(loaded).values() for p in d.parameters())  # trainable=False


def test_the_seed_decides_p_and_the_bias_option_the_biases():
    def delta_of(**options):
        model = chain()
        paretune.adapt(model, "subspace", targets=TARGETS, dim=40, **options)
        set_theta(model)
        d = deltas(model)["1"]
        return d.delta_weight(), d.delta_bias()

    w0, b0 = delta_of(seed=0)
    w0_again, _ = delta_of(seed=0)
    w1, _ = delta_of(seed=1)
    assert torch.equal(w0, w0_again) and not torch.allclose(w0, w1)
    assert b0 is not None and b0.abs().sum() > 0
    w_nb, b_nb = delta_of(bias=False)
    assert b_nb is None and w_nb.shape == w0.shape


def test_dense_cache_does_not_change_the_numbers():
    outs = []
    for cache in ("always", "never"):
        model = chain()
        paretune.adapt(model, "subspace", targets=TARGETS, dim=30, projection="dense", cache=cache)
        assert next(iter(deltas(model).values())).bank.cache is (cache == "always")
        set_theta(model)
        out = model(x_chain())
        out.pow(2).sum().backward()
        outs.append((out.detach(), next(iter(deltas(model).values())).theta_d.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])


def test_a_base_without_bias_and_bias_free_layers():
    model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Linear(5, 3))
    paretune.adapt(model, "subspace", dim=20, targets=["0", "1"])
    d0, d1 = deltas(model).values()
    assert d0.size == 30 and d1.size == 18
    set_theta(model)
    assert d0.delta_bias() is None and d1.delta_bias().shape == (3,)
    assert_merge_round_trip(model, torch.randn(4, 6))


# -- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad,match", [
    ({"dim": D_TOTAL + 1}, f"exceeds the {D_TOTAL:,} parameters"),
    ({"dim": 6, "said": True}, "said=True leaves no projected"),
    ({"dim": 0}, "dim"),
    ({"projection": "sparse"}, "projection"),
    ({"cache": "sometimes"}, "cache"),
])
def test_bad_options_are_clear_errors_and_change_nothing(bad, match):
    model = chain()
    with left_unchanged(model, x_chain()):
        with pytest.raises(ConfigError, match=match):
            paretune.adapt(model, "subspace", targets=TARGETS, **bad)
    assert all(p.requires_grad for p in model.parameters())


def test_dim_equal_to_the_parameter_count_is_allowed():
    model = chain()
    paretune.adapt(model, "subspace", targets=TARGETS, dim=D_TOTAL, projection="fastfood")
    assert paretune.count(model)["trainable"] == D_TOTAL


# -- it learns ---------------------------------------------------------------------------------

@pytest.mark.parametrize("projection", ["fastfood", "dense"])
def test_a_short_run_fits_a_target_in_the_subspace(projection):
    """A target reachable inside the subspace (a teacher made by the same P from another θ_d) is
    fitted: the loss falls by 1000x in 300 Adam steps (one layer: a least-squares problem in θ_d)."""
    def layer():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 6))

    teacher, student = layer(), layer()
    for m in (teacher, student):
        paretune.adapt(m, "subspace", targets=["0"], dim=20, projection=projection, seed=3)
    set_theta(teacher, seed=9, scale=1.0)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = teacher(x)
    theta = next(iter(deltas(student).values())).theta_d
    opt = torch.optim.Adam([theta], lr=0.05)
    losses = []
    for _ in range(300):
        loss = (student(x) - y).pow(2).mean()
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] / 1000


def test_config_defaults_are_li_et_al():
    c = SubspaceConfig()
    assert (c.projection, c.said, c.bias) == ("fastfood", False, True)
