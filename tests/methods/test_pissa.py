"""PiSSA (Meng et al. 2024): the adapter starts at W's top-r singular triplets, the base keeps the
residual, W_res + s·B·A == W at init; training it is LoRA on the residual; unloading gives W back.

Names: paretune keeps LoRA's names (A: r×d_in, down; B: d_out×r, up). The paper's (and
research/methods.md's) d_out×r factor U_r S_r^{1/2} is paretune's B, its r×d_in factor
S_r^{1/2} V_rᵀ is paretune's A; with s = alpha/r ≠ 1 both carry S_r/s instead of S_r.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import paretune
from paretune.core.host import Host
from paretune.errors import ConfigError
from paretune.methods.pissa import PissaConfig, PissaDelta


def hosts_of(model: nn.Module) -> dict[str, Host]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Host)}


def linear_with_spectrum(d_out: int, d_in: int, decay: float = 0.6, seed: int = 0) -> nn.Sequential:
    """A Linear whose singular values fall geometrically (distinct, with clear gaps)."""
    g = torch.Generator().manual_seed(seed)
    k = min(d_out, d_in)
    u, _ = torch.linalg.qr(torch.randn(d_out, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_in, k, generator=g, dtype=torch.float64))
    s = 3.0 * decay ** torch.arange(k, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(d_in, d_out))
    with torch.no_grad():
        model[0].weight.copy_((u * s) @ v.T)
    return model


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.05 * torch.randn(p.shape, generator=g))


# -- the residual identity ----------------------------------------------------------------------

@pytest.mark.parametrize("niter, atol", [(None, 1e-5), (4, 1e-5), (0, 1e-5)])
@pytest.mark.parametrize("r, alpha, rslora", [(4, 4.0, False), (4, 16.0, False), (3, 5.0, True)])
def test_residual_plus_principal_part_is_W(make_mlp, niter, atol, r, alpha, rslora):
    original = make_mlp()
    model = make_mlp()
    paretune.adapt(model, "pissa", r=r, alpha=alpha, rslora=rslora, niter=niter)
    hosts = hosts_of(model)
    assert len(hosts) == 3
    for name, host in hosts.items():
        d = host.deltas["default"]
        w = original.get_submodule(name).weight.detach()
        w_res = host.base.weight.detach()
        assert not torch.allclose(w_res, w, atol=1e-3), "the base did not receive the residual"
        torch.testing.assert_close(w_res + d.scaling * d.B.detach() @ d.A.detach(), w, atol=atol, rtol=0)
        torch.testing.assert_close(w_res + d.delta_weight(), w, atol=atol, rtol=0)
        # the bias is not touched
        assert torch.equal(host.base.bias, original.get_submodule(name).bias)


@pytest.mark.parametrize("kind", ["emb", "proj", "conv"])
def test_residual_identity_on_other_host_kinds(make_mixed, kind):
    """Embedding, GPT-2 Conv1D and Conv2d: the identity holds in each one's matrix view."""
    original = make_mixed()
    model = make_mixed()
    paretune.adapt(model, "pissa", r=3, alpha=6, targets=[kind])
    host = hosts_of(model)[kind]
    d = host.deltas["default"]
    w = original.get_submodule(kind).weight.detach()
    w_res = host.base.weight.detach()
    restored = w_res + host.geometry.to_native(d.scaling * d.B.detach() @ d.A.detach())
    torch.testing.assert_close(restored, w, atol=1e-5, rtol=0)
    matrix = w.reshape(w.shape[0], -1) if kind == "conv" else w.T
    s = torch.linalg.svdvals(matrix)
    # the residual lost exactly the top-3 singular values
    torch.testing.assert_close(torch.linalg.svdvals(host.geometry.matrix().detach())[: len(s) - 3], s[3:],
                               atol=1e-5, rtol=0)


# -- the factors are the principal singular triplets ---------------------------------------------

