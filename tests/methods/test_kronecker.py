"""Kronecker adapter (DiffuseKronA, Marjit et al. 2024; LoKr, Yeh et al. 2024): ΔW = s·(A ⊗ B).

Checks: LoKr's dimension split, counts == formula on awkward shapes, zero start, the factored
forward == the dense kron, merge / save round trips, which tensors train, equality of ΔW and
outputs with PEFT's LoKr (``peft.LoKrConfig``) for full and low-rank factors, and DiffuseKronA's
reference init (``init="diffusekrona"``: A ~ N(0, (1/a1)²), B = 0, A (64, 4) by default;
IBM/DiffuseKronA diffusekrona/krona.py:12, 36-37).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import paretune
from paretune.bench.budget import plan_budget
from paretune.bench.tuning import tuning_of
from paretune.core.host import Host
from paretune.errors import ConfigError
from paretune.methods.kronecker import (DIFFUSEKRONA_A_SHAPE, KroneckerConfig, KroneckerDelta, kron_plan,
                                        split_dim)

SHAPES = [(8, 16), (16, 12), (64, 64), (30, 7), (7, 30), (13, 13), (96, 64)]  # (d_in, d_out)
OPTIONS = [
    {},
    {"r": 1},
    {"r": 2, "alpha": 4.0},
    {"r": 1, "decompose_both": True},
    {"factor": 2},
    {"factor": 4, "r": 1, "decompose_both": True},
    {"a_shape": (1, 1)},
]


def deltas(model: nn.Module, name: str = "default") -> dict[str, KroneckerDelta]:
    return {n: m.deltas[name] for n, m in model.named_modules() if isinstance(m, Host)}


def one_linear(d_in: int, d_out: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out))


def mlp(seed: int = 0) -> nn.Sequential:
    """Layers whose splits give A and B of different shapes (96 = 8·12, 30 = 5·6, 7 prime)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 30), nn.Tanh(), nn.Linear(30, 7)).eval()


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 5, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.copy_(std * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


# -- shapes and counts -------------------------------------------------------------------------

def test_split_dim_equals_lycoris_factorization():
    from peft.tuners.lokr.layer import factorization

    for dim in range(1, 400):
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 33, 1000):
            assert split_dim(dim, factor) == factorization(dim, factor), (dim, factor)


@pytest.mark.parametrize("d_in, d_out", SHAPES)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_count_equals_formula_and_requires_grad(d_in, d_out, options):
    model = one_linear(d_in, d_out)
    paretune.adapt(model, "kronecker", targets=["0"], **options)
    (d,) = deltas(model).values()
    (a1, a2), (b1, b2) = d.plan.a, d.plan.b
    assert a1 * b1 == d_out and a2 * b2 == d_in
    formula = KroneckerDelta.trainable_formula(d_out, d_in, KroneckerConfig(**options))
    requires_grad = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert paretune.count(model)["trainable"] == formula == requires_grad


@pytest.mark.parametrize("d_in, d_out, options, a, b, count", [
    (64, 64, {}, (8, 8), (8, 8), 128),
    (8, 16, {}, (4, 2), (4, 4), 8 + 16),
    (30, 7, {}, (1, 5), (7, 6), 5 + 42),
    (64, 64, {"r": 1}, (8, 8), (8, 8), 64 + 16),  # 1 < 8/2: B = B_up B_down
    (64, 64, {"r": 4}, (8, 8), (8, 8), 128),  # 4 !< 8/2: B stays full (LoKr's rule)
    (64, 64, {"factor": 2}, (2, 2), (32, 32), 4 + 1024),
    (64, 64, {"factor": 2, "r": 3}, (2, 2), (32, 32), 4 + 3 * 64),
    (16, 12, {"a_shape": [3, 2]}, (3, 2), (4, 8), 6 + 32),
    (16, 12, {"b_shape": (12, 1)}, (1, 16), (12, 1), 16 + 12),
    (64, 128, {"init": "diffusekrona"}, (64, 4), (2, 16), 256 + 32),  # DiffuseKronA's default A
    (64, 128, {"init": "diffusekrona", "factor": 4}, (4, 4), (32, 16), 16 + 512),  # a factor: LoKr's split
    (64, 128, {"init": "diffusekrona", "a_shape": (8, 2)}, (8, 2), (16, 32), 16 + 512),
    (64, 128, {"init": "diffusekrona", "b_shape": (16, 16)}, (8, 4), (16, 16), 32 + 256),
])
def test_shapes_and_counts_by_hand(d_in, d_out, options, a, b, count):
    plan = kron_plan(d_out, d_in, KroneckerConfig(**options))
    assert (plan.a, plan.b, plan.count()) == (a, b, count)


