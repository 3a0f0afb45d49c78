"""RandLoRA (Albert et al. 2025): counts n·(r + min_dim), zero start, full rank, shared seeded
bank (dense, sparse, very sparse), save/load of Λ and Γ only, gradients through the custom
autograd, and equality with PEFT's RandLoRA (same bases for the same seed, same ΔW and outputs)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

import paretune
from paretune.methods.randlora import RandLoraConfig, _ScaledA, num_bases

from layer_chain import (SHAPES, TARGETS, assert_bad_options_refused, assert_merge_round_trip,
                         assert_only_these_get_gradients, assert_save_load_exact, assert_trainable_count, chain,
                         deltas, peft_pairs)
from layer_chain import randomise as randomise_unit

BASES = [{}, {"sparse": True}, {"very_sparse": True}]


def randomise(model: nn.Module, seed: int = 3, scale: float = 0.3) -> None:
    """Random Λ, Γ at a scale that keeps the tiny chain's outputs moderate."""
    randomise_unit(model, seed, scale)


# -- counts and init ---------------------------------------------------------------------------

@pytest.mark.parametrize("d_in,d_out", SHAPES)
@pytest.mark.parametrize("r", [1, 3, 4, 50])
@pytest.mark.parametrize("convention", ["paper", "peft"])
def test_trainable_count_is_n_times_r_plus_min_dim(d_in, d_out, r, convention):
    model = nn.Sequential(nn.Linear(d_in, d_out))
    paretune.adapt(model, "randlora", r=r, convention=convention)
    m = min(d_in, d_out)
    n = m // r + 1 if convention == "paper" else math.ceil(m / r)
    assert_trainable_count(model, n * (r + m))
    d = deltas(model)["0"]
    assert d.Lambda.shape == (n, r) and d.Gamma.shape == (n, m)


def test_number_of_bases_reaches_full_rank():
    assert [num_bases(12, r, "peft") for r in (1, 3, 4, 5, 12, 13)] == [12, 4, 3, 3, 1, 1]
    assert [num_bases(12, r) for r in (1, 3, 4, 5, 12, 13)] == [13, 5, 4, 3, 2, 1]  # ⌊m/r⌋ + 1
    for m in range(1, 40):
        for r in range(1, 15):
            n = num_bases(m, r, "peft")
            assert n * r >= m and (n - 1) * r < m
            assert num_bases(m, r) * r >= m


def test_zero_delta_at_init_and_gamma_init(make_llama, llama_batch):
    base, model = make_llama(), make_llama()
    paretune.adapt(model, "randlora", r=8)
    for d in deltas(model).values():
        assert torch.count_nonzero(d.Lambda) == 0
        assert torch.all(d.Gamma == 1 / max(d.n, d.min_dim))
        assert torch.count_nonzero(d.delta_weight()) == 0
    with torch.no_grad():
        assert torch.equal(model(llama_batch).logits, base(llama_batch).logits)


# the defaults, written out here rather than read from the module: paper alpha = 2·r (the authors'
# scripts, with s = alpha / (r·√n)), peft alpha = 20·r (PEFT's default 640 at r = 32, s = alpha / r)
DEFAULT_ALPHA_PER_RANK = {"paper": 2, "peft": 20}


@pytest.mark.parametrize("d_in,d_out,r", [(12, 12, 4), (48, 20, 3), (16, 40, 5), (30, 7, 1)])
@pytest.mark.parametrize("convention", ["paper", "peft"])
def test_default_scaling_follows_each_conventions_own_formula(d_in, d_out, r, convention):
    model = nn.Sequential(nn.Linear(d_in, d_out))
    paretune.adapt(model, "randlora", r=r, convention=convention)
    d = deltas(model)["0"]
    m = min(d_in, d_out)
    alpha = DEFAULT_ALPHA_PER_RANK[convention] * r
    if convention == "paper":
        n = m // r + 1
        expected = alpha / (r * math.sqrt(n))  # NLG/loralib/randlora_layers.py line 133
    else:
        n = math.ceil(m / r)
        expected = alpha / r  # PEFT's layer.py
    assert d.n == n
    assert d.scaling == pytest.approx(expected, rel=1e-12)
    assert d.config.alpha == alpha  # resolved when the config is built, so save writes the number


def test_default_alphas_in_numbers():
    # m = 12, r = 4: paper n = 4, s = 8 / (4·2) = 1; peft n = 3, s = 80 / 4 = 20
    for convention, scaling in (("paper", 1.0), ("peft", 20.0)):
        model = nn.Sequential(nn.Linear(12, 12))
        paretune.adapt(model, "randlora", r=4, convention=convention)
        assert deltas(model)["0"].scaling == pytest.approx(scaling, rel=1e-12)