def test_factors_are_the_top_r_singular_triplets_exact_svd():
    """alpha = r (s = 1): B = U_r S_r^{1/2} and A = S_r^{1/2} V_rᵀ (the paper's formulation), up to
    the sign of each singular pair."""
    r = 4
    model = linear_with_spectrum(12, 10)
    w = model[0].weight.detach().clone()
    paretune.adapt(model, "pissa", r=r, alpha=r)
    d = hosts_of(model)["0"].deltas["default"]
    assert d.scaling == 1.0
    u, s, vh = torch.linalg.svd(w)
    for i in range(r):
        sign = torch.sign(d.B[:, i] @ u[:, i]).item()
        assert sign != 0
        torch.testing.assert_close(d.B[:, i].detach(), sign * u[:, i] * s[i].sqrt(), atol=1e-5, rtol=0)
        torch.testing.assert_close(d.A[i].detach(), sign * vh[i] * s[i].sqrt(), atol=1e-5, rtol=0)
    # the residual's spectrum is W's with the top r removed
    torch.testing.assert_close(torch.linalg.svdvals(model[0].base.weight.detach())[: 10 - r], s[r:],
                               atol=1e-5, rtol=0)


def test_factors_divide_S_by_the_scaling():
    """alpha ≠ r: each pair carries S_i/s, so that s·b_i a_iᵀ is still the i-th principal part."""
    r, alpha = 3, 12.0
    model = linear_with_spectrum(9, 14)
    w = model[0].weight.detach().clone()
    paretune.adapt(model, "pissa", r=r, alpha=alpha)
    d = hosts_of(model)["0"].deltas["default"]
    s_lora = alpha / r
    u, s, vh = torch.linalg.svd(w)
    for i in range(r):
        a_i, b_i = d.A[i].detach(), d.B[:, i].detach()
        torch.testing.assert_close(a_i.norm() ** 2, s[i] / s_lora, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b_i.norm() ** 2, s[i] / s_lora, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s_lora * torch.outer(b_i, a_i), s[i] * torch.outer(u[:, i], vh[i]),
                                   atol=1e-5, rtol=0)
    # columns of B (rows of A) are orthogonal: the factors are singular vectors, not any factorisation
    gram = d.B.detach().T @ d.B.detach()
    torch.testing.assert_close(gram, torch.diag(s[:r] / s_lora), atol=1e-5, rtol=0)


def test_randomized_svd_finds_the_principal_part():
    """niter=4 on a decaying spectrum: s·B·A is the best rank-r approximation (up to ~1e-4)."""
    r = 4
    model = linear_with_spectrum(48, 40, decay=0.5)
    w = model[0].weight.detach().clone()
    paretune.adapt(model, "pissa", r=r, alpha=8, niter=4)
    d = hosts_of(model)["0"].deltas["default"]
    u, s, vh = torch.linalg.svd(w)
    best = (u[:, :r] * s[:r]) @ vh[:r]
    torch.testing.assert_close(d.delta_weight(), best, atol=1e-4, rtol=0)
    # and the identity is still exact, whatever the SVD's accuracy
    torch.testing.assert_close(model[0].base.weight.detach() + d.delta_weight(), w, atol=1e-5, rtol=0)


def test_randomized_svd_is_seeded_and_leaves_the_global_rng_alone():
    def factors(seed: int):
        model = linear_with_spectrum(30, 20, decay=0.9)
        torch.manual_seed(42)
        paretune.adapt(model, "pissa", r=3, niter=1, svd_seed=seed)
        after = torch.rand(3)
        torch.manual_seed(42)
        assert torch.equal(after, torch.rand(3)), "adapt moved the global random state"
        return hosts_of(model)["0"].deltas["default"].A.detach()

    a1 = factors(0)
    torch.manual_seed(7)
    assert torch.equal(factors(0), a1), "the same svd_seed gave other factors"
    assert not torch.allclose(factors(1).abs(), a1.abs()), "svd_seed is ignored"


