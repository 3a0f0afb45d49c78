"""LaMDA / LaMDA++: the public code's init (kaiming A frozen, B = 0, nn.Linear-default S) and
freezing rule (⌊step / (0.3·T)⌋ columns of B), our SVD init and linear schedule, exact holding of
frozen columns under AdamW, dropout on the adapter input, exact reloads, energy-based ranks."""

import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import paretune
from paretune.methods import lamda as lamda_mod
from paretune.core.host import Host
from paretune.errors import AdapterFileError
from paretune.methods.lamda import energy_ranks, layer_seed


def _deltas(model):
    return [m.deltas["default"] for m in model.modules() if isinstance(m, Host)]


def _model(shapes=((10, 8),), seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(i, o) for i, o in shapes]).eval()


# -- init ----------------------------------------------------------------------------------------

def test_reference_init_kaiming_a_zero_b_linear_default_s():
    d_in, d_out, r = 512, 40, 16
    model = _model([(d_in, d_out)])
    x = torch.randn(3, d_in)
    want = model(x)
    rng = torch.get_rng_state()
    paretune.adapt(model, "lamda", r=r, targets=["0"])
    assert torch.equal(torch.get_rng_state(), rng)  # private generators only
    d = _deltas(model)[0]
    bound_a, bound_s = 1 / math.sqrt(d_in), 1 / math.sqrt(r)  # kaiming_uniform_(a=√5): 1/√fan_in
    assert d.A.shape == (r, d_in) and not d.A.requires_grad
    assert d.A.abs().max() <= bound_a and d.A.abs().max() > 0.99 * bound_a
    assert abs(d.A.std().item() - bound_a / math.sqrt(3)) < 0.03 * bound_a  # uniform: std = bound/√3
    assert abs(d.A.mean().item()) < 0.03 * bound_a
    assert d.S.abs().max() <= bound_s and d.S.abs().max() > 0.9 * bound_s
    assert d.B.abs().sum() == 0
    # the exact draw: U(−1/√fan_in, 1/√fan_in) from the layer's own generator
    gen_a, gen_s = (torch.Generator().manual_seed(layer_seed(0, 0, which)) for which in ("A", "S"))
    want_a = torch.empty(r, d_in).uniform_(-bound_a, bound_a, generator=gen_a)
    want_s = torch.empty(r, r).uniform_(-bound_s, bound_s, generator=gen_s)
    torch.testing.assert_close(d.A, want_a, atol=0, rtol=0)
    torch.testing.assert_close(d.S.detach(), want_s, atol=0, rtol=0)
    assert d.delta_weight().abs().max() == 0
    torch.testing.assert_close(model(x), want, atol=0, rtol=0)


def test_reference_init_depends_on_seed_and_layer_only():
    def a_of(global_seed, **opts):
        model = _model([(12, 12), (12, 12)])
        torch.manual_seed(global_seed)  # the global RNG plays no part
        paretune.adapt(model, "lamda", r=3, targets=["0", "1"], **opts)
        return [d.A.clone() for d in _deltas(model)]

    first, again, other = a_of(0), a_of(1), a_of(0, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(first, again))
    assert not torch.equal(first[0], first[1])  # each layer its own A
    assert not torch.equal(first[0], other[0])


def test_svd_init_from_canonical_singular_vectors_and_zero_core():
    model = _model()
    w = model[0].weight.detach().clone()
    x = torch.randn(3, 10)
    want = model(x)
    paretune.adapt(model, "lamda", r=3, init="svd", targets=["0"])
    d = _deltas(model)[0]
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(d.A.abs(), vh[:3].abs())  # singular vectors up to sign
    torch.testing.assert_close(d.B.abs(), u[:, :3].abs())
    torch.testing.assert_close(d.B @ torch.diag(s[:3]) @ d.A, u[:, :3] @ torch.diag(s[:3]) @ vh[:3])
    rows = torch.arange(3)
    assert (d.A[rows, d.A.abs().argmax(dim=1)] > 0).all()  # the canonical sign
    assert d.S.abs().sum() == 0
    torch.testing.assert_close(model(x), want)


@pytest.mark.parametrize("init", ["reference", "svd"])
@pytest.mark.parametrize("shape", [(8, 16), (16, 8), (12, 12), (30, 7)])
def test_count_and_gradients(shape, init):
    d_in, d_out = shape
    model = _model([shape])
    paretune.adapt(model, "lamda", r=4, init=init, targets=["0"])
    c = paretune.count(model)
    r = min(4, d_in, d_out)
    assert c["trainable"] == c["formula"] == r * d_out + r * r
    assert {n.rsplit(".", 1)[1] for n, p in model.named_parameters() if p.requires_grad} == {"B", "S"}
    d = _deltas(model)[0]
    with torch.no_grad():
        d.S.normal_()
        d.B.normal_()
    model(torch.randn(2, d_in)).sum().backward()
    assert d.S.grad.abs().sum() > 0 and d.B.grad.abs().sum() > 0 and not d.A.requires_grad


