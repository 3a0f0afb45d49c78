"""LoCA: ΔW = scale·iDCT2(S) with n coefficients at learnable locations. Checked against an
independent computation: the DCT matrices built here from the cosine formula (and scipy), the
reference's finite-difference location gradient recomputed from the loss itself, and the
reference's alternating schedule replayed as its ``forward`` toggles ``requires_grad``."""

import math

import numpy as np
import pytest
import scipy.fft
import torch
from torch import nn

import paretune
from paretune.core.host import Host
from paretune.errors import ConfigError
from paretune.methods import loca as loca_mod
from paretune.methods.loca import IdctWithLocationGrad, LocaConfig, layer_seed, phase_of

from layer_chain import (assert_bad_options_refused, assert_merge_round_trip, assert_only_these_get_gradients,
                         assert_save_load_exact, assert_trainable_count, left_unchanged)


def _deltas(model):
    return [m.deltas["default"] for m in model.modules() if isinstance(m, Host)]


def _model(shapes=((12, 9),), dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(i, o) for i, o in shapes]).to(dtype).eval()


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix C[k, j] = √(2/N) cos(π(2j+1)k / 2N), row 0 / √2 (float64)."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    c = math.sqrt(2 / n) * torch.cos(math.pi * (2 * j + 1) * k / (2 * n))
    c[0] /= math.sqrt(2)
    return c


