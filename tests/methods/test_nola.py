"""NOLA: seeded random bases never stored, coefficients only, both reference inits, exact
gradients of the regenerate-in-backward combination, the reference's basis distribution for
init="nonzero" (bases_version 2) and the old bases (version 1) kept for adapters saved before."""

import hashlib
import importlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import paretune
from paretune.core.host import Host
from paretune.methods.nola import DRAW, NolaConfig, combine, draw_bases

SHAPES = [(8, 16), (16, 8), (12, 12), (30, 7)]  # (d_in, d_out)


def _stack(shapes):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(i, o) for i, o in shapes]).eval()


def _hosts(model):
    return [m for m in model.modules() if isinstance(m, Host)]


@pytest.mark.parametrize("k, l", [(5, None), (40, 3), (1, 70)])
def test_trainable_count_is_k_plus_l_per_layer(k, l):
    model = _stack(SHAPES)
    paretune.adapt(model, "nola", r=3, k=k, l=l, targets=[str(i) for i in range(len(SHAPES))])
    per_layer = k + (k if l is None else l)
    c = paretune.count(model)
    assert c["trainable"] == c["formula"] == per_layer * len(SHAPES)
    assert c["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert c["stored_bytes"] == 4 * per_layer * len(SHAPES)


def test_zero_init_starts_at_the_base_and_nonzero_does_not():
    x = torch.randn(4, 12)
    base = _stack([(12, 12)])
    want = base(x)
    zero = paretune.adapt(_stack([(12, 12)]), "nola", r=4, k=9, targets=["0"])
    torch.testing.assert_close(zero(x), want)
    nonzero = paretune.adapt(_stack([(12, 12)]), "nola", r=4, k=9, init="nonzero", targets=["0"])
    assert not torch.allclose(nonzero(x), want, atol=1e-4)
    delta = _hosts(nonzero)[0].deltas["default"]
    assert torch.allclose(delta.alpha_c, torch.full((9,), 1 / 9))
    assert delta.scaling == pytest.approx(1 / 4)


def test_delta_is_the_mix_of_the_seeded_bases():
    model = paretune.adapt(_stack([(10, 6)]), "nola", r=2, k=37, l=5, alpha=3.0, targets=["0"])
    d = _hosts(model)[0].deltas["default"]
    with torch.no_grad():
        d.alpha_c.normal_()
        d.beta_c.normal_()
    a_bases = torch.cat([draw_bases(d.seed_a, s, min(DRAW, 37 - s), (2, 10), 1.0) for s in range(0, 37, DRAW)])
    b_bases = draw_bases(d.seed_b, 0, 5, (6, 2), 1.0)
    a = d.A0 + torch.einsum("k,kij->ij", d.alpha_c, a_bases) / 37 ** 0.5
    b = torch.einsum("k,kij->ij", d.beta_c, b_bases) / 5 ** 0.5
    torch.testing.assert_close(d.delta_weight(), 1.5 * b @ a)


def test_combination_gradient_is_exact():
    coeffs = torch.randn(DRAW + 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: combine(c, 1234, (3, 4), 0.7, 0.5), (coeffs,))


def test_bases_depend_on_seed_and_layer_only():
    def delta_weights(seed):
        model = _stack([(8, 8), (8, 8)])
        paretune.adapt(model, "nola", r=2, k=6, seed=seed, targets=["0", "1"])
        for d in (h.deltas["default"] for h in _hosts(model)):
            with torch.no_grad():
                d.alpha_c.fill_(1.0)
                d.beta_c.fill_(1.0)
        return [h.deltas["default"].delta_weight() for h in _hosts(model)]

    first, again, other = delta_weights(0), delta_weights(0), delta_weights(1)
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first[0], first[1])  # each layer has its own bases
    assert not torch.allclose(first[0], other[0])