def test_budget_knob_is_the_factor(make_llama):
    tuning = tuning_of("kronecker")
    assert (tuning.knob, tuning.knob_max) == ("factor", 128)
    model = make_llama()
    match = plan_budget(model, "kronecker", 2_000)
    assert match.knob == "factor" and 1_000 <= match.trainable <= 4_000


# -- init, forward, merge, save ----------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, {"r": 2}, {"r": 1, "decompose_both": True}, {"init": "lycoris", "r": 2},
                                     {"init": "diffusekrona", "factor": 4}])
def test_zero_delta_at_init(make_llama, llama_batch, options):
    base, model = make_llama(), make_llama()
    paretune.adapt(model, "kronecker", **options)
    zero = "B" if options.get("init") in ("lycoris", "diffusekrona") else "A"
    for d in deltas(model).values():
        assert torch.count_nonzero(d.delta_weight()) == 0
        assert torch.count_nonzero(d.dense_factor(zero)) == 0
        other = d.dense_factor("B" if zero == "A" else "A")
        assert torch.count_nonzero(other) > 0
    with torch.no_grad():
        assert torch.equal(model(llama_batch).logits, base(llama_batch).logits)


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_factored_forward_equals_dense_kron(options, dtype, atol):
    """The fast path (A X Bᵀ on the reshaped input, no ΔW built) == x @ (s·kron(A, B))ᵀ."""
    model = mlp().to(dtype)
    paretune.adapt(model, "kronecker", **options)
    randomize(model)
    for d in deltas(model).values():
        dw = d.delta_weight()
        assert dw.dtype == dtype and tuple(dw.shape) == (d.d_out, d.d_in)
        torch.testing.assert_close(dw, d.scaling * torch.kron(d.dense_factor("A"), d.dense_factor("B")),
                                   atol=atol, rtol=0)
        x = torch.randn(2, 3, d.d_in, dtype=dtype)
        base_out = torch.randn(2, 3, d.d_out, dtype=dtype)
        for d.a_first in (True, False):  # both multiplication orders
            with torch.no_grad():
                torch.testing.assert_close(d(x, base_out), base_out + x @ dw.T, atol=atol, rtol=0)


def test_multiplication_order_follows_the_cost():
    assert kron_plan(96, 64, KroneckerConfig()).a == (8, 8)
    wide_b = nn.Sequential(nn.Linear(64, 96))  # A (8, 8), B (12, 8): (A X) Bᵀ is cheaper
    square = nn.Sequential(nn.Linear(64, 64))  # A (8, 8), B (8, 8): a tie, X Bᵀ first
    paretune.adapt(wide_b, "kronecker", targets=["0"])
    paretune.adapt(square, "kronecker", targets=["0"])
    assert deltas(wide_b)["0"].a_first and not deltas(square)["0"].a_first


def test_conv1d_host_uses_the_matrix_layout():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(12, 20))  # weight (in=20, out=12)
    w, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    paretune.adapt(model, "kronecker", targets=["0"], r=1)
    randomize(model)
    (d,) = deltas(model).values()
    assert (d.d_out, d.d_in) == (12, 20)
    x = torch.randn(4, 20)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ (w + d.delta_weight().T) + b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("options", [{}, {"r": 2, "alpha": 3.0}, {"a_shape": (2, 2), "r": 1, "decompose_both": True},
                                     {"init": "diffusekrona", "a_shape": (8, 4)},
                                     {"init": "diffusekrona", "factor": 2, "alpha": 0.5}])
