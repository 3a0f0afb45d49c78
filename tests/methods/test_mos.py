"""MoS (Wang et al., ICLR 2025, "MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with
Mixture of Shards"): rank vectors concatenated from shards of pools shared by all layers.

Checked: the trainable count against a hand formula (LoRA's at the equivalent rank when l divides
the widths, the padded shards otherwise), the 1/8 ratio of the paper's setting on SmolLM2-135M's
shapes, ΔW against rank vectors assembled shard by shard, a pool shard used by two layers getting
the gradient of both, zero start and init, merge, save/load (index matrices from the file), equality
with PEFT LoRA given the materialised A and B, and refused options leaving the model unchanged."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch import nn

import paretune
from paretune.bench.budget import formula_count
from paretune.errors import ConfigError, TargetError
from paretune.methods.mos import MosConfig, select

from layer_chain import (TARGETS, assert_merge_round_trip, assert_save_load_exact, assert_trainable_count, chain,
                         deltas, left_unchanged, randomise)

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SMALL = {"r": 6, "equivalent_r": 3, "shards": 4, "private_r": 1, "dropout": 0.0}


def adapted_llama(make_llama, **options):
    model = make_llama()
    paretune.adapt(model, "mos", **{**SMALL, **options})
    return model


def linears(model: nn.Module, suffixes=LLAMA_TARGETS) -> list[nn.Linear]:
    return [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(suffixes)]


def reference_delta(d) -> torch.Tensor:
    """ΔW of one layer, float64, assembled shard by shard: rank vector j of A is the concatenation
    of pool shards idx_a[j, 0..l-1] (the private shards for the last private_r vectors), cut to d_in,
    times s_j; likewise B's columns; ΔW = (alpha / r) Σ_j s_j b_j a_jᵀ."""
    c = d.config
    l, p, shared = c.shards, c.private_r, c.r - c.private_r
    pool_a = d.bank.pool_a[f"d{d.d_in}"].detach().double() if shared else None
    pool_b = d.bank.pool_b[f"d{d.d_out}"].detach().double() if shared else None
    out = torch.zeros(d.d_out, d.d_in, dtype=torch.float64)
    for j in range(c.r):
        if j < shared:
            a = torch.cat([pool_a[int(d.idx_a[j, i])] for i in range(l)])
            b = torch.cat([pool_b[int(d.idx_b[j, i])] for i in range(l)])
        else:
            k = j - shared
            a = torch.cat([d.private_a[k * l + i].detach().double() for i in range(l)])
            b = torch.cat([d.private_b[k * l + i].detach().double() for i in range(l)])
        out += float(d.scale[j]) * torch.outer(b[:d.d_out], a[:d.d_in])
    return c.alpha / c.r * out


# -- counts ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("e,p", [(3, 1), (2, 0), (6, 6)])
def test_count_is_lora_at_the_equivalent_rank_when_l_divides_the_widths(make_llama, e, p):
    model = adapted_llama(make_llama, equivalent_r=e, private_r=p, r=6)
    hand = sum(e * (m.in_features + m.out_features) for m in linears(make_llama()))
    assert_trainable_count(model, hand)
    lora = make_llama()
    paretune.adapt(lora, "lora", r=e, targets=list(LLAMA_TARGETS))
    assert paretune.count(lora)["trainable"] == hand


def test_count_with_padded_shards_on_widths_l_does_not_divide():
    model = chain()  # widths 7, 8, 12, 16, 30
    e, p, l = 3, 1, 3
    paretune.adapt(model, "mos", r=5, equivalent_r=e, private_r=p, shards=l, targets=TARGETS)
    hand = sum(e * l * (math.ceil(d.d_in / l) + math.ceil(d.d_out / l)) for d in deltas(model).values())
    assert hand > sum(e * (d.d_in + d.d_out) for d in deltas(model).values())  # some widths are padded
    assert_trainable_count(model, hand)


def test_paper_setting_is_one_eighth_of_lora_on_smollm2_shapes():
    """r = 64 at the budget of LoRA rank 8 (l = 4, one private rank): q, k, v, o, gate, up, down of
    30 layers, hidden 576, intermediate 1536, k/v 192."""
    per_layer = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    shapes = Counter({s: 0 for s in per_layer})
    for s in per_layer:
        shapes[s] += 30
    mos = formula_count("mos", shapes, {"r": 64, "equivalent_r": 8, "shards": 4, "private_r": 1})
    lora64 = formula_count("lora", shapes, {"r": 64})
    assert mos == 2_442_240 == formula_count("lora", shapes, {"r": 8})
    assert lora64 == 19_537_920 and mos * 8 == lora64