def test_file_holds_coefficients_and_seed_only(tmp_path, make_llama, llama_batch):
    model = make_llama()
    paretune.adapt(model, "nola", r=4, k=64, l=32, seed=7, targets=["q_proj", "v_proj"])
    for d in (h.deltas["default"] for h in _hosts(model)):
        with torch.no_grad():
            d.alpha_c.normal_()
            d.beta_c.normal_()
    want = model(llama_batch).logits
    paretune.save(model, tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter.safetensors")
    assert {k.rsplit(".", 1)[1] for k in tensors} == {"alpha_c", "beta_c"}
    assert sum(t.numel() for t in tensors.values()) == 4 * (64 + 32)  # 2 layers x 2 modules
    assert (tmp_path / "a" / "adapter.safetensors").stat().st_size < 4 * 4 * 96 + 2048
    saved = json.loads((tmp_path / "a" / "paretune.json").read_text())["config"]
    assert saved["seed"] == 7 and saved["bases_version"] == 2
    fresh = paretune.load(make_llama(), tmp_path / "a")
    torch.testing.assert_close(fresh(llama_batch).logits, want)


def test_training_moves_the_output_and_the_eval_cache_follows():
    model = paretune.adapt(_stack([(6, 5)]), "nola", r=2, k=4, targets=["0"])
    x = torch.randn(8, 6)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    with torch.no_grad():
        before = model(x)
        model(x)  # cached factors
    for _ in range(2):  # β gets a gradient at step 1, α once B ≠ 0
        loss = model(x).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    d = _hosts(model)[0].deltas["default"]
    assert d.alpha_c.abs().sum() > 0 and d.beta_c.abs().sum() > 0
    with torch.no_grad():
        after = model(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, x @ (model[0].weight + d.delta_weight()).T + model[0].bias)


@pytest.mark.parametrize("bad", [{"k": 0}, {"l": -1}, {"init": "random"}, {"seed": -3}, {"r": 0},
                                 {"seed": True}, {"bases_version": 3}, {"bases_version": True}])
def test_bad_options(bad):
    with pytest.raises(paretune.ConfigError, match=next(iter(bad))):
        paretune.adapt(_stack([(4, 4)]), "nola", targets=["0"], **bad)


def test_cached_and_regenerated_bases_agree():
    x = torch.randn(5, 10)
    results = []
    for cache in ("always", "never"):
        model = paretune.adapt(_stack([(10, 6), (6, 4)]), "nola", r=2, k=40, l=9, cache_bases=cache,
                               targets=["0", "1"])
        deltas = [h.deltas["default"] for h in _hosts(model)]
        assert all(d.cached_bases == (cache == "always") for d in deltas)
        with torch.no_grad():
            for d in deltas:
                d.alpha_c.copy_(torch.linspace(-1, 1, 40))
                d.beta_c.copy_(torch.linspace(1, -1, 9))
        model(x).pow(2).sum().backward()
        results.append((model(x).detach(), [d.alpha_c.grad.clone() for d in deltas]))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-4)


def test_auto_cache_follows_the_size_limit(monkeypatch):
    nola = importlib.import_module("paretune.methods.nola")

    model = paretune.adapt(_stack([(10, 6)]), "nola", r=2, k=40, targets=["0"])
    assert _hosts(model)[0].deltas["default"].cached_bases  # 2·(40·10 + 40·6)·4 bytes: small
    monkeypatch.setattr(nola, "CACHE_LIMIT", 100)
    model = paretune.adapt(_stack([(10, 6)]), "nola", r=2, k=40, targets=["0"])
    assert not _hosts(model)[0].deltas["default"].cached_bases
    assert not any(n.startswith("bases") for n, _ in _hosts(model)[0].deltas["default"].named_buffers())


# -- the basis definition: reference distribution (version 2), old bases (version 1) ---------------

