"""SHiRA (Bhardwaj et al. 2024): equality with PEFT's ShiraModel (same seed -> same indices; same
values -> same ΔW and outputs), the count formulas, stored bytes, each mask strategy on hand-made
weights and gradients, fusion of several adapters, merged switching, save/load and errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import paretune
from paretune.core.host import Host
from paretune.errors import ConfigError
from paretune.methods import shira
from paretune.methods.shira import ScoreMap, ShiraConfig, gradient_scores

from layer_chain import assert_trainable_count, left_unchanged
from sparse_checks import assert_values_and_int32_indices_bytes

ATOL = 1e-5


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 6)).eval()


def _hosts(model: nn.Module) -> dict[str, Host]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Host)}


def _peft_shira(model: nn.Module, targets: list[str], r: int, seed: int):
    from peft import ShiraConfig as PeftShiraConfig, get_peft_model

    cfg = PeftShiraConfig(r=r, target_modules=targets, random_seed=seed, init_weights=False)  # randn values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, cfg)


def _peft_layers(peft_model) -> dict[str, nn.Module]:
    prefix = "base_model.model."
    return {n[len(prefix):]: m for n, m in peft_model.named_modules() if hasattr(m, "shira_indices")}


def _peft_flat(layer) -> torch.Tensor:
    rows, cols = layer.shira_indices["default"].long()
    return rows * layer.in_features + cols


def _copy_peft_values(model: nn.Module, peft_model) -> None:
    """Our values := PEFT's, position by position (both sorted row-major; asserted equal first)."""
    hosts = _hosts(model)
    with torch.no_grad():
        for name, layer in _peft_layers(peft_model).items():
            d = hosts[name].deltas["default"]
            assert torch.equal(d.indices.long(), _peft_flat(layer)), name
            d.values.copy_(layer.shira_weight["default"])


# -- equality with PEFT ----------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 5, 1234])
def test_same_seed_gives_pefts_indices_values_delta_and_outputs(seed):
    base = _mlp()
    x = torch.randn(4, 10)
    peft_model = _peft_shira(copy.deepcopy(base), ["0", "2"], r=2, seed=seed)
    ours = copy.deepcopy(base)
    paretune.adapt(ours, "shira", r=2, seed=seed, targets=["0", "2"])
    _copy_peft_values(ours, peft_model)  # asserts the indices are PEFT's
    hosts = _hosts(ours)
    for name, layer in _peft_layers(peft_model).items():
        d = hosts[name].deltas["default"]
        assert d.indices.dtype == torch.int32 and d.values.numel() == 2 * (layer.in_features + layer.out_features)
        torch.testing.assert_close(d.delta_weight().detach(), layer.get_delta_weight("default").to_dense().detach(),
                                   atol=ATOL, rtol=0)
        assert bool(d.values.abs().min() > 0)  # PEFT's randn values really moved ours
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peft_model(x), atol=ATOL, rtol=0)


def test_peft_default_unseeded_generator_is_seed_67280421310721():
    from peft.tuners.shira.mask_functions import random_mask

    layer = nn.Linear(9, 7)
    peft_mask = random_mask(layer, 1, random_seed=None)
    ours = shira.random_positions(7, 9, 16, 67280421310721)
    assert torch.equal(peft_mask.flatten().nonzero().flatten(), torch.sort(ours).values)


def test_equal_to_peft_on_tiny_llama(make_llama, llama_batch):
    base = make_llama()
    peft_model = _peft_shira(copy.deepcopy(base), ["q_proj", "v_proj"], r=2, seed=3)
    ours = copy.deepcopy(base)
    paretune.adapt(ours, "shira", r=2, seed=3, targets=["q_proj", "v_proj"])
    assert set(_hosts(ours)) == set(_peft_layers(peft_model))
    _copy_peft_values(ours, peft_model)
    with torch.no_grad():
        torch.testing.assert_close(ours(llama_batch).logits, peft_model(llama_batch).logits, atol=ATOL, rtol=0)


# -- counts and bytes ------------------------------------------------------------------------

