"""NeuroAda (Zhang et al. 2025): count d_out·k, zero start, positions = each row's top-k |W|
(checked against hand-written and independently computed answers, ties to the lower column),
stored bytes, merge / save / load, gradients on the values only, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import paretune
from paretune.errors import ConfigError

from layer_chain import (SHAPES, TARGETS, assert_bad_options_refused,
                         assert_save_load_exact, assert_trainable_count, assert_zero_delta_at_init, chain, deltas,
                         left_unchanged, randomise)
from sparse_checks import (assert_merge_touches_only_the_support, assert_only_the_values_get_gradients,
                           assert_same_positions, assert_values_and_int32_indices_bytes)


def positions(delta) -> set[tuple[int, int]]:
    rows, cols = delta.rows_cols()
    return set(zip(rows.tolist(), cols.tolist()))


def expected_top_k(w: torch.Tensor, k: int) -> set[tuple[int, int]]:
    """Each row's k largest |w|, ties to the lower column: plain Python, independent of the code."""
    out = set()
    for i, row in enumerate(w.tolist()):
        ranked = sorted(range(len(row)), key=lambda j: (-abs(row[j]), j))
        out |= {(i, j) for j in ranked[:k]}
    return out


# -- counts and init ---------------------------------------------------------------------------

@pytest.mark.parametrize("d_in,d_out", SHAPES)
@pytest.mark.parametrize("k", [1, 3, 7])
def test_trainable_count_is_d_out_times_k(d_in, d_out, k):
    model = nn.Sequential(nn.Linear(d_in, d_out))
    paretune.adapt(model, "neuroada", k=k)
    assert_trainable_count(model, d_out * k)


def test_default_k_is_the_references_times_num():
    model = nn.Sequential(nn.Linear(8, 5))
    paretune.adapt(model, "neuroada")
    assert deltas(model)["0"].values.numel() == 5  # train_our.py: --times_num default 1


def test_zero_delta_at_init(make_llama, llama_batch):
    assert_zero_delta_at_init(make_llama, llama_batch, "neuroada", "values", k=4)


# -- the positions -----------------------------------------------------------------------------

def test_positions_are_each_rows_top_k_magnitudes_on_a_hand_made_weight():
    layer = nn.Linear(5, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([
            [0.1, -3.0, 2.0, 0.5, -0.2],   # |.| ranks: col 1, col 2, col 3
            [4.0, 0.0, -0.1, -5.0, 1.0],   # col 3, col 0, col 4
            [-0.3, 0.3, 0.9, -0.8, 0.05],  # col 2, col 3, then the tie 0.3 = |-0.3|: col 0 (lower index)
        ]))
    model = nn.Sequential(layer)
    paretune.adapt(model, "neuroada", k=2)
    assert positions(deltas(model)["0"]) == {(0, 1), (0, 2), (1, 3), (1, 0), (2, 2), (2, 3)}
    model = nn.Sequential(nn.Linear(5, 3, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(layer.weight)
    paretune.adapt(model, "neuroada", k=3)
    assert positions(deltas(model)["0"]) == {(0, 1), (0, 2), (0, 3), (1, 3), (1, 0), (1, 4), (2, 2), (2, 3), (2, 0)}


def test_ties_go_to_the_lower_column_and_each_row_gets_exactly_k():
    w = torch.tensor([
        [1.0, -1.0, 1.0, 1.0, -1.0, 1.0],  # all tied
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],    # a dead neuron: all tied at zero
        [0.5, 2.0, -0.5, 0.5, 2.0, 0.1],   # two above, then a tie at 0.5 among cols 0, 2, 3
    ])
    model = nn.Sequential(nn.Linear(6, 3))
    with torch.no_grad():
        model[0].weight.copy_(w)
    paretune.adapt(model, "neuroada", k=3)
    got = positions(deltas(model)["0"])
    assert got == {(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 1), (2, 4), (2, 0)}
    assert got == expected_top_k(w, 3)


@pytest.mark.parametrize("k", [1, 2, 5, 8])  # 8: every input of the narrowest layers
def test_positions_equal_an_independent_top_k_on_every_layer(k):
    model = chain()
    weights = {t: model.get_submodule(t).weight.detach().clone() for t in TARGETS}
    paretune.adapt(model, "neuroada", k=k, targets=TARGETS)
    for t, d in deltas(model).items():
        w = weights[t]
        assert positions(d) == expected_top_k(w, k)
        assert torch.equal(d.indices.long(),  # sorted flat positions, agreeing with torch.topk (no ties here)
                           torch.sort((torch.arange(w.shape[0])[:, None] * w.shape[1]
                                       + torch.topk(w.abs(), k, dim=1).indices).flatten()).values)
        assert d.indices.dtype == torch.int32


def test_gpt2_conv1d_neurons_are_rows_of_the_transposed_weight():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(6, 10)  # weight (in=10, out=6)
    with torch.no_grad():
        conv.weight.normal_()
    model = nn.Sequential(conv)
    w = conv.weight.detach().t().clone()  # (d_out=6, d_in=10)
    paretune.adapt(model, "neuroada", k=3, targets=["0"])
    assert positions(deltas(model)["0"]) == expected_top_k(w, 3)


def test_selection_in_half_precision_matches_the_float32_one():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 16)).to(torch.bfloat16)
    w = model[0].weight.detach().float().clone()
    paretune.adapt(model, "neuroada", k=4)
    d = deltas(model)["0"]
    assert positions(d) == expected_top_k(w, 4)
    assert d.values.dtype == torch.float32  # the bypass trains in float32 on a bfloat16 base


# -- storage, merge, save / load, gradients ----------------------------------------------------

def test_stored_bytes_are_values_and_int32_indices():
    model = chain()
    paretune.adapt(model, "neuroada", k=3, targets=TARGETS)
    n = sum(3 * d_out for d_out in (16, 8, 12, 12, 30, 7))
    assert_values_and_int32_indices_bytes(model, n)


def test_merged_equals_unmerged_and_merge_touches_only_the_bypassed_entries():
    model = chain()
    paretune.adapt(model, "neuroada", k=2, targets=TARGETS)
    randomise(model, scale=0.3)
    # the bypassed entries as (row, col) pairs from rows_cols(), written as flat positions
    assert_merge_touches_only_the_support(model, torch.randn(4, 8),
                                          support=lambda d: {r * d.d_in + c for r, c in positions(d)},
                                          atol=1e-5, rtol=1e-5)


def test_save_load_takes_the_positions_from_the_file(tmp_path):
    model = chain()
    paretune.adapt(model, "neuroada", k=3, targets=TARGETS)
    randomise(model)
    assert_save_load_exact(model, tmp_path / "a", torch.randn(4, 8))  # the same base: same outputs
    # another base of the same shapes: its own top-k differ, the loaded positions are the saved ones
    other = chain(seed=1)
    paretune.load(other, tmp_path / "a")
    assert_same_positions(model, other, values=True)


def test_only_the_values_get_gradients():
    model = chain()
    paretune.adapt(model, "neuroada", k=2, targets=TARGETS)
    assert_only_the_values_get_gradients(model)


# -- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [{"k": 0}, {"k": -1}, {"k": 1.5}, {"k": True}, {"top_k": 2}])
def test_bad_options_are_config_errors(bad):
    assert_bad_options_refused("neuroada", bad)


def test_k_above_d_in_is_a_clear_error_and_leaves_the_model_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4))  # k=10 fits layer 0, not layer 1
    with left_unchanged(model), pytest.raises(ConfigError, match=r"k=10 exceeds the 8 inputs"):
        paretune.adapt(model, "neuroada", k=10)