@pytest.mark.parametrize("convention", ["paper", "peft"])
def test_explicit_alpha_overrides_the_default(convention):
    model = nn.Sequential(nn.Linear(12, 12))
    paretune.adapt(model, "randlora", r=4, alpha=8, convention=convention)
    d = deltas(model)["0"]
    assert d.config.alpha == 8
    # paper: n = 12 // 4 + 1 = 4; peft: s = alpha / r
    assert d.scaling == pytest.approx(8 / 4 / math.sqrt(4) if convention == "paper" else 8 / 4, rel=1e-12)
    # alpha=None is the convention's default, as leaving it out
    model = nn.Sequential(nn.Linear(12, 12))
    paretune.adapt(model, "randlora", r=4, alpha=None, convention=convention)
    assert deltas(model)["0"].config.alpha == DEFAULT_ALPHA_PER_RANK[convention] * 4


def test_save_writes_the_resolved_alpha(tmp_path):
    model = chain()
    paretune.adapt(model, "randlora", r=4, targets=TARGETS)
    paretune.save(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "paretune.json").read_text())
    assert meta["config"]["alpha"] == 8  # 2·r, a number, not null


@pytest.mark.parametrize("convention", ["paper", "peft"])
def test_file_saved_with_alpha_null_loads_as_trained(tmp_path, convention):
    """Files saved before the per-convention defaults hold alpha: null, which meant 20·r under
    both conventions; they must load with that scaling, not the new default."""
    r = 4
    model = chain()
    paretune.adapt(model, "randlora", r=r, alpha=20 * r, targets=TARGETS, convention=convention)
    randomise(model)
    x = torch.randn(4, 8)
    with torch.no_grad():
        ref = model(x)
    paretune.save(model, tmp_path / "old")
    cfg = tmp_path / "old" / "paretune.json"
    meta = json.loads(cfg.read_text())
    meta["config"]["alpha"] = None  # what such a file holds
    meta.pop("checksums")  # and, older than checksums, none of these
    cfg.write_text(json.dumps(meta))
    assert RandLoraConfig.from_dict(meta["config"]).alpha == DEFAULT_ALPHA_PER_RANK[convention] * r  # the new meaning
    assert RandLoraConfig.upgrade(meta["config"])["alpha"] == 20 * r

    fresh = chain()
    paretune.load(fresh, tmp_path / "old")
    for name, d in deltas(fresh).items():
        n = d.n
        assert d.scaling == pytest.approx(20 / math.sqrt(n) if convention == "paper" else 20.0, rel=1e-12), name
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref, atol=0, rtol=0)
    # hot-swapping the old file onto the adapter it loaded as is accepted (same options once upgraded)
    paretune.hot_swap(fresh, tmp_path / "old")


def test_upgrade_keeps_a_saved_number():
    saved = RandLoraConfig(r=4, alpha=3.0).to_dict()
    assert RandLoraConfig.upgrade(saved) == saved
    assert RandLoraConfig(r=4).to_dict()["alpha"] == 8


def test_peft_convention_default_equals_peft_default():
    """PEFT's RandLoraConfig defaults (r = 32, randlora_alpha = 640) against ours with
    convention="peft" and no alpha."""
    from peft import RandLoraConfig as PeftConfig, get_peft_model

    ours, theirs = chain(), chain()
    paretune.adapt(ours, "randlora", targets=TARGETS, convention="peft")
    peft_model = get_peft_model(theirs, PeftConfig(target_modules=TARGETS))
    for t in TARGETS:
        layer = peft_model.base_model.model.get_submodule(t)
        assert ours.get_submodule(t).deltas["default"].scaling == layer.scaling["default"] == 20.0


@pytest.mark.parametrize("d_in,d_out,r,options", [(i, o, 3, {}) for i, o in SHAPES]
                         + [(64, 48, 16, {"sparse": True}), (48, 64, 64, {"very_sparse": True})])
def test_delta_has_full_rank(d_in, d_out, r, options):
    """n·r >= min_dim, so Σ B_i diag(λ_i) A diag(γ_i) reaches full rank for random Λ, Γ. (Sparse
    bases need r large enough that no column of the shared A is all zero, P = (1 - p_nonzero)^r.)"""
    model = nn.Sequential(nn.Linear(d_in, d_out))
    paretune.adapt(model, "randlora", r=r, **options)
    randomise(model)
    dw = deltas(model)["0"].delta_weight().double()
    assert torch.linalg.matrix_rank(dw).item() == min(d_in, d_out)


# -- bases -------------------------------------------------------------------------------------

