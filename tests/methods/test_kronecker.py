"""Kronecker adapter (DiffuseKronA, Marjit et al. 2024; LoKr, Yeh et al. 2024): ΔW = s·(A ⊗ B).

Checks: LoKr's dimension split, counts == formula on awkward shapes, zero start, the factored
forward == the dense kron, merge / save round trips, which tensors train, and equality of ΔW and
outputs with PEFT's LoKr (``peft.LoKrConfig``) for full and low-rank factors.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import paretune
from paretune.bench.budget import plan_budget
from paretune.core import registry
from paretune.core.host import Host
from paretune.errors import ConfigError
from paretune.methods.kronecker import KroneckerConfig, KroneckerDelta, kron_plan, split_dim

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
])
def test_shapes_and_counts_by_hand(d_in, d_out, options, a, b, count):
    plan = kron_plan(d_out, d_in, KroneckerConfig(**options))
    assert (plan.a, plan.b, plan.count()) == (a, b, count)


def test_budget_knob_is_the_factor(make_llama):
    spec = registry.get("kronecker")
    assert (spec.budget_option, spec.budget_max) == ("factor", 128)
    model = make_llama()
    match = plan_budget(model, "kronecker", 2_000)
    assert match.knob == "factor" and 1_000 <= match.trainable <= 4_000


# -- init, forward, merge, save ----------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, {"r": 2}, {"r": 1, "decompose_both": True}, {"init": "lycoris", "r": 2}])
def test_zero_delta_at_init(make_llama, llama_batch, options):
    base, model = make_llama(), make_llama()
    paretune.adapt(model, "kronecker", **options)
    zero = "B" if options.get("init") == "lycoris" else "A"
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


@pytest.mark.parametrize("options", [{}, {"r": 2, "alpha": 3.0}, {"a_shape": (2, 2), "r": 1, "decompose_both": True}])
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
    ({"init": "gaussian"}, "init.*'peft', 'lycoris'"),
])
def test_bad_options_are_clear_config_errors(options, match):
    with pytest.raises(ConfigError, match=match):
        paretune.adapt(one_linear(8, 16), "kronecker", **options)
