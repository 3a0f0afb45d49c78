"""Random sparse: count per layer (count, or the rounded fraction, 0.01 by default), zero start,
unique in-range seeded positions spread uniformly, stored bytes, merge / save / load, gradients on
the values only, clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import paretune
from paretune.errors import ConfigError
from paretune.methods.random_sparse import sample_positions

from layer_chain import (CHAIN_SHAPES, SHAPES, TARGETS, assert_bad_options_refused,
                         assert_save_load_exact, assert_trainable_count, assert_zero_delta_at_init, chain, deltas,
                         left_unchanged, randomise)
from sparse_checks import (assert_merge_touches_only_the_support, assert_only_the_values_get_gradients,
                           assert_same_positions, assert_values_and_int32_indices_bytes)


def flat(model, target="0") -> torch.Tensor:
    return deltas(model)[target].indices.long()


# -- counts and init ---------------------------------------------------------------------------

@pytest.mark.parametrize("d_in,d_out", SHAPES)
@pytest.mark.parametrize("count", [1, 5, 56])
def test_trainable_count_is_count(d_in, d_out, count):
    model = nn.Sequential(nn.Linear(d_in, d_out))
    paretune.adapt(model, "random-sparse", count=count)
    assert_trainable_count(model, count)


@pytest.mark.parametrize("fraction,d_out,d_in,expected", [
    (None, 100, 100, 100),     # the default: 1 % of 10,000
    (None, 8, 16, 1),          # 1.28 -> 1
    (None, 10, 15, 2),         # 1.5 rounds half up -> 2
    (0.001, 8, 16, 1),         # 0.128 -> at least one entry
    (0.25, 30, 12, 90),
    (0.3, 7, 30, 63),
    (1.0, 12, 12, 144),        # the whole layer
])
def test_trainable_count_of_a_fraction(fraction, d_out, d_in, expected):
    model = nn.Sequential(nn.Linear(d_in, d_out))
    options = {} if fraction is None else {"fraction": fraction}
    paretune.adapt(model, "random-sparse", **options)
    cost = paretune.count(model)
    assert cost["trainable"] == cost["formula"] == expected
    assert flat(model).numel() == expected


def test_zero_delta_at_init(make_llama, llama_batch):
    assert_zero_delta_at_init(make_llama, llama_batch, "random-sparse", "values", count=40)


# -- the positions -----------------------------------------------------------------------------

@pytest.mark.parametrize("count", [1, 30, 96])  # 96: every entry of the 12 x 8 layer (the randperm path)
def test_positions_are_unique_sorted_int32_and_in_range(count):
    model = chain()
    paretune.adapt(model, "random-sparse", count=count, targets=TARGETS)
    for (d_out, d_in), d in zip(CHAIN_SHAPES, deltas(model).values()):
        assert (d.d_out, d.d_in) == (d_out, d_in)
        idx = d.indices.long()
        assert d.indices.dtype == torch.int32
        assert idx.numel() == count == torch.unique(idx).numel()
        assert int(idx.min()) >= 0 and int(idx.max()) < d_out * d_in
        assert torch.equal(idx, torch.sort(idx).values)


def test_positions_depend_on_the_seed_and_layer_only():
    runs = {}
    for name, seed, model_seed, global_seed in [("a", 3, 0, 0), ("b", 3, 1, 99), ("c", 4, 0, 0)]:
        torch.manual_seed(global_seed)  # the global RNG plays no part
        model = chain(model_seed)
        torch.manual_seed(global_seed)
        paretune.adapt(model, "random-sparse", count=20, seed=seed, targets=TARGETS)
        runs[name] = [d.indices.clone() for d in deltas(model).values()]
    assert all(torch.equal(a, b) for a, b in zip(runs["a"], runs["b"]))  # same seed: same positions
    assert all(not torch.equal(a, c) for a, c in zip(runs["a"], runs["c"]))  # other seed: other positions
    # two layers of the same shape draw differently (the layer index enters the seed)
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10))
    paretune.adapt(model, "random-sparse", count=20)
    assert not torch.equal(flat(model, "0"), flat(model, "1"))


def test_positions_are_spread_uniformly():
    """Over 400 seeds, every entry of a 20 x 50 layer is drawn ~Binomial(400, 0.1) times: a loose
    chi-square check on the entries (999 degrees of freedom), on rows and on columns."""
    d_out, d_in, count, seeds = 20, 50, 100, 400
    hits = torch.zeros(d_out * d_in)
    for seed in range(seeds):
        model = nn.Sequential(nn.Linear(d_in, d_out))
        paretune.adapt(model, "random-sparse", count=count, seed=seed)
        hits[flat(model)] += 1
    p = count / (d_out * d_in)
    mean, var = seeds * p, seeds * p * (1 - p)
    chi2 = float(((hits - mean) ** 2).sum() / var)
    dof = d_out * d_in - 1
    assert abs(chi2 - dof) < 5 * math.sqrt(2 * dof), chi2
    rows, cols = hits.view(d_out, d_in).sum(1), hits.view(d_out, d_in).sum(0)
    assert float((rows - seeds * count / d_out).abs().max()) < 5 * math.sqrt(seeds * count / d_out)
    assert float((cols - seeds * count / d_in).abs().max()) < 5 * math.sqrt(seeds * count / d_in)


@pytest.mark.parametrize("size,n", [(1000, 100), (1000, 700)])  # the streaming draw and the randperm one
def test_the_draw_is_a_uniform_subset(size, n):
    hits = torch.zeros(size)
    trials = 300
    for seed in range(trials):
        picked = sample_positions(size, n, torch.Generator().manual_seed(seed))
        assert picked.numel() == n == torch.unique(picked).numel()
        hits[picked] += 1
    p = n / size
    chi2 = float(((hits - trials * p) ** 2).sum() / (trials * p * (1 - p)))
    assert abs(chi2 - (size - 1)) < 5 * math.sqrt(2 * (size - 1)), chi2


def test_a_large_layer_is_drawn_without_a_full_permutation():
    # 2**26 entries: a full randperm would take seconds and 512 MiB; the streaming draw does not
    picked = sample_positions(2**26, 5000, torch.Generator().manual_seed(0))
    assert picked.numel() == 5000 == torch.unique(picked).numel()
    assert int(picked.min()) >= 0 and int(picked.max()) < 2**26


# -- storage, merge, save / load, gradients ----------------------------------------------------

def test_stored_bytes_are_values_and_int32_indices():
    model = chain()
    paretune.adapt(model, "random-sparse", count=17, targets=TARGETS)
    assert_values_and_int32_indices_bytes(model, 6 * 17)
    model = chain()
    paretune.adapt(model, "random-sparse", fraction=0.1, targets=TARGETS)
    n = sum(max(1, int(0.1 * o * i + 0.5)) for o, i in CHAIN_SHAPES)
    assert_values_and_int32_indices_bytes(model, n)


def test_merged_equals_unmerged_and_merge_touches_only_the_drawn_entries():
    model = chain()
    paretune.adapt(model, "random-sparse", count=25, targets=TARGETS)
    randomise(model, scale=0.3)
    assert_merge_touches_only_the_support(model, torch.randn(4, 8), atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_takes_the_positions_from_the_file(tmp_path):
    model = chain()
    paretune.adapt(model, "random-sparse", count=25, seed=11, targets=TARGETS)
    randomise(model)
    fresh = assert_save_load_exact(model, tmp_path / "a", torch.randn(4, 8))
    assert_same_positions(model, fresh)


def test_only_the_values_get_gradients():
    model = chain()
    paretune.adapt(model, "random-sparse", fraction=0.5, targets=TARGETS)
    assert_only_the_values_get_gradients(model)


# -- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    {"count": 0}, {"count": -3}, {"count": 2.5}, {"count": True},
    {"fraction": 0.0}, {"fraction": -0.1}, {"fraction": 1.5}, {"fraction": "0.1"},
    {"count": 4, "fraction": 0.5}, {"seed": -1}, {"seed": 1.5}, {"n": 4},
])
def test_bad_options_are_config_errors(bad):
    assert_bad_options_refused("random-sparse", bad)


def test_count_above_a_layers_size_is_a_clear_error_and_leaves_the_model_unchanged():
    model = chain()  # count=100 fits layers 0 and 1 (128 entries each), not layer 2 (12 x 8 = 96)
    with left_unchanged(model), pytest.raises(ConfigError, match=r"count=100 exceeds the 96 entries"):
        paretune.adapt(model, "random-sparse", count=100, targets=TARGETS)