# -- the construction ------------------------------------------------------------------------------

def test_pools_per_width_and_delta_weight_from_shards(make_llama):
    model = adapted_llama(make_llama, init_std=0.3)
    randomise(model, seed=4, scale=0.5)
    ds = list(deltas(model).values())
    bank = ds[0].bank
    assert all(d.bank is bank for d in ds)  # one bank for the adapter
    ins, outs = Counter(d.d_in for d in ds), Counter(d.d_out for d in ds)
    assert sorted(bank.pool_a) == sorted(f"d{w}" for w in ins) and sorted(bank.pool_b) == sorted(f"d{w}" for w in outs)
    for w, n in ins.items():  # (e - p)·n·l shards of length d / l
        assert bank.pool_a[f"d{w}"].shape == ((3 - 1) * n * 4, w // 4)
    for d in ds:
        torch.testing.assert_close(d.delta_weight().double(), reference_delta(d), atol=1e-6, rtol=1e-6)
        a, b, s = d.as_lora()
        assert a.shape == (6, d.d_in) and b.shape == (d.d_out, 6) and s == 16.0 / 6


def test_a_shard_used_by_two_layers_gets_the_gradient_of_both(make_llama):
    model = adapted_llama(make_llama)
    randomise(model, seed=2)
    ds = [d for d in deltas(model).values() if d.d_in == 32]
    x, y, k = None, None, None
    for i, d1 in enumerate(ds):  # two layers whose index matrices share a shard of the A pool
        for d2 in ds[i + 1:]:
            common = set(d1.idx_a.flatten().tolist()) & set(d2.idx_a.flatten().tolist())
            if common:
                x, y, k = d1, d2, min(common)
                break
        if x is not None:
            break
    assert x is not None
    pool = x.bank.pool_a["d32"]
    g = torch.Generator().manual_seed(0)
    rx, ry = torch.randn(x.d_out, 32, generator=g), torch.randn(y.d_out, 32, generator=g)

    def grad(loss_fn):
        pool.grad = None
        loss_fn().backward()
        return pool.grad.clone()

    gx = grad(lambda: (x.delta_weight() * rx).sum())
    gy = grad(lambda: (y.delta_weight() * ry).sum())
    both = grad(lambda: (x.delta_weight() * rx).sum() + (y.delta_weight() * ry).sum())
    assert gx[k].abs().sum() > 0 and gy[k].abs().sum() > 0
    torch.testing.assert_close(both, gx + gy)
    unused_by_x = sorted(set(range(pool.shape[0])) - set(x.idx_a.flatten().tolist()))
    if unused_by_x:
        assert torch.count_nonzero(gx[unused_by_x]) == 0  # x reaches only its own shards


def test_zero_start_and_init(make_llama, llama_batch):
    base, model = make_llama(), adapted_llama(make_llama)
    with torch.no_grad():
        assert torch.equal(model(llama_batch).logits, base(llama_batch).logits)
    for d in deltas(model).values():
        assert torch.count_nonzero(d.delta_weight()) == 0
        assert not d.private_b.any() and d.private_a.abs().max() <= 1 / math.sqrt(d.d_in)
        assert torch.equal(d.scale, torch.ones(6))  # init_std = 0: no random scaling
        assert not d.idx_a.requires_grad and not d.scale.requires_grad
        for idx, rows in ((d.idx_a, d.bank.pool_a[f"d{d.d_in}"].shape[0]), (d.idx_b, d.bank.pool_b[f"d{d.d_out}"].shape[0])):
            flat = idx.flatten().tolist()
            if rows >= len(flat):  # enough shards: no shard twice in one layer (the authors' randperm)
                assert len(set(flat)) == len(flat)
    bank = next(iter(deltas(model).values())).bank
    assert not any(p.any() for p in bank.pool_b.values())
    for key, p in bank.pool_a.items():
        assert 0 < p.abs().max() <= 1 / math.sqrt(int(key[1:]))


def test_random_scaling_is_frozen_normal_over_mean():
    model = nn.Sequential(nn.Linear(64, 64))
    paretune.adapt(model, "mos", r=4000, equivalent_r=8, private_r=1, init_mean=2.0, init_std=0.5, targets=["0"])
    s = deltas(model)["0"].scale
    assert s.shape == (4000,) and not s.requires_grad
    assert abs(s.mean().item() - 1.0) < 0.02 and abs(s.std().item() - 0.25) < 0.02  # N(2, 0.5) / 2


def test_select_is_one_permutation_then_cycles():
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(select(10, 6, g1), torch.randperm(10, generator=g2)[:6])
    picks = select(4, 10, torch.Generator().manual_seed(1))
    assert sorted(picks[:4].tolist()) == [0, 1, 2, 3] and sorted(picks[4:8].tolist()) == [0, 1, 2, 3]


# -- merge, save / load, PEFT ----------------------------------------------------------------------

def test_merge_and_save_load(make_llama, llama_batch, tmp_path):
    model = adapted_llama(make_llama, init_std=0.2)
    randomise(model, seed=5, scale=0.3)
    with torch.no_grad():
        ref = model(llama_batch).logits
    paretune.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(llama_batch).logits, ref, atol=1e-5, rtol=1e-5)
    paretune.unmerge(model)
    paretune.save(model, tmp_path / "a")
    fresh = make_llama()
    paretune.load(fresh, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(llama_batch).logits, ref, atol=0, rtol=0)
    for (n, d), e in zip(deltas(model).items(), deltas(fresh).values()):
        assert torch.equal(d.idx_a, e.idx_a) and torch.equal(d.idx_b, e.idx_b) and torch.equal(d.scale, e.scale), n