def _old_family(seed: int, layer: int, which: str, n: int, shape: tuple[int, int], bound: float) -> torch.Tensor:
    """The bases as paretune drew them before version 2, written out independently of the module:
    a SHA-256 per-layer seed, draws of 32 bases of ``shape``, each entry U(−bound, bound)."""
    s = int.from_bytes(hashlib.sha256(f"nola:{seed}:{layer}:{which}".encode()).digest()[:8], "little") >> 1
    chunks = []
    for start in range(0, n, 32):
        gen = torch.Generator().manual_seed(s + start // 32)
        chunks.append(torch.empty(32, *shape).uniform_(-bound, bound, generator=gen)[:min(32, n - start)])
    return torch.cat(chunks)


def _reference_stack(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Bases as vit/NOLA.py (NOLA2) draws them: one stacked tensor, kaiming_uniform_(a=sqrt(5))."""
    torch.manual_seed(seed)
    t = torch.empty(shape)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t


def _kaiming_bound(t: torch.Tensor) -> float:
    """kaiming_uniform_(a=sqrt(5))'s bound for tensor t, from torch's own fan-in and gain."""
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(t)
    return math.sqrt(3.0) * nn.init.calculate_gain("leaky_relu", math.sqrt(5)) / math.sqrt(fan_in)


def test_nonzero_bases_have_the_reference_distribution():
    d_in, d_out, r, k, l = 64, 48, 8, 64, 32
    model = paretune.adapt(_stack([(d_in, d_out)]), "nola", r=r, k=k, l=l, init="nonzero",
                           cache_bases="always", targets=["0"])
    d = _hosts(model)[0].deltas["default"]
    ours = {"A": d.bases_a, "B": d.bases_b}  # (k, r, d_in), (l, d_out, r)
    refs = {"A": _reference_stack((k, d_in, r), 0), "B": _reference_stack((l, r, d_out), 1)}
    for which, fan_in in (("A", r * d_in), ("B", r * d_out)):
        bound = _kaiming_bound(refs[which])
        assert bound == pytest.approx(1 / math.sqrt(fan_in))  # torch's fan-in of the stacked shape
        assert refs[which].abs().max() <= bound
        got = ours[which]
        assert got.abs().max() <= bound * (1 + 1e-6)
        assert got.abs().max() >= 0.99 * bound  # the same bound, not a narrower one
        assert got.std().item() == pytest.approx(refs[which].std().item(), rel=0.03)
        assert got.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
        assert abs(got.mean().item()) < 0.02 * bound


def test_nonzero_delta_at_init_has_the_reference_magnitude():
    d_in, d_out, r, k, l = 64, 48, 8, 64, 32
    dws = {}
    for version in (1, 2):
        model = paretune.adapt(_stack([(d_in, d_out)]), "nola", r=r, k=k, l=l, init="nonzero",
                               bases_version=version, targets=["0"])
        dws[version] = _hosts(model)[0].deltas["default"].delta_weight().detach()
    # the reference's ΔW at init: coefficients 1/k, 1/l, scale 1/r, bases of its stacked shapes
    a_ref = torch.einsum("b,bdr->dr", torch.full((k,), 1 / k), _reference_stack((k, d_in, r), 0))
    b_ref = torch.einsum("b,brd->rd", torch.full((l,), 1 / l), _reference_stack((l, r, d_out), 1))
    dw_ref = ((a_ref @ b_ref) / r).T
    # analytic: var(A entry) = b_A²/(3k), var(B entry) = b_B²/(3l), var(ΔW entry) = var_A·var_B/r
    expected = math.sqrt((1 / (3 * k * r * d_in)) * (1 / (3 * l * r * d_out)) / r)
    assert dws[2].std().item() == pytest.approx(expected, rel=0.3)
    assert dws[2].std().item() == pytest.approx(dw_ref.std().item(), rel=0.3)
    # version 1 (same seeds, bounds √r and √d_out wider) is √(r·d_out) times as large, entry by entry
    scale = math.sqrt(r * d_out)
    torch.testing.assert_close(dws[1], dws[2] * scale, rtol=1e-4, atol=1e-5 * dws[1].abs().max().item())


@pytest.mark.parametrize("cache", ["always", "never"])
def test_version_1_reproduces_the_old_bases_exactly(cache):
    d_in, d_out, r, k, l, seed = 10, 6, 3, 40, 7, 5
    model = paretune.adapt(_stack([(8, d_in), (d_in, d_out)]), "nola", r=r, k=k, l=l, init="nonzero", seed=seed,
                           bases_version=1, cache_bases=cache, targets=["0", "1"])
    d = _hosts(model)[1].deltas["default"]  # layer 1 of the adapter
    old_a = _old_family(seed, 1, "A", k, (r, d_in), 1 / math.sqrt(d_in))
    old_b = _old_family(seed, 1, "B", l, (d_out, r), 1 / math.sqrt(r))
    if cache == "always":
        assert torch.equal(d.bases_a, old_a) and torch.equal(d.bases_b, old_b)
    with torch.no_grad():
        d.alpha_c.normal_()
        d.beta_c.normal_()
    want = (torch.einsum("k,kij->ij", d.beta_c, old_b) @ torch.einsum("k,kij->ij", d.alpha_c, old_a)) / r
    torch.testing.assert_close(d.delta_weight(), want)


def test_zero_init_bases_are_the_same_in_both_versions():
    d_in, d_out, r, k, l, seed = 10, 6, 3, 40, 7, 2
    deltas = []
    for version in (1, 2):
        model = paretune.adapt(_stack([(d_in, d_out)]), "nola", r=r, k=k, l=l, seed=seed, bases_version=version,
                               cache_bases="always", targets=["0"])
        deltas.append(_hosts(model)[0].deltas["default"])
    old_a = _old_family(seed, 0, "A", k, (r, d_in), 1.0) * (1 / math.sqrt(k))
    old_b = _old_family(seed, 0, "B", l, (d_out, r), 1.0) * (1 / math.sqrt(l))
    old_a0 = _old_family(seed, 0, "A0", 1, (r, d_in), 1 / math.sqrt(d_in))[0]  # nn.Linear(d_in, r)'s kaiming
    for d in deltas:
        assert torch.equal(d.bases_a, old_a) and torch.equal(d.bases_b, old_b) and torch.equal(d.A0, old_a0)
        with torch.no_grad():
            d.alpha_c.copy_(torch.linspace(-1, 1, k))
            d.beta_c.copy_(torch.linspace(1, -1, l))
    torch.testing.assert_close(deltas[0].delta_weight(), deltas[1].delta_weight(), rtol=0, atol=0)


def test_upgrade_reads_configs_saved_before_versions():
    old = {"r": 4, "k": 8, "l": None, "alpha": 8.0, "init": "nonzero", "seed": 0, "cache_bases": "auto"}
    assert NolaConfig.upgrade(old)["bases_version"] == 1
    assert "bases_version" not in old  # not changed in place
    assert NolaConfig.upgrade({**old, "init": "zero"})["bases_version"] == 2  # zero-init bases never changed
    assert NolaConfig.upgrade({**old, "bases_version": 2})["bases_version"] == 2
    assert NolaConfig.from_dict({"r": 4}).bases_version == 2  # new adapters get the current bases


def _trained(version, make_llama, llama_batch):
    model = make_llama()
    paretune.adapt(model, "nola", r=4, k=40, l=24, init="nonzero", seed=3, bases_version=version,
                   targets=["q_proj", "v_proj"])
    for d in (h.deltas["default"] for h in _hosts(model)):
        with torch.no_grad():
            d.alpha_c.normal_()
            d.beta_c.normal_()
    return model, model(llama_batch).logits.detach()


@pytest.mark.parametrize("version", [1, 2])
def test_save_load_keeps_each_version(version, tmp_path, make_llama, llama_batch):
    model, want = _trained(version, make_llama, llama_batch)
    other, _ = _trained(3 - version, make_llama, llama_batch)
    assert not torch.allclose(other(llama_batch).logits, want, atol=1e-3)  # the version matters
    paretune.save(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "paretune.json").read_text())["config"]["bases_version"] == version
    fresh = paretune.load(make_llama(), tmp_path / "a")
    assert paretune.adapters(fresh)["default"].config.bases_version == version
    torch.testing.assert_close(fresh(llama_batch).logits, want)


def _drop_version_key(folder):
    """Make the file look as paretune.save wrote it before bases_version existed."""
    f = folder / "paretune.json"
    meta = json.loads(f.read_text())
    del meta["config"]["bases_version"]
    meta.pop("checksums")  # nor checksums, which came later
    f.write_text(json.dumps(meta))


def test_file_saved_before_versions_loads_with_its_old_bases(tmp_path, make_llama, llama_batch):
    """paretune.load and hot_swap pass saved configs through NolaConfig.upgrade."""
    model, want = _trained(1, make_llama, llama_batch)
    paretune.save(model, tmp_path / "old")
    _drop_version_key(tmp_path / "old")
    fresh = paretune.load(make_llama(), tmp_path / "old")
    assert paretune.adapters(fresh)["default"].config.bases_version == 1
    torch.testing.assert_close(fresh(llama_batch).logits, want)
    # hot-swap: into a version-1 adapter it loads as trained; a version-2 adapter refuses it
    v1, _ = _trained(1, make_llama, llama_batch)
    paretune.hot_swap(v1, tmp_path / "old")
    torch.testing.assert_close(v1(llama_batch).logits, want)
    v2, _ = _trained(2, make_llama, llama_batch)
    with pytest.raises(paretune.AdapterFileError, match="bases_version"):
        paretune.hot_swap(v2, tmp_path / "old")