def test_dense_bases_have_unit_std():
    model = nn.Sequential(nn.Linear(256, 512))
    paretune.adapt(model, "randlora", r=32)
    bank = deltas(model)["0"].bank
    assert bank.A.shape == (32, 256) and bank.B.shape == (512, 9 * 32)  # n = 256 // 32 + 1
    for t in (bank.A, bank.B):
        assert abs(t.std().item() - 1) < 0.01 and abs(t.mean().item()) < 0.05
        assert t.abs().max() < math.sqrt(3) * 1.02  # a uniform of unit std


@pytest.mark.parametrize("options,p_nonzero", [({"sparse": True}, 1 / 3), ({"very_sparse": True}, 1 / 16)])
def test_sparse_bases_are_ternary(options, p_nonzero):
    model = nn.Sequential(nn.Linear(256, 512))
    paretune.adapt(model, "randlora", r=32, **options)
    bank = deltas(model)["0"].bank
    for t in (bank.A, bank.B):
        values = torch.unique(t)
        assert len(values) == 3 and values[1] == 0 and torch.isclose(values[0], -values[2])
        assert abs((t != 0).float().mean().item() - p_nonzero) < 0.02
        assert abs((t > 0).float().mean().item() - (t < 0).float().mean().item()) < 0.02
        assert abs(t.std().item() - 1) < 1e-5


def test_layers_share_one_bank_sliced_from_the_largest_dims():
    model = chain()
    paretune.adapt(model, "randlora", r=4, targets=TARGETS)
    ds = list(deltas(model).values())
    bank = ds[0].bank
    assert all(d.bank is bank for d in ds)
    # largest (d_out, d_in) over the targets: (30, 30); m = 30, n = 8
    assert bank.A.shape == (4, 30) and bank.B.shape == (30, 8 * 4)
    assert not any("bank" in k for k in model.state_dict())


def test_bank_stays_shared_after_moving_to_float64():
    model = chain()
    paretune.adapt(model, "randlora", r=4, targets=TARGETS)
    randomise(model)
    x = torch.randn(3, 8)
    with torch.no_grad():
        ref = model(x).double()
    model.to(torch.float64)
    ds = list(deltas(model).values())
    assert all(d.bank is ds[0].bank for d in ds)
    assert ds[0].bank.B.dtype == torch.float64 and ds[0].Gamma.dtype == torch.float64
    assert len({d.bank.B.data_ptr() for d in ds}) == 1
    with torch.no_grad():
        torch.testing.assert_close(model(x.double()), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("options", BASES)
def test_bases_depend_on_the_seed_only(options):
    m1, m2, m3 = chain(), chain(1), chain()
    for m, seed in ((m1, 7), (m2, 7), (m3, 8)):
        paretune.adapt(m, "randlora", r=4, targets=TARGETS, seed=seed, **options)
    b1, b2, b3 = (next(iter(deltas(m).values())).bank for m in (m1, m2, m3))
    assert torch.equal(b1.A, b2.A) and torch.equal(b1.B, b2.B)
    assert not torch.equal(b1.B, b3.B)


# -- merge, save / load, gradients -------------------------------------------------------------

def test_merged_equals_unmerged():
    model = chain()
    paretune.adapt(model, "randlora", r=4, targets=TARGETS)
    randomise(model)
    assert_merge_round_trip(model, torch.randn(4, 8), atol=1e-4, rtol=1e-4)


def test_save_load_stores_only_lambda_and_gamma(tmp_path):
    model = chain()
    paretune.adapt(model, "randlora", r=4, targets=TARGETS, sparse=True)
    randomise(model)
    assert_save_load_exact(model, tmp_path / "a", torch.randn(4, 8))

    path = tmp_path / "a" / "adapter.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert keys == {f"{t}.{v}" for t in TARGETS for v in ("Lambda", "Gamma")}
    shapes = [(8, 16), (16, 8), (8, 12), (12, 12), (12, 30), (30, 7)]
    trainable_bytes = 4 * sum(num_bases(min(s), 4) * (4 + min(s)) for s in shapes)  # paper convention
    assert path.stat().st_size < trainable_bytes + 2048
    assert paretune.count(model)["stored_bytes"] == trainable_bytes


def test_only_lambda_and_gamma_get_gradients():
    model = chain()
    paretune.adapt(model, "randlora", r=4, targets=TARGETS)
    randomise(model)
    model(torch.randn(4, 8)).pow(2).sum().backward()
    assert_only_these_get_gradients(model, ("Lambda", "Gamma"))


def test_custom_autograd_gradient_is_exact():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 7, generator=g, dtype=torch.float64)
    lam = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    gamma = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_ScaledA.apply, (a, lam, gamma))
    # rows k·n + i hold Λ[i, k]·A[k]·Γ[i]
    out = _ScaledA.apply(a, lam, gamma)
    torch.testing.assert_close(out[2 * 4 + 1], lam[1, 2] * a[2] * gamma[1])


