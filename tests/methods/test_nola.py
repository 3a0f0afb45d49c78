"""NOLA: seeded random bases never stored, coefficients only, both reference inits, exact
gradients of the regenerate-in-backward combination."""

import importlib
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import paretune
from paretune.core.host import Host
from paretune.methods.nola import DRAW, combine, draw_bases

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
    a_bases = torch.cat([draw_bases(d.seed_a, s, min(DRAW, 37 - s), (2, 10), "uniform") for s in range(0, 37, DRAW)])
    b_bases = draw_bases(d.seed_b, 0, 5, (6, 2), "uniform")
    a = d.A0 + torch.einsum("k,kij->ij", d.alpha_c, a_bases) / 37 ** 0.5
    b = torch.einsum("k,kij->ij", d.beta_c, b_bases) / 5 ** 0.5
    torch.testing.assert_close(d.delta_weight(), 1.5 * b @ a)


def test_combination_gradient_is_exact():
    coeffs = torch.randn(DRAW + 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: combine(c, 1234, (3, 4), "uniform", 0.5), (coeffs,))


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
    assert json.loads((tmp_path / "a" / "paretune.json").read_text())["config"]["seed"] == 7
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


@pytest.mark.parametrize("bad", [{"k": 0}, {"l": -1}, {"init": "random"}, {"seed": -3}, {"r": 0}])
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