def test_hot_swap_takes_the_index_matrices_and_scaling_from_the_file(tmp_path):
    """seed and the init options only change the start: a file swapped into an adapter drawn with
    another seed brings its own index matrices and scalings, so the outputs are the saved ones."""
    x = torch.randn(3, 8)
    model = chain()
    paretune.adapt(model, "mos", **{**SMALL, "shards": 1}, init_std=0.3, targets=TARGETS)
    randomise(model, seed=6)
    with torch.no_grad():
        ref = model(x)
    paretune.save(model, tmp_path / "a")
    other = chain()
    paretune.adapt(other, "mos", **{**SMALL, "shards": 1}, init_std=0.3, targets=TARGETS, seed=99)
    before = {n: d.idx_a.clone() for n, d in deltas(other).items()}
    assert any(not torch.equal(before[n], d.idx_a) for n, d in deltas(model).items())  # other draws
    paretune.hot_swap(other, tmp_path / "a")
    for n, d in deltas(model).items():
        e = deltas(other)[n]
        assert torch.equal(d.idx_a, e.idx_a) and torch.equal(d.idx_b, e.idx_b) and torch.equal(d.scale, e.scale)
    with torch.no_grad():
        torch.testing.assert_close(other(x), ref, atol=0, rtol=0)
    assert_save_load_exact(model, tmp_path / "b", x)
    assert_merge_round_trip(other, x)


def test_equals_peft_lora_with_the_materialised_factors(make_llama, llama_batch):
    from peft import LoraConfig, get_peft_model

    ours = adapted_llama(make_llama, init_std=0.3)
    randomise(ours, seed=8, scale=0.3)
    peft_model = get_peft_model(make_llama(), LoraConfig(r=6, lora_alpha=16.0, lora_dropout=0.0,
                                                         target_modules=list(LLAMA_TARGETS)))
    for name, d in deltas(ours).items():
        layer = peft_model.base_model.model.get_submodule(name)
        a, b, s = d.as_lora()
        assert s == layer.scaling["default"]
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    with torch.no_grad():
        torch.testing.assert_close(ours(llama_batch).logits, peft_model(llama_batch).logits, atol=1e-5, rtol=1e-5)


# -- refused options -------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    {"private_r": 4, "equivalent_r": 3},  # more private shards than the budget
    {"private_r": 3, "equivalent_r": 3, "r": 6},  # nothing left for the shared rank vectors
    {"private_r": 6, "equivalent_r": 8, "r": 6},  # every rank private: the pools would be unused
    {"shards": 0}, {"r": 0}, {"equivalent_r": 0}, {"init_mean": 0.0}, {"init_std": -1.0}, {"dropout": 1.0},
])
def test_bad_options_are_refused_and_the_model_is_unchanged(bad):
    model = chain()
    with left_unchanged(model, torch.randn(2, 8)), pytest.raises(ConfigError):
        paretune.adapt(model, "mos", **{**SMALL, **bad}, targets=TARGETS)


def test_default_targets_and_unknown_architecture(make_llama):
    model = adapted_llama(make_llama)
    assert sorted(deltas(model)) == sorted(n for n, m in make_llama().named_modules()
                                           if isinstance(m, nn.Linear) and n.endswith(LLAMA_TARGETS))
    mlp = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(TargetError, match="targets"):
        paretune.adapt(mlp, "mos", **SMALL)
    assert isinstance(mlp[0], nn.Linear)
    assert MosConfig().to_dict() == {"r": 64, "equivalent_r": 8, "shards": 4, "private_r": 1, "alpha": 16.0,
                                          "dropout": 0.1, "init_mean": 1.0, "init_std": 0.0, "seed": 0}