def test_dropout_acts_in_training_only():
    model = nn.Sequential(nn.Linear(8, 8))
    paretune.adapt(model, "randlora", r=4, dropout=0.5)
    randomise(model)
    x = torch.randn(64, 8)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("bad", [{"r": 0}, {"r": -1}, {"r": 1.5}, {"alpha": -1}, {"dropout": 1.0}, {"seed": -3},
                                 {"sparse": True, "very_sparse": True}, {"sparse": "yes"}, {"n": 3}])
def test_bad_options_are_config_errors(bad):
    assert_bad_options_refused("randlora", bad)


# -- equality with PEFT ------------------------------------------------------------------------

def _peft_pair(model_fn, targets, r, alpha, options, seed=0, **peft_kw):
    from peft import RandLoraConfig, get_peft_model

    ours, theirs = model_fn(), model_fn()
    paretune.adapt(ours, "randlora", r=r, alpha=alpha, seed=seed, targets=targets, convention="peft", **options)
    cfg = RandLoraConfig(r=r, randlora_alpha=alpha, target_modules=targets, projection_prng_key=seed,
                         **options, **peft_kw)
    peft_model = get_peft_model(theirs, cfg)

    def copy(d, layer, g):
        d.Lambda.copy_(0.3 * torch.randn(d.Lambda.shape, generator=g))
        d.Gamma.copy_(0.3 * torch.randn(d.Gamma.shape, generator=g))
        layer.randlora_lambda["default"].copy_(d.Lambda.T)  # PEFT keeps Λ as (r, n)
        layer.randlora_gamma["default"].copy_(d.Gamma)

    return ours, peft_model, peft_pairs(ours, peft_model, targets, copy)


@pytest.mark.parametrize("options", BASES)
@pytest.mark.parametrize("r,seed", [(3, 0), (4, 99)])
def test_equals_peft_on_linear_layers(options, r, seed):
    ours, peft_model, pairs = _peft_pair(chain, TARGETS, r=r, alpha=2 * r, options=options, seed=seed)
    for d, layer in pairs:
        assert d.n == layer.num_bases
        assert torch.equal(d.bank.A, layer.randlora_A["default"][:, 0, :])
        assert torch.equal(d.bank.B, layer.randlora_B["default"].flatten(1))
        torch.testing.assert_close(d.delta_weight(), layer.get_delta_weight("default"), atol=1e-5, rtol=0)
    x = torch.randn(5, 8)
    with torch.no_grad():
        # outputs reach ~80 here, where a float32 ulp is 7.6e-6: the two orders of the same sum
        # (ours adds s·B(Ax) into the base output with one addmm) differ by a few ulps, hence rtol
        torch.testing.assert_close(ours(x), peft_model(x), atol=1e-5, rtol=1e-6)
    # and the same gradients for Λ and Γ
    y = torch.randn(5, 7)
    ((ours(x) - y) ** 2).sum().backward()
    ((peft_model(x) - y) ** 2).sum().backward()
    # float32 rounding scales with the largest terms summed, not with each entry (the entries
    # range over orders of magnitude): tolerance relative to the largest entry. Measured: ours and
    # PEFT are both within 6e-7 of it from a float64 run; a wrong formula is off by O(1).
    for d, layer in pairs:
        for ours_g, peft_g in ((d.Lambda.grad, layer.randlora_lambda["default"].grad.T),
                               (d.Gamma.grad, layer.randlora_gamma["default"].grad)):
            torch.testing.assert_close(ours_g, peft_g, atol=1e-5 * peft_g.abs().max().item(), rtol=1e-5)


def test_equals_peft_on_gpt2_conv1d():
    from transformers.pytorch_utils import Conv1D

    def gpt2_like() -> nn.Sequential:
        torch.manual_seed(0)
        model = nn.Sequential(Conv1D(24, 8), Conv1D(8, 24))  # Conv1D(nf=out, nx=in)
        for m in model:
            nn.init.normal_(m.weight, std=0.3)
        return model

    ours, peft_model, pairs = _peft_pair(gpt2_like, ["0", "1"], r=3, alpha=6, options={}, fan_in_fan_out=True)
    for d, layer in pairs:
        torch.testing.assert_close(d.delta_weight().T, layer.get_delta_weight("default"), atol=1e-5, rtol=0)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peft_model(x), atol=1e-5, rtol=1e-6)