def test_merged_equals_unmerged_and_save_load(make_llama, llama_batch, options, tmp_path):
    model = make_llama()
    paretune.adapt(model, "kronecker", **options)
    randomize(model, std=0.05)
    with torch.no_grad():
        expected = model(llama_batch).logits
    paretune.save(model, tmp_path / "kron")
    fresh = make_llama()
    paretune.load(fresh, tmp_path / "kron")
    assert paretune.adapters(fresh)["default"].config == paretune.adapters(model)["default"].config
    paretune.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(llama_batch).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(fresh(llama_batch).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("options, names", [  # Linear 64 -> 96: A (8, 8), B (12, 8) by default
    ({}, {"A", "B"}),
    ({"r": 2}, {"A", "B_up", "B_down"}),
    ({"r": 1, "decompose_both": True}, {"A_up", "A_down", "B_up", "B_down"}),
    ({"r": 3, "decompose_both": True, "factor": 16}, {"A_up", "A_down", "B"}),  # A (16, 16), B (6, 4)
])
def test_only_the_factors_get_gradients(options, names):
    model = nn.Sequential(nn.Linear(64, 96))
    paretune.adapt(model, "kronecker", targets=["0"], **options)
    randomize(model)
    model(torch.randn(5, 64)).pow(2).sum().backward()
    for n, p in model.named_parameters():
        is_adapter = ".deltas." in n
        assert p.requires_grad == is_adapter, n
        assert (p.grad is not None and p.grad.abs().sum() > 0) == is_adapter, n
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == names


# -- DiffuseKronA's reference init ------------------------------------------------------------

def wide(d_in: int = 256, d_out: int = 128, seed: int = 0) -> nn.Sequential:
    """Two layers (256 -> 128 -> 64) that DiffuseKronA's default A (64, 4) divides."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out), nn.Tanh(), nn.Linear(d_out, 64)).eval()


def test_diffusekrona_default_shape_and_init():
    """krona.py:12 rank=(64, 4) = (a1, a2); :36 A ~ N(0, std 1/a1); :37 B = 0."""
    assert DIFFUSEKRONA_A_SHAPE == (64, 4)
    model = wide()
    torch.manual_seed(1)
    paretune.adapt(model, "kronecker", init="diffusekrona")
    ds = deltas(model)
    assert [d.plan.a for d in ds.values()] == [(64, 4), (64, 4)]
    assert [d.plan.b for d in ds.values()] == [(2, 64), (1, 32)]
    a = torch.cat([d.A.detach().flatten() for d in ds.values()])  # 512 draws, std 1/64 each
    assert a.std().item() == pytest.approx(1 / 64, rel=0.15)
    assert abs(a.mean().item()) < 3 * (1 / 64) / a.numel() ** 0.5 + 1e-4
    for d in ds.values():
        assert d.scaling == 1.0 and d.B_up is None and d.A_up is None  # full factors, s = 1
        assert torch.count_nonzero(d.B) == 0 and torch.count_nonzero(d.delta_weight()) == 0


@pytest.mark.parametrize("a_shape", [(16, 64), (64, 16)])
def test_diffusekrona_std_is_one_over_a1(a_shape):
    """A (a1, a2) with a1 != a2 and 1024 entries: the std is 1/a1 (rows, the output side), not 1/a2."""
    model = nn.Sequential(nn.Linear(256, 128))
    torch.manual_seed(2)
    paretune.adapt(model, "kronecker", targets=["0"], init="diffusekrona", a_shape=a_shape)
    (d,) = deltas(model).values()
    assert d.plan.a == a_shape
    assert d.A.std().item() == pytest.approx(1 / a_shape[0], rel=0.08)
    assert torch.count_nonzero(d.B) == 0
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert torch.equal(model(x), model[0].base(x))  # ΔW = 0 at start


def test_diffusekrona_merge_and_save_load_with_the_default_shape(tmp_path):
    model = wide()
    paretune.adapt(model, "kronecker", init="diffusekrona")
    randomize(model, std=0.05)
    x = torch.randn(4, 256)
    with torch.no_grad():
        expected = model(x)
    paretune.save(model, tmp_path / "krona")
    fresh = wide()
    paretune.load(fresh, tmp_path / "krona")
    assert paretune.adapters(fresh)["default"].config == paretune.adapters(model)["default"].config
    assert [d.plan.a for d in deltas(fresh).values()] == [(64, 4), (64, 4)]
    paretune.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(fresh(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("d_in, d_out", [(64, 32), (30, 128)])  # 64 rows do not divide 32; 4 cols not 30
def test_diffusekrona_default_shape_that_does_not_fit_is_a_clear_error(d_in, d_out):
    model = one_linear(d_in, d_out)
    with pytest.raises(ConfigError, match=r"init='diffusekrona' uses DiffuseKronA's default a_shape=\(64, 4\), "
                                          r"which does not fit .*Give a_shape=.*or a factor"):
        paretune.adapt(model, "kronecker", targets=["0"], init="diffusekrona")
    assert not any(isinstance(m, Host) for m in model.modules())  # left as it was
    paretune.adapt(model, "kronecker", targets=["0"], init="diffusekrona", factor=2)  # the suggested way out


# -- equality with PEFT's LoKr -----------------------------------------------------------------

PEFT_NAMES = {"A": "lokr_w1", "A_up": "lokr_w1_a", "A_down": "lokr_w1_b",
              "B": "lokr_w2", "B_up": "lokr_w2_a", "B_down": "lokr_w2_b"}


@pytest.mark.parametrize("ours, theirs", [
    ({}, {"r": 64, "alpha": 64}),  # full factors, s = 1 (DiffuseKronA)
    ({"r": 64, "alpha": 16.0}, {"r": 64, "alpha": 16}),  # full (r past the threshold), s = alpha/r
    ({"r": 2, "alpha": 6.0}, {"r": 2, "alpha": 6}),  # low-rank B
    ({"r": 1, "alpha": 2.0, "decompose_both": True}, {"r": 1, "alpha": 2, "decompose_both": True}),
    ({"r": 1, "alpha": 3.0, "decompose_both": True, "factor": 8},
     {"r": 1, "alpha": 3, "decompose_both": True, "decompose_factor": 8}),
    ({"factor": 4, "r": 3, "alpha": 3.0}, {"r": 3, "alpha": 3, "decompose_factor": 4}),
])
def test_delta_and_outputs_equal_peft_lokr(ours, theirs):
    from peft import LoKrConfig, get_peft_model

    mine = mlp()
    paretune.adapt(mine, "kronecker", **ours)
    randomize(mine)
    ref = get_peft_model(mlp(), LoKrConfig(target_modules=["0", "2", "4"], **theirs))
    ref.eval()
    for name, d in deltas(mine).items():
        layer = ref.base_model.model.get_submodule(name)
        theirs_tensors = {k for k in PEFT_NAMES.values() if "default" in getattr(layer, k)}
        assert theirs_tensors == {PEFT_NAMES[n] for n, _ in d.named_parameters()}, name
        with torch.no_grad():
            for n, p in d.named_parameters():
                getattr(layer, PEFT_NAMES[n])["default"].copy_(p)
        assert layer.scaling["default"] == pytest.approx(d.scaling)
        torch.testing.assert_close(d.delta_weight(), layer.get_delta_weight("default"), atol=1e-5, rtol=0)
    x = torch.randn(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(mine(x), ref(x), atol=1e-5, rtol=0)


# -- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, match", [
    ({"a_shape": (3, 4)}, r"a_shape=\(3, 4\) does not fit .*d_out=16, d_in=8.*one of \[1, 2, 4, 8, 16\]"),
    ({"b_shape": (5, 1)}, r"b_shape=\(5, 1\) does not fit .*drop a_shape/b_shape"),
    ({"a_shape": (2, 2), "b_shape": (4, 4)}, r"a_shape=\(2, 2\), b_shape=\(4, 4\) does not fit"),
])
def test_shapes_that_do_not_fit_the_layer_name_the_valid_ones(options, match):
    model = one_linear(8, 16)
    with pytest.raises(ConfigError, match=match):
        paretune.adapt(model, "kronecker", targets=["0"], **options)
    assert not any(isinstance(m, Host) for m in model.modules())  # left as it was


@pytest.mark.parametrize("options, match", [
    ({"factor": 0}, "factor=0 is invalid.*-1"),
    ({"factor": -2}, "factor=-2 is invalid"),
    ({"a_shape": (2,)}, "a_shape.*two integers"),
    ({"b_shape": (2, 0)}, "b_shape.*two integers"),
    ({"a_shape": (2, 2), "factor": 4}, "either factor=4 or a_shape/b_shape"),
    ({"decompose_both": True}, "decompose_both=True needs a rank r"),
    ({"r": 0}, "r=0 is invalid"),
    ({"alpha": -1.0}, "alpha=-1.0 is invalid"),
    ({"init": "gaussian"}, "init.*'peft', 'lycoris', 'diffusekrona'"),
    ({"init": "diffusekrona", "r": 2}, "init='diffusekrona' is DiffuseKronA's init of two full factors.*Drop r"),
])
def test_bad_options_are_clear_config_errors(options, match):
    with pytest.raises(ConfigError, match=match):
        paretune.adapt(one_linear(8, 16), "kronecker", **options)