def test_r_is_the_default_count_with_pefts_default_32():
    cfg = ShiraConfig()  # neither r nor fraction: PEFT's default r=32
    assert cfg.r == 32 and cfg.fraction is None and cfg.mask == "random"
    assert ShiraConfig.from_dict(cfg.to_dict()) == cfg
    assert paretune.methods.shira.ShiraDelta.trainable_formula(64, 48, cfg) == 32 * (64 + 48)


def test_count_formula_and_bytes():
    model = _mlp()
    paretune.adapt(model, "shira", r=1)
    n = 1 * (10 + 8) + 1 * (8 + 6)
    assert_trainable_count(model, n)
    assert_values_and_int32_indices_bytes(model, n)
    for h in _hosts(model).values():
        state = h.deltas["default"].stored_state()
        assert set(state) == {"values", "indices"}
        assert state["indices"].dtype == torch.int32 and state["values"].dtype == torch.float32


@pytest.mark.parametrize("fraction, expected", [(0.1, [8, 5]), (0.5, [40, 24]), (1.0, [80, 48]), (1e-6, [1, 1])])
def test_fraction_count(fraction, expected):
    model = _mlp()
    paretune.adapt(model, "shira", fraction=fraction)
    counts = [h.deltas["default"].values.numel() for h in _hosts(model).values()]
    assert counts == expected  # max(1, round(fraction · d_out · d_in)): 10x8 and 8x6 layers
    assert ShiraConfig(fraction=fraction).r is None


# -- masks -----------------------------------------------------------------------------------

def _hand_linear() -> nn.Sequential:
    lin = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1, -5.0, 0.3, 2.0],
                                       [-0.2, 0.0, 4.0, -0.4],
                                       [3.0, 0.5, -0.6, 0.7]]))
    return nn.Sequential(lin)


def _support(model) -> set[int]:
    (h,) = _hosts(model).values()
    return set(h.deltas["default"].indices.tolist())


def test_magnitude_mask_picks_the_largest_abs_weights():
    model = _hand_linear()
    paretune.adapt(model, "shira", fraction=4 / 12, mask="magnitude")
    # |W| ranks: -5.0 (0,1)=1, 4.0 (1,2)=6, 3.0 (2,0)=8, 2.0 (0,3)=3
    assert _support(model) == {1, 6, 8, 3}


def test_gradient_and_snip_masks_on_hand_made_scores():
    model = _hand_linear()
    grad = torch.tensor([[1.0, 0.01, 0.5, 0.1],
                         [2.0, 9.0, 0.02, 0.3],
                         [0.05, 0.2, 3.0, 0.4]])
    scores = ScoreMap(model, {"0": grad})
    g = copy.deepcopy(model)
    paretune.adapt(g, "shira", fraction=3 / 12, mask="gradient", scores=ScoreMap(g, {"0": grad}))
    assert _support(g) == {5, 10, 4}  # |g|: 9.0, 3.0, 2.0
    paretune.adapt(model, "shira", fraction=3 / 12, mask="snip", scores=scores)
    snip = (model[0].base.weight.abs() * grad).flatten()  # independent: |W ⊙ g|
    assert _support(model) == set(torch.topk(snip, 3).indices.tolist())
    assert _support(model) == {10, 4, 11}  # by hand: |W⊙g| = 1.8, 0.4, 0.28
    assert paretune.adapters(model)["default"].config.scores is None  # dropped once used