def test_randomized_svd_does_not_seed_cuda(monkeypatch):
    """Seeding the global generator (torch.manual_seed) would also reseed every CUDA device, and a
    fork of the CPU state does not undo that: PiSSA must use a generator of its own."""
    touched = []
    for fn in ("manual_seed", "manual_seed_all", "set_rng_state", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, fn, lambda *a, _fn=fn, **k: touched.append(_fn))
    monkeypatch.setattr(torch, "manual_seed", lambda *a, **k: touched.append("torch.manual_seed"))
    model = linear_with_spectrum(30, 20)
    paretune.adapt(model, "pissa", r=3, niter=2, svd_seed=4)
    assert touched == [], f"PiSSA init touched global random state: {touched}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_randomized_svd_leaves_the_cuda_rng_alone(device):
    model = linear_with_spectrum(30, 20).to(device)
    torch.cuda.manual_seed_all(1234)
    state = torch.cuda.get_rng_state()
    paretune.adapt(model, "pissa", r=3, niter=2, svd_seed=4)
    assert torch.equal(torch.cuda.get_rng_state(), state)
    w = linear_with_spectrum(30, 20)[0].weight.detach()
    d = hosts_of(model)["0"].deltas["default"]
    torch.testing.assert_close(model[0].base.weight.detach().cpu() + d.delta_weight().cpu(), w, atol=1e-5, rtol=0)


def test_randomized_pissa_save_load_reproduces_the_residual(make_mlp, mlp_batch, tmp_path):
    model = make_mlp()
    paretune.adapt(model, "pissa", r=2, niter=2, svd_seed=5)
    perturb(model)
    with torch.no_grad():
        expected = model(mlp_batch)
    paretune.save(model, tmp_path / "a")
    fresh = make_mlp()
    torch.manual_seed(999)  # the global seed must not matter
    paretune.load(fresh, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(mlp_batch), expected, atol=1e-6, rtol=0)
    for name, host in hosts_of(model).items():
        assert torch.equal(hosts_of(fresh)[name].base.weight, host.base.weight)


# -- the model at init ----------------------------------------------------------------------------

@pytest.mark.parametrize("niter", [None, 4])
def test_adapted_model_equals_base_at_init(make_llama, llama_batch, niter):
    base = make_llama()
    model = make_llama()
    paretune.adapt(model, "pissa", r=4, alpha=8, niter=niter)
    with torch.no_grad():
        torch.testing.assert_close(model(llama_batch).logits, base(llama_batch).logits, atol=1e-5, rtol=0)


# -- training: LoRA on the residual ---------------------------------------------------------------

