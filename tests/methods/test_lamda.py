"""LaMDA / LaMDA++: SVD init, frozen A, trainable core S, B frozen by the schedule, energy-based
rank allocation."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import paretune
from paretune.core.host import Host
from paretune.methods.lamda import energy_ranks


def _deltas(model):
    return [m.deltas["default"] for m in model.modules() if isinstance(m, Host)]


def _model(shapes=((10, 8),), seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(i, o) for i, o in shapes]).eval()


def test_init_from_singular_vectors_and_zero_core():
    model = _model()
    w = model[0].weight.detach().clone()
    x = torch.randn(3, 10)
    want = model(x)
    paretune.adapt(model, "lamda", r=3, targets=["0"])
    d = _deltas(model)[0]
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(d.A.abs(), vh[:3].abs())  # singular vectors up to sign
    torch.testing.assert_close(d.B.abs(), u[:, :3].abs())
    torch.testing.assert_close(d.B @ torch.diag(s[:3]) @ d.A, u[:, :3] @ torch.diag(s[:3]) @ vh[:3])
    assert d.S.abs().sum() == 0
    torch.testing.assert_close(model(x), want)


@pytest.mark.parametrize("shape", [(8, 16), (16, 8), (12, 12), (30, 7)])
def test_count_and_gradients(shape):
    d_in, d_out = shape
    model = _model([shape])
    paretune.adapt(model, "lamda", r=4, targets=["0"])
    c = paretune.count(model)
    r = min(4, d_in, d_out)
    assert c["trainable"] == c["formula"] == r * d_out + r * r
    assert {n.rsplit(".", 1)[1] for n, p in model.named_parameters() if p.requires_grad} == {"B", "S"}
    d = _deltas(model)[0]
    with torch.no_grad():
        d.S.normal_()
    model(torch.randn(2, d_in)).sum().backward()
    assert d.S.grad is not None and d.B.grad is not None and not d.A.requires_grad


def test_b_is_frozen_column_by_column_then_entirely():
    model = _model([(12, 10)])
    paretune.adapt(model, "lamda", r=4, freeze_fraction=0.5, targets=["0"])
    d = _deltas(model)[0]
    opt = torch.optim.AdamW([d.B, d.S], lr=0.1, weight_decay=0.1)
    x = torch.randn(16, 12)
    total, history = 16, []
    for step in range(1, total + 1):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        d.on_step(step, total)
        history.append((int(d.frozen.sum()), d.B.detach().clone(), d.B.requires_grad))
    # t_i = 8: one more column frozen every 2 steps, all 4 from step 8 on
    assert [h[0] for h in history[:8]] == [0, 1, 1, 2, 2, 3, 3, 4]
    assert all(not h[2] for h in history[7:]) and history[6][2]
    for step in range(1, total):
        n_frozen, b, _ = history[step - 1]
        torch.testing.assert_close(history[step][1][:, :n_frozen], b[:, :n_frozen])  # frozen columns hold
    assert not torch.equal(history[1][1][:, 3], history[5][1][:, 3])  # an unfrozen one moved


def test_files_hold_b_and_s_and_load_recomputes_a(tmp_path, make_llama, llama_batch):
    model = make_llama()
    paretune.adapt(model, "lamda", r=4, targets=["q_proj", "down_proj"])
    for d in _deltas(model):
        with torch.no_grad():
            d.S.normal_(std=0.1)
            d.B.add_(0.05)
    want = model(llama_batch).logits
    paretune.save(model, tmp_path / "a")
    keys = load_file(tmp_path / "a" / "adapter.safetensors")
    assert {k.rsplit(".", 1)[1] for k in keys} == {"B", "S"}
    fresh = paretune.load(make_llama(), tmp_path / "a")
    torch.testing.assert_close(fresh(llama_batch).logits, want, atol=1e-5, rtol=1e-4)


def test_energy_ranks_split_the_total_by_spectrum_energy():
    flat = torch.ones(8)  # energy spread evenly: top-2 hold 1/4
    peaked = torch.tensor([10.0, 5.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])  # top-2 hold nearly all
    ranks = energy_ranks([flat, peaked, flat], r=2, caps=[8, 8, 8])
    assert sum(ranks) == 6 and ranks[1] > ranks[0] == ranks[2] >= 1
    assert energy_ranks([flat, peaked], r=4, caps=[8, 3]) == [5, 3]  # a capped layer gives its rest away


def test_lamda_plus_plus_adapts_with_per_layer_ranks(tmp_path):
    model = _model([(16, 16), (16, 16)])
    with torch.no_grad():  # layer 1: almost rank 2
        u, v = torch.randn(16, 2), torch.randn(2, 16)
        model[1].weight.copy_(u @ v + 0.01 * torch.randn(16, 16))
    paretune.adapt(model, "lamda", r=4, rank_allocation="energy", targets=["0", "1"])
    r0, r1 = (d.S.shape[0] for d in _deltas(model))
    assert r0 + r1 == 8 and r1 > r0
    c = paretune.count(model)
    assert c["trainable"] == c["formula"] == r0 * 16 + r0 ** 2 + r1 * 16 + r1 ** 2
    for d in _deltas(model):
        with torch.no_grad():
            d.S.normal_()
    x = torch.randn(3, 16)
    want = model(x)
    paretune.save(model, tmp_path / "pp")
    fresh = _model([(16, 16), (16, 16)])
    with torch.no_grad():
        fresh[1].weight.copy_(model[1].base.weight)
    paretune.load(fresh, tmp_path / "pp")
    torch.testing.assert_close(fresh(x), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bad", [{"r": 0}, {"freeze_fraction": 1.5}, {"rank_allocation": "adaptive"}, {"alpha": -1}])
def test_bad_options(bad):
    with pytest.raises(paretune.ConfigError, match=next(iter(bad))):
        paretune.adapt(_model(), "lamda", targets=["0"], **bad)