# -- dropout -------------------------------------------------------------------------------------

def test_dropout_on_the_adapter_input_in_train_mode_only():
    model = _model([(16, 12)])
    paretune.adapt(model, "lamda", r=4, dropout=0.5, targets=["0"])
    d = _deltas(model)[0]
    assert not d.training  # starts in the mode of the adapted (eval) model
    with torch.no_grad():
        d.B.normal_()
    x = torch.randn(6, 16)
    w, b = model[0].base.weight.detach(), model[0].base.bias.detach()
    dw = d.scaling * (d.B @ d.S @ d.A).detach()
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ (w + dw).T + b)  # eval: no dropout
        model.train()
        torch.manual_seed(3)
        got = model(x)
        torch.manual_seed(3)
        dropped = nn.functional.dropout(x, 0.5, training=True)
        torch.testing.assert_close(got, x @ w.T + b + dropped @ dw.T)  # dropout on the adapter's input only
        assert not torch.allclose(model(x), got)
        model.eval()
        torch.testing.assert_close(model(x), x @ (w + dw).T + b)


def test_default_dropout_is_the_reference_value():
    model = _model()
    paretune.adapt(model, "lamda", targets=["0"])
    d = _deltas(model)[0]
    assert d.config.dropout == 0.1 and d.drop.p == 0.1
    paretune.unload(model)
    paretune.adapt(model, "lamda", dropout=0.0, targets=["0"])
    assert _deltas(model)[0].drop is None


def test_float64_merge_round_trip_without_dropout_in_train_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8)).double()  # train mode
    paretune.adapt(model, "lamda", r=2, dropout=0.0)
    for d in _deltas(model):
        with torch.no_grad():
            d.B.normal_()
    x = torch.randn(4, 16, dtype=torch.float64)
    with torch.no_grad():
        unmerged = model(x)
        paretune.merge(model)
        torch.testing.assert_close(model(x), unmerged, atol=1e-12, rtol=0)


# -- the freezing schedule -----------------------------------------------------------------------