def dense_reference(coef: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    """C_{d_out}ᵀ S C_{d_in} with S summing the coefficients at (rows, cols): autograd-differentiable."""
    s = torch.zeros(d_out, d_in, dtype=coef.dtype).index_put((rows, cols), coef, accumulate=True)
    return dct_matrix(d_out).T @ s @ dct_matrix(d_in)


def reference_indices(u: torch.Tensor, ratio: float, d_out: int, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """spectrum_to_para: clamp(l, 0, 0.999)·(d − 1), rounded."""
    lo = (ratio * u.detach()).clamp(0, 0.999)
    return (lo[0] * (d_out - 1)).round().long(), (lo[1] * (d_in - 1)).round().long()


# -- the transform -------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 8, 13, 64])
def test_dct_is_the_orthonormal_matrix_and_scipys(n):
    x = torch.randn(4, n, dtype=torch.float64)
    c = dct_matrix(n)
    torch.testing.assert_close(loca_mod.dct(x), x @ c.T, atol=1e-12, rtol=0)
    torch.testing.assert_close(loca_mod.idct(x), x @ c, atol=1e-12, rtol=0)
    np.testing.assert_allclose(loca_mod.dct(x).numpy(), scipy.fft.dct(x.numpy(), norm="ortho", axis=-1), atol=1e-12)
    m = torch.randn(n, n + 3, dtype=torch.float64)
    np.testing.assert_allclose(loca_mod.dct2(m).numpy(), scipy.fft.dctn(m.numpy(), norm="ortho"), atol=1e-12)
    np.testing.assert_allclose(loca_mod.idct2(m).numpy(), scipy.fft.idctn(m.numpy(), norm="ortho"), atol=1e-12)


# -- init and ΔW ---------------------------------------------------------------------------------

def test_init_zero_coefficients_uniform_locations_private_generator():
    model = _model([(40, 30)], dtype=torch.float32)
    x = torch.randn(3, 40)
    want = model(x)
    rng = torch.get_rng_state()
    paretune.adapt(model, "loca", n_frequency=500, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)
    d = _deltas(model)[0]
    assert d.coefficients.shape == (500,) and d.locations.shape == (2, 500)
    assert d.coefficients.abs().sum() == 0 and d.delta_weight().abs().max() == 0
    expected = torch.rand(2, 500, generator=torch.Generator().manual_seed(layer_seed(3, 0)))
    torch.testing.assert_close(d.locations.detach(), expected, atol=0, rtol=0)
    assert 0 <= float(d.locations.detach().min()) and float(d.locations.detach().max()) < 1
    torch.testing.assert_close(model(x), want, atol=0, rtol=0)
    assert layer_seed(3, 0) != layer_seed(3, 1) != layer_seed(4, 1)


@pytest.mark.parametrize("ratio", [1.0, 0.05])
def test_delta_weight_is_scale_times_idct_of_the_sparse_spectrum(ratio):
    d_in, d_out, n, scale = 12, 9, 30, 1.7
    model = _model([(d_in, d_out)])
    paretune.adapt(model, "loca", n_frequency=n, scale=scale, location_lr_ratio=ratio)
    d = _deltas(model)[0]
    with torch.no_grad():
        d.coefficients.normal_()
        d.locations[:, :3] = torch.tensor([[0.5, 0.5, 1.3], [0.25, 0.25, -0.2]]) / ratio  # a duplicate, and clamps
    rows, cols = reference_indices(d.locations, ratio, d_out, d_in)
    assert (rows[0], cols[0]) == (rows[1], cols[1]) and (rows[2], cols[2]) == (d_out - 1, 0)  # 0.999·8 → 8
    want = scale * dense_reference(d.coefficients.detach(), rows, cols, d_out, d_in)
    torch.testing.assert_close(d.delta_weight(), want, atol=1e-12, rtol=0)
    x = torch.randn(5, d_in, dtype=torch.float64)
    base = model[0].base
    torch.testing.assert_close(model(x), x @ (base.weight + want).T + base.bias, atol=1e-12, rtol=0)


# -- the custom backward -------------------------------------------------------------------------

def test_coefficient_gradient_equals_autograd_through_the_dense_idct():
    d_out, d_in, n = 11, 7, 25
    g = torch.Generator().manual_seed(0)
    coef = torch.randn(n, dtype=torch.float64, generator=g)
    rows = torch.randint(0, d_out, (n,), generator=g)
    cols = torch.randint(0, d_in, (n,), generator=g)
    rows[1], cols[1] = rows[0], cols[0]  # a duplicate location
    x = torch.randn(6, d_in, dtype=torch.float64, generator=g)
    y = torch.randn(6, d_out, dtype=torch.float64, generator=g)

    def loss(dw):
        return ((x @ dw.T - y) ** 2).sum() + torch.sin(dw).sum()

    a = coef.clone().requires_grad_(True)
    pos = torch.stack([rows, cols]).double()
    dw = IdctWithLocationGrad.apply(a, pos, d_out, d_in, False)
    loss(dw).backward()
    b = coef.clone().requires_grad_(True)
    ref = dense_reference(b, rows, cols, d_out, d_in)
    torch.testing.assert_close(dw.detach(), ref.detach(), atol=1e-12, rtol=0)
    loss(ref).backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=0)


def _location_setup(seed=0, d_out=10, d_in=9, n=6, size=0.01):
    g = torch.Generator().manual_seed(seed)
    coef = size * torch.randn(n, dtype=torch.float64, generator=g)
    rows = torch.randint(1, d_out - 1, (n,), generator=g)  # interior: both neighbours exist
    cols = torch.randint(1, d_in - 1, (n,), generator=g)
    return coef, rows, cols


def _fd(loss_of_dw, coef, rows, cols, d_out, d_in, i, axis):
    """Central finite difference of the loss in location i along an axis, one index either way
    (½·(L(p + 1) − L(p − 1)), the others held), through the independent dense iDCT."""
    out = []
    for step in (1, -1):
        r, c = rows.clone(), cols.clone()
        (r if axis == 0 else c)[i] += step
        out.append(float(loss_of_dw(dense_reference(coef, r, c, d_out, d_in))))
    return 0.5 * (out[0] - out[1])


def test_location_gradient_is_the_central_difference_of_the_loss():
    d_out, d_in = 10, 9
    coef, rows, cols = _location_setup(d_out=d_out, d_in=d_in, size=1.0)
    t = torch.randn(d_out, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.1

    def linear(dw):  # a loss linear in ΔW: the reference's estimate is exactly the central difference
        return (t * dw).sum()

    pos = torch.stack([rows, cols]).double().requires_grad_(True)
    linear(IdctWithLocationGrad.apply(coef, pos, d_out, d_in, False)).backward()
    assert pos.grad.abs().max() < 1  # below the clamp
    for i in range(len(coef)):
        for axis in (0, 1):
            want = _fd(linear, coef, rows, cols, d_out, d_in, i, axis)
            assert abs(float(pos.grad[axis, i]) - want) < 1e-12, (i, axis)

    # a non-linear loss: the estimate is the difference to first order in the (small) coefficients
    x = torch.randn(8, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.randn(8, d_out, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def quadratic(dw):
        return ((x @ dw.T - y) ** 2).sum()

    coef = coef * 1e-5
    pos = torch.stack([rows, cols]).double().requires_grad_(True)
    quadratic(IdctWithLocationGrad.apply(coef, pos, d_out, d_in, False)).backward()
    for i in range(len(coef)):
        for axis in (0, 1):
            want = _fd(quadratic, coef, rows, cols, d_out, d_in, i, axis)
            got = float(pos.grad[axis, i])
            assert abs(got - want) <= 1e-4 * abs(want), (i, axis, got, want)


def test_location_gradient_at_the_edges_and_its_clamp():
    """At an edge the missing neighbour is the location itself (one-sided, still halved), and the
    estimate is clamped to [−1, 1], as the reference's backward."""
    d_out, d_in = 6, 5
    coef = torch.tensor([2.0, -3.0, 50.0], dtype=torch.float64)
    rows, cols = torch.tensor([0, d_out - 1, 2]), torch.tensor([d_in - 1, 0, 2])
    gw = torch.randn(d_out, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    pos = torch.stack([rows, cols]).double().requires_grad_(True)
    (gw * IdctWithLocationGrad.apply(coef, pos, d_out, d_in, False)).sum().backward()
    k = dct_matrix(d_out) @ gw @ dct_matrix(d_in).T  # DCT2 of ∂L/∂ΔW
    want = torch.stack([
        0.5 * coef * torch.stack([k[1, 4] - k[0, 4], k[5, 0] - k[4, 0], k[3, 2] - k[1, 2]]),
        0.5 * coef * torch.stack([k[0, 4] - k[0, 3], k[5, 1] - k[5, 0], k[2, 3] - k[2, 1]]),
    ]).clamp(-1, 1)
    torch.testing.assert_close(pos.grad, want, atol=1e-12, rtol=0)
    assert pos.grad[:, 2].abs().max() == 1  # the large coefficient's estimate hits the clamp


@pytest.mark.parametrize("ratio", [1.0, 0.1])
def test_the_location_parameter_gets_the_chain_rule_of_the_estimate(ratio):
    """∂L/∂u = ρ·(d − 1)·estimate where 0 ≤ ρu ≤ 0.999, 0 where the clamp holds it."""
    d_in, d_out, n = 9, 10, 8
    model = _model([(d_in, d_out)])
    paretune.adapt(model, "loca", n_frequency=n, location_lr_ratio=ratio)
    d = _deltas(model)[0]
    with torch.no_grad():
        d.coefficients.copy_(0.01 * torch.randn(n, dtype=torch.float64))
        d.locations[0, 0] = 1.2 / ratio  # clamped: no gradient along rows
    x = torch.randn(4, d_in, dtype=torch.float64)
    t = torch.randn(4, d_out, dtype=torch.float64)
    ((model(x) - t) ** 2).sum().backward()
    pos = d.positions().detach().requires_grad_(True)
    dw = d.scaling * IdctWithLocationGrad.apply(d.coefficients.detach(), pos, d_out, d_in, False)
    ((x @ (model[0].base.weight + dw).T + model[0].base.bias - t) ** 2).sum().backward()
    scale = torch.tensor([[ratio * (d_out - 1)], [ratio * (d_in - 1)]], dtype=torch.float64)
    want = pos.grad * scale
    want[0, 0] = 0
    torch.testing.assert_close(d.locations.grad, want, atol=1e-12, rtol=0)
    assert d.locations.grad[1, 0] != 0


# -- the schedule --------------------------------------------------------------------------------

def reference_phases(total: int, learn_location_iter: int, ba: int = 10, bl: int = 20) -> list[str]:
    """Replay of the reference's forward: requires_grad of spectrum / spectrum_indices toggled at
    each training iteration (cycle length ba + bl, switch at ba)."""
    coef, loc, out = True, True, []
    for it in range(total):
        if it == 0:
            coef, loc = True, False
        else:
            if it < learn_location_iter:
                pos = it % (ba + bl)
                if pos == 0:
                    coef, loc = True, False
                if pos == ba:
                    coef, loc = False, True
            if it == learn_location_iter:
                coef, loc = True, False
        assert coef != loc
        out.append("locations" if loc else "coefficients")
    return out


@pytest.mark.parametrize("total,fraction,ba,bl", [(1000, 0.1, 10, 20), (150, 0.1, 10, 20), (200, 0.5, 3, 5),
                                                  (50, 1.0, 10, 20), (40, 0.0, 10, 20), (7, 0.9, 1, 1)])
def test_schedule_is_the_references(total, fraction, ba, bl):
    cfg = LocaConfig(location_fraction=fraction, coefficient_steps=ba, location_steps=bl)
    got = [phase_of(s, total, cfg) for s in range(total)]
    assert got == reference_phases(total, math.floor(fraction * total), ba, bl)
    if total == 1000:
        assert got.count("locations") == 60 and got[10:30] == ["locations"] * 20 and got[30] == "coefficients"


def test_locations_move_only_in_location_phases_under_adamw():
    d_in, d_out, n, total = 24, 16, 20, 60
    model = _model([(d_in, d_out)], dtype=torch.float32)
    paretune.adapt(model, "loca", n_frequency=n, location_fraction=0.5)  # locations may learn until step 30
    d = _deltas(model)[0]
    model.train()
    opt = torch.optim.AdamW([d.coefficients, d.locations], lr=0.05, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, d_in, generator=g)
    y = torch.randn(32, d_out, generator=g)
    moved_cells = False
    start_cells = d.indices()
    for step in range(total):
        before_l, before_a = d.locations.detach().clone(), d.coefficients.detach().clone()
        ((model(x) - y) ** 2).mean().backward()
        phase = phase_of(step, total, d.config)
        if step == 0:
            assert d.phase is None and d.locations.grad is None  # zero coefficients: no location gradient
        elif phase == "coefficients":
            assert d.locations.grad is None and d.coefficients.grad is not None
        else:
            assert d.coefficients.grad is None and d.locations.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad(set_to_none=True)
        d.on_step(step + 1, total)
        l_same = torch.equal(d.locations.detach(), before_l)
        a_same = torch.equal(d.coefficients.detach(), before_a)
        if phase == "coefficients":
            assert l_same and not a_same, step
        else:
            assert a_same and not l_same, step
            moved_cells = moved_cells or any(not torch.equal(a, b) for a, b in zip(d.indices(), start_cells))
    assert moved_cells  # the integer locations changed, not only the continuous parameter
    assert [phase_of(s, total, d.config) for s in range(total)].count("locations") == 20
    d.on_step(15, total)  # a resumed run picks the phase up from the step alone
    assert d.phase == "locations"


def test_location_lr_ratio_scales_the_locations_step():
    """Under Adam, a location step moves l = ρ·u by ρ times what it moves with ρ = 1 (as a
    parameter group at ρ·lr would)."""
    moves = {}
    for ratio in (1.0, 0.02):
        model = _model([(16, 12)])
        paretune.adapt(model, "loca", n_frequency=10, location_lr_ratio=ratio)
        d = _deltas(model)[0]
        with torch.no_grad():
            d.coefficients.copy_(torch.linspace(-1, 1, 10, dtype=torch.float64))
        d.on_step(10, 1000)
        assert d.phase == "locations"
        opt = torch.optim.Adam([d.coefficients, d.locations], lr=1e-3, eps=1e-30)
        before = ratio * d.locations.detach().clone()
        x = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        (model(x) ** 2).sum().backward()
        opt.step()
        moves[ratio] = ratio * d.locations.detach() - before
    assert moves[1.0].abs().max() > 0
    torch.testing.assert_close(moves[0.02], 0.02 * moves[1.0], atol=1e-12, rtol=1e-9)


# -- the contract ----------------------------------------------------------------------------------

def test_count_is_three_n_per_layer_and_only_adapter_gets_gradients():
    shapes = [(12, 20), (20, 7)]
    model = _model(shapes)
    paretune.adapt(model, "loca", n_frequency=17)
    assert_trainable_count(model, 2 * 3 * 17)
    assert LocaConfig().n_frequency == 1000  # the paper's GLUE setting
    assert loca_mod.LocaDelta.trainable_formula(384, 384, LocaConfig(n_frequency=631)) == 1893  # 37 x -> 70,041
    for d in _deltas(model):
        with torch.no_grad():
            d.coefficients.normal_()
    model.train()
    model(torch.randn(3, 12, dtype=torch.float64)).pow(2).sum().backward()
    assert_only_these_get_gradients(model, (".deltas.default.coefficients", ".deltas.default.locations"), bank=False)


def test_merge_equals_unmerged_and_save_load_is_exact(tmp_path):
    model = _model([(12, 20), (20, 7)])
    paretune.adapt(model, "loca", n_frequency=40, scale=0.5)
    for d in _deltas(model):
        with torch.no_grad():
            d.coefficients.normal_()
            d.locations.add_(0.1 * torch.randn_like(d.locations))
    x = torch.randn(5, 12, dtype=torch.float64)
    fresh = assert_save_load_exact(model, tmp_path / "a", x, make=lambda: _model([(12, 20), (20, 7)]))
    assert_merge_round_trip(model, x, atol=1e-12, rtol=0)
    for a, b in zip(_deltas(model), _deltas(fresh)):
        assert set(a.stored_state()) == {"coefficients", "locations"}
        for k, v in a.stored_state().items():
            assert torch.equal(b.stored_state()[k], v), k


def test_dropout_on_the_adapter_input_in_train_mode_only():
    model = _model([(10, 10)], dtype=torch.float32)
    paretune.adapt(model, "loca", n_frequency=30, dropout=0.5)
    d = _deltas(model)[0]
    with torch.no_grad():
        d.coefficients.normal_()
    x = torch.randn(64, 10)
    model.eval()
    with torch.no_grad():
        clean = model(x)
        model.train()
        torch.manual_seed(0)
        noisy = model(x)
    assert not torch.allclose(clean, noisy)


def test_conv1d_host():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(6, 10))  # weight (in=10, out=6)
    paretune.adapt(model, "loca", n_frequency=12, targets=["0"])
    d = _deltas(model)[0]
    with torch.no_grad():
        d.coefficients.normal_()
    x = torch.randn(3, 10)
    base = model[0].base
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ (base.weight + d.delta_weight().T) + base.bias, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad", [
    {"n_frequency": 0}, {"n_frequency": 2.5}, {"coefficient_steps": 0}, {"location_steps": 0},
    {"location_steps": 1.5}, {"location_fraction": 1.5}, {"location_fraction": -0.1},
    {"location_lr_ratio": 0}, {"location_lr_ratio": float("inf")}, {"scale": float("nan")}, {"dropout": 1.0},
    {"seed": -1},
])
def test_bad_options(bad):
    assert_bad_options_refused("loca", bad, _model())


def test_more_coefficients_than_entries_is_refused_and_leaves_the_model():
    model = _model([(4, 3), (3, 5)])  # 12 and 15 entries
    with (left_unchanged(model, torch.randn(2, 4, dtype=torch.float64)),
          pytest.raises(ConfigError, match="n_frequency=13 is larger than the 12 entries")):
        paretune.adapt(model, "loca", n_frequency=13)
    with pytest.raises(ConfigError):
        loca_mod.LocaDelta.trainable_formula(3, 4, LocaConfig(n_frequency=13))
    paretune.adapt(model, "loca", n_frequency=12)  # exactly d_out·d_in of the smaller layer is fine