def test_gradient_scores_are_abs_of_the_summed_calibration_gradient():
    model = _mlp()
    batches = [torch.randn(5, 10, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    target = torch.randn(5, 6, generator=torch.Generator().manual_seed(9))

    def loss_fn(out, batch):
        return ((out - target) ** 2).mean()

    scores = gradient_scores(model, batches, loss_fn=loss_fn)
    assert set(scores) == {"0", "2"}
    # independent computation: autograd.grad of the summed loss
    ref_model = _mlp()
    ws = [ref_model[0].weight, ref_model[2].weight]
    total = sum(loss_fn(ref_model(b), b) for b in batches)
    grads = torch.autograd.grad(total, ws)
    torch.testing.assert_close(scores["0"], grads[0].abs() / 3)
    torch.testing.assert_close(scores["2"], grads[1].abs() / 3)
    # flags and grads left as they were
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    paretune.adapt(model, "shira", r=1, mask="gradient", scores=scores)
    for name, h in _hosts(model).items():
        n = h.deltas["default"].values.numel()
        assert set(h.deltas["default"].indices.tolist()) == set(torch.topk(scores[name].flatten(), n).indices.tolist())


def test_gradient_scores_on_hf_model_uses_its_loss(make_llama, llama_batch):
    model = make_llama()
    scores = gradient_scores(model, [{"input_ids": llama_batch, "labels": llama_batch}], targets=["q_proj"])
    assert len(scores) == 2 and all(s.shape == (32, 32) and s.sum() > 0 for s in scores.values())
    with pytest.raises(ConfigError, match="loss_fn"):
        gradient_scores(model, [{"input_ids": llama_batch}], targets=["q_proj"])


def test_rows_columns_mask_is_diagonal_plus_whole_lines():
    d_out, d_in, r = 12, 20, 2
    model = nn.Sequential(nn.Linear(d_in, d_out))
    paretune.adapt(model, "shira", r=r, mask="rows+columns", seed=7)
    (h,) = _hosts(model).values()
    flat = h.deltas["default"].indices.long()
    assert flat.numel() == r * (d_in + d_out)
    mask = torch.zeros(d_out * d_in, dtype=torch.bool)
    mask[flat] = True
    mask = mask.view(d_out, d_in)
    assert bool(mask.diagonal().all())
    full_rows = mask.all(dim=1)
    full_cols = mask.all(dim=0)
    covered = full_rows[:, None] | full_cols[None, :] | torch.eye(d_out, d_in, dtype=torch.bool)
    leftover = mask & ~covered  # entries of the one cut line
    assert full_rows.sum() >= 1 and full_cols.sum() >= 1
    rows_left, cols_left = leftover.nonzero(as_tuple=True)
    assert len(set(rows_left.tolist())) <= 1 or len(set(cols_left.tolist())) <= 1  # at most one partial line
    # another seed picks other lines
    other = nn.Sequential(nn.Linear(d_in, d_out))
    paretune.adapt(other, "shira", r=r, mask="rows+columns", seed=8)
    assert set(_hosts(other)["0"].deltas["default"].indices.tolist()) != set(flat.tolist())


def test_rows_columns_positions_exact_count_and_small_count():
    for n in (1, 3, 12, 13, 50, 240):
        p = shira.rows_columns_positions(12, 20, n, seed=0)
        assert p.numel() == n == torch.unique(p).numel()
    assert set(shira.rows_columns_positions(12, 20, 3, seed=0).tolist()) == {0, 21, 42}  # diagonal first


# -- fusion and switching --------------------------------------------------------------------

def _randomise(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for h in _hosts(model).values():
            if name in h.deltas:
                v = h.deltas[name].values
                v.copy_(torch.randn(v.shape, generator=g))


def test_two_active_adapters_add_their_sparse_deltas():
    base = _mlp()
    model = copy.deepcopy(base)
    paretune.adapt(model, "shira", name="a", r=1, seed=1)
    paretune.adapt(model, "shira", name="b", r=1, seed=2, mask="magnitude")
    _randomise(model, "a", 1)
    _randomise(model, "b", 2)
    assert paretune.active(model) == ["a", "b"]
    x = torch.randn(3, 10)
    h = _hosts(model)
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name in ("0", "2"):
            ref.get_submodule(name).weight += h[name].deltas["a"].delta_weight() + h[name].deltas["b"].delta_weight()
        torch.testing.assert_close(model(x), ref(x), atol=ATOL, rtol=0)


def test_merged_switch_writes_only_the_masked_entries():
    model = _mlp()
    paretune.adapt(model, "shira", name="a", r=1, seed=1)
    paretune.adapt(model, "shira", name="b", r=1, seed=2)
    _randomise(model, "a", 3)
    _randomise(model, "b", 4)
    h = _hosts(model)
    w0 = {n: host.base.weight.detach().clone() for n, host in h.items()}
    paretune.set_active(model, ["a"])
    paretune.merge(model, "a")
    wa = {n: host.base.weight.detach().clone() for n, host in h.items()}
    paretune.unmerge(model, "a")
    paretune.set_active(model, ["b"])
    paretune.merge(model, "b")
    for n, host in h.items():
        allowed = set(host.deltas["a"].indices.tolist()) | set(host.deltas["b"].indices.tolist())
        changed = (host.base.weight != wa[n]).flatten().nonzero().flatten().tolist()
        assert changed and set(changed) <= allowed
        untouched = torch.ones(w0[n].numel(), dtype=torch.bool)
        untouched[list(allowed)] = False
        assert torch.equal(host.base.weight.flatten()[untouched], w0[n].flatten()[untouched])
        torch.testing.assert_close(host.base.weight.detach(), w0[n] + host.deltas["b"].delta_weight().detach(),
                                   atol=1e-6, rtol=0)


# -- save / load -----------------------------------------------------------------------------

def test_snip_adapter_saves_indices_and_loads_without_scores(tmp_path):
    model = _mlp()
    batches = [torch.randn(4, 10, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    scores = gradient_scores(model, batches, loss_fn=lambda out, b: out.pow(2).sum())
    paretune.adapt(model, "shira", r=1, mask="snip", scores=scores)
    _randomise(model, "default", 5)
    x = torch.randn(3, 10)
    with torch.no_grad():
        expected = model(x)
    paretune.save(model, tmp_path / "a")
    meta = (tmp_path / "a" / "paretune.json").read_text()
    assert "scores" not in meta and '"snip"' in meta
    fresh = paretune.load(_mlp(), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, atol=ATOL, rtol=0)
    for n, h in _hosts(fresh).items():
        assert torch.equal(h.deltas["default"].indices, _hosts(model)[n].deltas["default"].indices)
    paretune.hot_swap(fresh, tmp_path / "a")  # the same options: accepted


# -- errors ----------------------------------------------------------------------------------

def test_gradient_mask_without_scores_names_the_fix():
    model = _mlp()
    with left_unchanged(model):
        for mask in ("gradient", "snip"):
            with pytest.raises(ConfigError, match="gradient_scores"):
                paretune.adapt(model, "shira", mask=mask)


def test_bad_scores_are_clear_errors():
    model = _mlp()
    with left_unchanged(model):
        with pytest.raises(ConfigError, match="ScoreMap"):
            paretune.adapt(model, "shira", mask="gradient", scores={"0": torch.ones(8, 10)})
        with pytest.raises(ConfigError, match="gradient' or 'snip' only"):
            paretune.adapt(model, "shira", scores=ScoreMap(model, {"0": torch.ones(8, 10)}))
        with pytest.raises(ConfigError, match=r"\(8, 10\) tensor"):
            ScoreMap(model, {"0": torch.ones(10, 8)})
        with pytest.raises(ConfigError, match="no module"):
            ScoreMap(model, {"nope": torch.ones(10, 8)})
        only_first = ScoreMap(model, {"0": torch.ones(8, 10)})
        with pytest.raises(ConfigError, match="hold nothing for adapted layer 1"):
            paretune.adapt(model, "shira", r=1, mask="gradient", scores=only_first)


def test_count_too_large_is_refused_and_the_model_unchanged():
    model = _mlp()
    with left_unchanged(model):
        with pytest.raises(ConfigError, match=r"r=5 gives r·\(d_in \+ d_out\) = 90 entries for a \(8 x 10\) layer"):
            paretune.adapt(model, "shira", r=5)  # the 10 -> 8 layer: 90 > 80
        with pytest.raises(ConfigError, match="r=32"):
            paretune.adapt(model, "shira")  # PEFT's default r=32 does not fit these tiny layers


@pytest.mark.parametrize("options, match", [
    ({"fraction": 0.0}, r"in \(0, 1\]"), ({"fraction": 1.5}, r"in \(0, 1\]"), ({"fraction": -0.1}, r"in \(0, 1\]"),
    ({"r": 2, "fraction": 0.1}, "not both"), ({"r": 0}, ">= 1"), ({"mask": "struct"}, "rows\\+columns"),
    ({"seed": -1}, ">= 0"),
])
def test_invalid_options(options, match):
    model = _mlp()
    with left_unchanged(model), pytest.raises(ConfigError, match=match):
        paretune.adapt(model, "shira", **options)