@pytest.mark.parametrize("alpha", [2.0, 8.0])
def test_first_step_gradients_equal_lora_on_the_residual(make_mlp, mlp_batch, alpha):
    r = 2
    pissa = make_mlp()
    paretune.adapt(pissa, "pissa", r=r, alpha=alpha)

    lora = make_mlp()
    paretune.adapt(lora, "lora", r=r, alpha=alpha)
    p_hosts, l_hosts = hosts_of(pissa), hosts_of(lora)
    assert p_hosts.keys() == l_hosts.keys()
    with torch.no_grad():
        for name, ph in p_hosts.items():
            lh = l_hosts[name]
            lh.base.weight.copy_(ph.base.weight)  # the residual
            lh.deltas["default"].A.copy_(ph.deltas["default"].A)
            lh.deltas["default"].B.copy_(ph.deltas["default"].B)

    target = torch.randn(mlp_batch.shape[0], 4, generator=torch.Generator().manual_seed(11))
    outs = []
    for model in (pissa, lora):
        model.train()
        out = model(mlp_batch)
        nn.functional.mse_loss(out, target).backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=0)
    for name, ph in p_hosts.items():
        pd, ld = ph.deltas["default"], l_hosts[name].deltas["default"]
        assert pd.A.grad.abs().sum() > 0 and pd.B.grad.abs().sum() > 0  # PiSSA: both factors move at once
        torch.testing.assert_close(pd.A.grad, ld.A.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(pd.B.grad, ld.B.grad, atol=1e-6, rtol=1e-5)
        assert ph.base.weight.grad is None


# -- giving the base back -------------------------------------------------------------------------

def test_unload_restores_W(make_mlp):
    original = make_mlp()
    model = make_mlp()
    paretune.adapt(model, "pissa", r=3, alpha=6)
    perturb(model)
    paretune.unload(model)
    for (n, w), (_, w0) in zip(model.named_parameters(), original.named_parameters()):
        torch.testing.assert_close(w.detach(), w0.detach(), atol=1e-5, rtol=0, msg=n)


def test_merge_unmerge_then_unload_restores_W(make_mlp):
    original = make_mlp()
    model = make_mlp()
    paretune.adapt(model, "pissa", r=3, alpha=6)
    residual = {n: h.base.weight.detach().clone() for n, h in hosts_of(model).items()}
    perturb(model)
    paretune.merge(model)
    paretune.unmerge(model)
    for n, h in hosts_of(model).items():
        torch.testing.assert_close(h.base.weight.detach(), residual[n], atol=1e-6, rtol=0)
    paretune.unload(model)
    for (n, w), (_, w0) in zip(model.named_parameters(), original.named_parameters()):
        torch.testing.assert_close(w.detach(), w0.detach(), atol=1e-5, rtol=0, msg=n)


def test_remove_restores_W(make_mlp):
    original = make_mlp()
    model = make_mlp()
    paretune.adapt(model, "pissa", r=3, name="p")
    perturb(model)
    paretune.remove(model, "p")
    assert not hosts_of(model)
    for (n, w), (_, w0) in zip(model.named_parameters(), original.named_parameters()):
        torch.testing.assert_close(w.detach(), w0.detach(), atol=1e-5, rtol=0, msg=n)


def test_merge_then_unload_keeps_the_fine_tuned_weight(make_mlp):
    """Merged and unloaded: W + s·(B·A − B₀·A₀), the base moved by what training changed."""
    original = make_mlp()
    model = make_mlp()
    paretune.adapt(model, "pissa", r=2, alpha=4)
    start = {n: (h.deltas["default"].A.detach().clone(), h.deltas["default"].B.detach().clone())
             for n, h in hosts_of(model).items()}
    perturb(model)
    trained = {n: (h.deltas["default"].A.detach().clone(), h.deltas["default"].B.detach().clone(),
                   h.deltas["default"].scaling) for n, h in hosts_of(model).items()}
    paretune.merge(model)
    paretune.unload(model)
    for n, (a, b, s) in trained.items():
        a0, b0 = start[n]
        want = original.get_submodule(n).weight.detach() + s * (b @ a - b0 @ a0)
        torch.testing.assert_close(model.get_submodule(n).weight.detach(), want, atol=1e-5, rtol=0)


# -- counts and options ---------------------------------------------------------------------------

def test_trainable_count_is_r_times_din_plus_dout(make_llama):
    r = 2
    model = make_llama()
    paretune.adapt(model, "pissa", r=r, targets=["q_proj", "k_proj", "down_proj"])
    expected = 2 * r * ((32 + 32) + (32 + 16) + (64 + 32))
    cost = paretune.count(model)
    assert cost["trainable"] == cost["formula"] == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert PissaDelta.trainable_formula(7, 5, PissaConfig(r=3)) == 3 * (7 + 5)
    # the starting factors are kept as buffers, not trained and not saved
    for host in hosts_of(model).values():
        d = host.deltas["default"]
        assert set(d.stored_state()) == {"A", "B"}
        assert not d.A0.requires_grad and not d.B0.requires_grad


def test_rank_above_the_smallest_dimension_is_a_clear_error(make_llama):
    model = make_llama()
    with pytest.raises(ConfigError, match=r"r=17 exceeds min\(d_out, d_in\) of every targeted layer \(at most 16"):
        paretune.adapt(model, "pissa", r=17, targets=["k_proj"])
    assert not hosts_of(model), "a failed adapt left hosts behind"


@pytest.mark.parametrize("options, option", [({"alpha": 0}, "alpha"), ({"niter": -1}, "niter"),
                                             ({"niter": 1.5}, "niter"), ({"niter": True}, "niter")])
def test_bad_options_are_clear_errors(options, option):
    with pytest.raises(ConfigError, match=option):
        PissaConfig(**options)


# -- svd="auto" | "exact" | "randomized" ----------------------------------------------------------

def low_rank_plus_noise(d_out: int, d_in: int, rank: int, noise: float = 1e-3, seed: int = 0) -> nn.Sequential:
    """A Linear whose weight is a rank-``rank`` matrix (well separated singular values) plus small noise."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_out, rank, generator=g))
    v, _ = torch.linalg.qr(torch.randn(d_in, rank, generator=g))
    s = torch.linspace(5.0, 1.0, rank)
    model = nn.Sequential(nn.Linear(d_in, d_out, bias=False))
    with torch.no_grad():
        model[0].weight.copy_((u * s) @ v.T + noise * torch.randn(d_out, d_in, generator=g))
    return model


def test_svd_auto_is_randomized_above_exact_max_dim_and_exact_below():
    c = PissaConfig(r=4)
    assert c.svd == "auto" and c.exact_max_dim == 256
    assert c.svd_plan(300, 600) == 4  # smaller side 300 > 256: randomized, 4 iterations
    assert c.svd_plan(256, 4096) is None  # smaller side 256: exact
    assert PissaConfig(r=4, svd="exact").svd_plan(4096, 4096) is None
    assert PissaConfig(r=4, svd="randomized", niter=2).svd_plan(8, 8) == 2
    assert PissaConfig(r=4, niter=1).svd_plan(8, 8) == 1  # an explicit niter: randomized everywhere
    assert PissaConfig(r=4, exact_max_dim=16).svd_plan(40, 48) == 4


@pytest.mark.parametrize("svd", ["auto", "randomized"])
def test_randomized_init_reconstructs_W_and_finds_the_principal_part(svd):
    """Above exact_max_dim the default init is randomized: W_res + s·B·A == W exactly, and s·B·A is
    close to the exact top-r part (from an independent full SVD) on a low-rank-plus-noise matrix."""
    r = 6
    model = low_rank_plus_noise(300, 280, rank=r)
    w = model[0].weight.detach().clone()
    paretune.adapt(model, "pissa", r=r, alpha=12, svd=svd)
    d = hosts_of(model)["0"].deltas["default"]
    torch.testing.assert_close(model[0].base.weight.detach() + d.delta_weight(), w, atol=1e-5, rtol=0)
    u, s, vh = torch.linalg.svd(w.double())
    best = ((u[:, :r] * s[:r]) @ vh[:r]).float()
    err = (d.delta_weight() - best).norm() / best.norm()
    assert err < 1e-4, f"randomized principal part off by {err:.2e} (relative)"
    # it was the randomized path: the exact factors are not reproduced bit for bit
    exact = low_rank_plus_noise(300, 280, rank=r)
    paretune.adapt(exact, "pissa", r=r, alpha=12, svd="exact")
    assert not torch.equal(hosts_of(exact)["0"].deltas["default"].A.detach().abs(), d.A.detach().abs())


def test_small_layers_stay_exact_under_auto(make_mlp):
    a, b = make_mlp(), make_mlp()
    paretune.adapt(a, "pissa", r=3)
    paretune.adapt(b, "pissa", r=3, svd="exact")
    for (_, ha), (_, hb) in zip(sorted(hosts_of(a).items()), sorted(hosts_of(b).items())):
        assert torch.equal(ha.deltas["default"].A, hb.deltas["default"].A)


def test_adapters_saved_before_svd_existed_load_with_their_init():
    assert PissaConfig.upgrade({"r": 4, "niter": None}) == {"r": 4, "niter": None, "svd": "exact"}
    assert PissaConfig.upgrade({"r": 4, "niter": 2})["svd"] == "randomized"
    assert PissaConfig.upgrade({"r": 4, "niter": 2, "svd": "auto"})["svd"] == "auto"


@pytest.mark.parametrize("options, option", [({"svd": "fast"}, "svd"), ({"svd": "exact", "niter": 2}, "niter"),
                                             ({"exact_max_dim": 0}, "exact_max_dim")])
def test_bad_svd_options_are_clear_errors(options, option):
    with pytest.raises(ConfigError, match=option):
        PissaConfig(**options)