@pytest.mark.parametrize("r", [4, 8])
@pytest.mark.parametrize("total", [10, 37, 100])
def test_reference_schedule_is_floor_step_over_eta_total(r, total):
    model = _model([(12, 10)])
    paretune.adapt(model, "lamda", r=r, targets=["0"])
    d = _deltas(model)[0]
    r = d.B.shape[1]
    want = [min(r, (10 * step) // (3 * total)) for step in range(1, total + 1)]  # ⌊step / (0.3·T)⌋, exact
    assert [d.frozen_columns(step, total) for step in range(1, total + 1)] == want
    assert max(want) == 3  # with r >= 4 B never freezes entirely
    held = []
    for step in range(1, total):
        d.on_step(step, total)
        held.append(d.n_frozen)  # held during step + 1
        assert d.B.requires_grad
    assert held == want[1:]


def test_reference_schedule_freezes_a_small_rank_entirely():
    model = _model([(12, 10)])
    paretune.adapt(model, "lamda", r=2, targets=["0"])
    d = _deltas(model)[0]
    total = 10  # ⌊step/3⌋: 2 columns from step 6
    for step in range(1, 5):
        d.on_step(step, total)
        assert d.B.requires_grad
    d.on_step(5, total)
    assert d.n_frozen == 2 and not d.B.requires_grad


@pytest.mark.parametrize("r", [4, 8])
@pytest.mark.parametrize("total", [16, 37])
def test_linear_schedule_values(r, total):
    model = _model([(12, 10)])
    paretune.adapt(model, "lamda", r=r, schedule="linear", freeze_fraction=0.25, targets=["0"])
    d = _deltas(model)[0]
    r = d.B.shape[1]
    want = [min(r, (4 * r * step) // total) for step in range(1, total + 1)]  # ⌊r·step / (0.25·T)⌋
    assert [d.frozen_columns(step, total) for step in range(1, total + 1)] == want
    for step in range(1, total):
        d.on_step(step, total)
        assert d.n_frozen == want[step] and d.B.requires_grad == (want[step] < r)
    assert not d.B.requires_grad  # all frozen from step 0.25·T on


@pytest.mark.parametrize("init", ["reference", "svd"])
def test_frozen_columns_hold_exactly_under_adamw_with_weight_decay(init):
    model = _model([(12, 10)])
    paretune.adapt(model, "lamda", r=4, init=init, freeze_eta=0.1, targets=["0"])  # column j frozen from step j
    model.train()
    d = _deltas(model)[0]
    with torch.no_grad():
        d.S.normal_(std=0.3)  # (the svd init starts at S = 0, where B gets no gradient)
    opt = torch.optim.AdamW([d.B, d.S], lr=0.05, weight_decay=0.1)
    x, total = torch.randn(16, 12), 10
    before = d.B.detach().clone()
    for step in range(1, total + 1):
        held = d.n_frozen
        model(x).pow(2).mean().backward()
        if held < 4:
            assert d.B.grad[:, :held].abs().sum() == 0 and d.B.grad[:, held:].abs().sum() > 0
        else:
            assert d.B.grad is None  # frozen entirely: no gradient is computed
        opt.step()
        opt.zero_grad(set_to_none=True)
        if 0 < held < 4:  # weight decay (and momentum) moved the held columns despite their zero gradient ...
            assert not torch.equal(d.B.detach()[:, :held], before[:, :held])
        d.on_step(step, total)
        after = d.B.detach().clone()
        # ... and on_step put them back exactly
        assert torch.equal(after[:, :held], before[:, :held]), f"a frozen column moved at step {step}"
        if held < 4:
            assert not torch.equal(after[:, held:], before[:, held:])  # the others train
        before = after
    assert [d.frozen_columns(s, total) for s in range(1, 5)] == [1, 2, 3, 4] and d.n_frozen == 4


# -- files ---------------------------------------------------------------------------------------

def _trained_llama(make_llama, **opts):
    model = make_llama()
    paretune.adapt(model, "lamda", r=4, targets=["q_proj", "down_proj"], **opts)
    for d in _deltas(model):
        with torch.no_grad():
            d.S.normal_(std=0.1)
            d.B.normal_(std=0.1)
    return model


def test_reference_init_saves_b_s_and_regenerates_a(tmp_path, make_llama, llama_batch):
    model = _trained_llama(make_llama, seed=7)
    want = model(llama_batch).logits
    paretune.save(model, tmp_path / "a")
    keys = load_file(tmp_path / "a" / "adapter.safetensors")
    assert {k.rsplit(".", 1)[1] for k in keys} == {"B", "S", "A_row_sums"}
    fresh = paretune.load(make_llama(), tmp_path / "a")
    torch.testing.assert_close(fresh(llama_batch).logits, want, atol=0, rtol=0)
    for d, e in zip(_deltas(model), _deltas(fresh)):
        assert torch.equal(d.A, e.A)


def test_reference_init_load_refuses_another_a(tmp_path, make_llama, monkeypatch):
    model = _trained_llama(make_llama)
    paretune.save(model, tmp_path / "a")
    draw = lamda_mod.kaiming_uniform
    monkeypatch.setattr(lamda_mod, "kaiming_uniform", lambda shape, seed: draw(shape, seed + 1))  # another RNG
    fresh = make_llama()
    with pytest.raises(AdapterFileError, match="regenerated from seed"):
        paretune.load(fresh, tmp_path / "a")
    assert paretune.adapters(fresh) == {}


def _flip_some_signs(svd):
    def flipped(w):
        u, s, vh = svd(w)
        sign = torch.ones(s.shape[0], dtype=u.dtype)
        sign[::2] = -1  # still an SVD of w: u[:, i] and vh[i] flipped together
        return u * sign, s, vh * sign[:, None]
    return flipped


def _rotate_first_pair(svd):
    def rotated(w):  # what an SVD may return where σ₀ = σ₁: another basis of their subspace
        u, s, vh = svd(w)
        c, t = math.cos(0.7), math.sin(0.7)
        rot = torch.tensor([[c, -t], [t, c]], dtype=u.dtype)
        u, vh = u.clone(), vh.clone()
        u[:, :2], vh[:2] = u[:, :2] @ rot, rot.T @ vh[:2]
        return u, s, vh
    return rotated


@pytest.mark.parametrize("patch", [_flip_some_signs, _rotate_first_pair])
def test_svd_init_reloads_exactly_whatever_the_load_time_svd_returns(tmp_path, make_llama, llama_batch,
                                                                    monkeypatch, patch):
    model = _trained_llama(make_llama, init="svd")
    want = model(llama_batch).logits
    saved_a = [d.A.clone() for d in _deltas(model)]
    paretune.save(model, tmp_path / "a")
    keys = load_file(tmp_path / "a" / "adapter.safetensors")
    assert {k.rsplit(".", 1)[1] for k in keys} == {"A", "B", "S"}

    monkeypatch.setattr(lamda_mod, "_svd", patch(lamda_mod._svd))
    probe = make_llama()  # the patch reaches the init: a fresh SVD init under it
    paretune.adapt(probe, "lamda", r=4, init="svd", targets=["q_proj", "down_proj"])
    same = [torch.allclose(d.A, a, atol=1e-5) for d, a in zip(_deltas(probe), saved_a)]
    if patch is _flip_some_signs:
        assert all(same)  # the canonical signs undo the flips
    else:
        assert not any(same)  # a rotation no sign rule can undo

    fresh = paretune.load(make_llama(), tmp_path / "a")
    for d, a in zip(_deltas(fresh), saved_a):
        assert torch.equal(d.A, a)
    torch.testing.assert_close(fresh(llama_batch).logits, want, atol=0, rtol=0)


def test_a_file_saved_before_a_was_stored_loads_as_it_was_trained(tmp_path, make_llama, llama_batch):
    """Files of the earlier LaMDA (SVD init, linear schedule, no dropout; B and S saved, A recomputed
    from the SVD as LAPACK returns it) still load with the A they were trained against."""
    import json

    from safetensors.torch import save_file

    model = make_llama()
    paretune.adapt(model, "lamda", r=4, init="svd", schedule="linear", dropout=0.0, targets=["q_proj"])
    with torch.no_grad():
        for d in _deltas(model):  # the earlier init: raw LAPACK signs, S = 0, then some training
            u, _, vh = lamda_mod._svd(d.geometry.matrix())
            d.A.copy_(vh[:4])
            d.B.copy_(u[:, :4] + 0.1 * torch.randn_like(d.B))
            d.S.normal_(0, 0.3)
        want = model(llama_batch).logits
    paretune.save(model, tmp_path / "old")
    meta_file = tmp_path / "old" / "paretune.json"
    meta = json.loads(meta_file.read_text())
    meta["config"] = {k: meta["config"][k] for k in ("r", "alpha", "freeze_fraction", "rank_allocation")}
    meta.pop("checksums")  # a file from before the reference defaults had no checksums either
    meta_file.write_text(json.dumps(meta))
    tensors = load_file(tmp_path / "old" / "adapter.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.endswith(".A")}, tmp_path / "old" / "adapter.safetensors")

    with pytest.warns(UserWarning, match="saved without its A"):
        fresh = paretune.load(make_llama(), tmp_path / "old")
    cfg = paretune.adapters(fresh)["default"].config
    assert (cfg.init, cfg.schedule, cfg.dropout) == ("svd", "linear", 0.0)
    with torch.no_grad():
        torch.testing.assert_close(fresh(llama_batch).logits, want, atol=1e-5, rtol=0)


# -- LaMDA++ -------------------------------------------------------------------------------------

def test_energy_ranks_split_the_total_by_spectrum_energy():
    flat = torch.ones(8)  # energy spread evenly: top-2 hold 1/4
    peaked = torch.tensor([10.0, 5.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])  # top-2 hold nearly all
    ranks = energy_ranks([flat, peaked, flat], r=2, caps=[8, 8, 8])
    assert sum(ranks) == 6 and ranks[1] > ranks[0] == ranks[2] >= 1
    assert energy_ranks([flat, peaked], r=4, caps=[8, 3]) == [5, 3]  # a capped layer gives its rest away


@pytest.mark.parametrize("init", ["reference", "svd"])
def test_lamda_plus_plus_adapts_with_per_layer_ranks(tmp_path, init):
    model = _model([(16, 16), (16, 16)])
    with torch.no_grad():  # layer 1: almost rank 2
        u, v = torch.randn(16, 2), torch.randn(2, 16)
        model[1].weight.copy_(u @ v + 0.01 * torch.randn(16, 16))
    paretune.adapt(model, "lamda", r=4, rank_allocation="energy", init=init, targets=["0", "1"])
    r0, r1 = (d.S.shape[0] for d in _deltas(model))
    assert r0 + r1 == 8 and r1 > r0
    assert [d.bank.ranks for d in _deltas(model)] == [[r0, r1]] * 2
    c = paretune.count(model)
    assert c["trainable"] == c["formula"] == r0 * 16 + r0 ** 2 + r1 * 16 + r1 ** 2
    for d in _deltas(model):
        with torch.no_grad():
            d.S.normal_()
            d.B.normal_()
    x = torch.randn(3, 16)
    want = model(x)
    paretune.save(model, tmp_path / "pp")
    fresh = _model([(16, 16), (16, 16)])
    with torch.no_grad():
        fresh[1].weight.copy_(model[1].base.weight)
    paretune.load(fresh, tmp_path / "pp")
    torch.testing.assert_close(fresh(x), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bad", [{"r": 0}, {"freeze_fraction": 1.5}, {"rank_allocation": "adaptive"}, {"alpha": -1},
                                 {"init": "pissa"}, {"schedule": "cosine"}, {"freeze_eta": 0}, {"dropout": 1.0},
                                 {"seed": -1}])
def test_bad_options(bad):
    with pytest.raises(paretune.ConfigError, match=next(iter(bad))):
        paretune.adapt(_model(), "lamda", targets=["0"], **bad)
