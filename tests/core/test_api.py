"""The public operations of paretune/api.py: several named adapters, the active set, merge /
unmerge / unload / remove, per-sample adapters in one batch, and count()."""

import pytest
import torch

import paretune
from paretune.core.host import Host
from paretune.errors import ParetuneError


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _two(make_llama, perturb):
    """A tiny Llama with LoRA "a" on q/v and PiSSA "b" on up_proj, both with non-zero deltas."""
    model = make_llama()
    paretune.adapt(model, "lora", name="a", targets=["q_proj", "v_proj"], r=2, alpha=4)
    perturb(model, seed=11)
    paretune.adapt(model, "pissa", name="b", targets=["up_proj"], r=3)
    perturb(model, seed=12)
    return model


@pytest.fixture
def two(make_llama, perturb):
    return lambda: _two(make_llama, perturb)


def test_plain_model_has_no_adapters(make_llama):
    model = make_llama()
    assert paretune.adapters(model) == {}
    assert paretune.active(model) == []


def test_adapters_and_active_set(two, make_llama, ids):
    model = two()
    assert list(paretune.adapters(model)) == ["a", "b"]
    assert paretune.adapters(model)["a"].method == "lora"
    assert paretune.adapters(model)["b"].targets == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    assert paretune.active(model) == ["a", "b"]
    both = _logits(model, ids)
    paretune.set_active(model, "a")
    only_a = _logits(model, ids)
    paretune.set_active(model, [])
    # PiSSA moved its principal part out of W, so the bare base is the residual model (not the
    # original): with nothing active the model differs from both.
    bare = _logits(model, ids)
    assert paretune.active(model) == []
    assert not torch.allclose(both, only_a, atol=1e-4)
    assert not torch.allclose(only_a, bare, atol=1e-4)
    paretune.set_active(model, ["a", "b"])
    torch.testing.assert_close(_logits(model, ids), both)
    with pytest.raises(ParetuneError, match="no adapter named 'zz'"):
        paretune.set_active(model, ["a", "zz"])


def test_duplicate_and_bad_names(two):
    model = two()
    with pytest.raises(ParetuneError, match="already has an adapter named 'a'"):
        paretune.adapt(model, "lora", name="a", targets=["k_proj"])
    for bad in ("", "x.y", 3):
        with pytest.raises(ParetuneError, match="invalid"):
            paretune.adapt(model, "lora", name=bad, targets=["k_proj"])


def test_adapt_freezes_everything_but_the_new_adapter(two):
    model = two()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".deltas.b." in n for n in trainable)
    assert paretune.count(model, "b")["trainable"] == sum(
        p.numel() for p in model.parameters() if p.requires_grad)


def test_merge_equals_unmerged_and_unmerge_restores(two, ids):
    model = two()
    before = _logits(model, ids)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name in ("a", "b"):
        paretune.merge(model, name)
        torch.testing.assert_close(_logits(model, ids), before, atol=1e-5, rtol=1e-4)
    with pytest.raises(ParetuneError, match="already merged"):
        paretune.merge(model, "a")
    with pytest.raises(ParetuneError, match="cannot be switched off"):
        paretune.set_active(model, ["b"])
    for name in ("b", "a"):
        paretune.unmerge(model, name)
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-5, rtol=1e-4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=1e-5)
    with pytest.raises(ParetuneError, match="not merged"):
        paretune.unmerge(model, "a")


def test_merge_needs_the_adapter_active(two):
    model = two()
    paretune.set_active(model, ["b"])
    with pytest.raises(ParetuneError, match="not active"):
        paretune.merge(model, "a")


def test_unload_after_merge_gives_a_plain_model_with_equal_outputs(two, make_llama, ids):
    model = two()
    want = _logits(model, ids)
    paretune.merge(model, "a")
    paretune.merge(model, "b")
    plain = paretune.unload(model)
    assert not any(isinstance(m, Host) for m in plain.modules())
    reference = make_llama()
    assert [type(m) for m in plain.modules()] == [type(m) for m in reference.modules()]
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in reference.named_parameters()]
    assert paretune.adapters(plain) == {}
    torch.testing.assert_close(_logits(plain, ids), want, atol=1e-5, rtol=1e-4)


def test_unload_without_merge_gives_back_the_base(two, make_llama, ids):
    model = two()
    plain = paretune.unload(model)
    # PiSSA's residual is restored to the original W.
    torch.testing.assert_close(_logits(plain, ids), _logits(make_llama(), ids), atol=1e-5, rtol=1e-4)
    for (n, p), (_, q) in zip(plain.named_parameters(), make_llama().named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=n)


def test_remove_one_adapter_keeps_the_other(two, make_llama, perturb, ids):
    model = two()
    paretune.remove(model, "a")
    assert list(paretune.adapters(model)) == ["b"] and paretune.active(model) == ["b"]
    # Only the PiSSA adapter is left: equal to a fresh model with the same PiSSA adapter.
    other = make_llama()
    paretune.adapt(other, "pissa", name="b", targets=["up_proj"], r=3)
    perturb(other, seed=12)
    torch.testing.assert_close(_logits(model, ids), _logits(other, ids), atol=1e-5, rtol=1e-4)
    assert not any(isinstance(m, Host) for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj")))
    paretune.remove(model, "b")
    assert paretune.adapters(model) == {}
    torch.testing.assert_close(_logits(model, ids), _logits(make_llama(), ids), atol=1e-5, rtol=1e-4)


def test_remove_a_merged_adapter_takes_it_out_of_the_weights(two, make_llama, ids):
    model = two()
    paretune.merge(model, "a")
    paretune.remove(model, "a")
    paretune.remove(model, "b")
    torch.testing.assert_close(_logits(model, ids), _logits(make_llama(), ids), atol=1e-5, rtol=1e-4)


def _separate(model, names, ids):
    rows = []
    for i, n in enumerate(names):
        paretune.set_active(model, [] if n is None else [n])
        rows.append(_logits(model, ids[i:i + 1]))
    return torch.cat(rows)


@pytest.mark.parametrize("names", [["a", "b", None], ["b", None, "a"], ["a", "a", "a"], [None, None, "b"]])
def test_per_sample_equals_each_adapter_on_its_rows(two, ids, names):
    model = two()
    with paretune.per_sample(model, names):
        mixed = _logits(model, ids)
    assert paretune.active(model) == ["a", "b"]  # the active set is untouched
    torch.testing.assert_close(mixed, _separate(model, names, ids), atol=1e-5, rtol=1e-4)


def test_per_sample_on_gpt2_conv1d(make_gpt2, perturb, ids):
    model = make_gpt2()
    paretune.adapt(model, "lora", name="x", r=2)
    perturb(model, seed=3)
    paretune.adapt(model, "lora", name="y", r=4, targets=["c_attn"])
    perturb(model, seed=4)
    names = ["y", None, "x"]
    with paretune.per_sample(model, names):
        mixed = _logits(model, ids)
    torch.testing.assert_close(mixed, _separate(model, names, ids), atol=1e-5, rtol=1e-4)


def test_per_sample_bad_input(two, ids):
    model = two()
    with pytest.raises(ParetuneError, match="empty"):
        with paretune.per_sample(model, []):
            pass
    with pytest.raises(ParetuneError, match="no adapter named 'zz'"):
        with paretune.per_sample(model, ["a", "zz", None]):
            pass
    with pytest.raises(ParetuneError, match="3 rows|rows"):
        with paretune.per_sample(model, ["a", "b"]):
            _logits(model, ids)
    paretune.merge(model, "a")
    with pytest.raises(ParetuneError, match="unmerge"):
        with paretune.per_sample(model, ["a", "b", None]):
            pass


def test_count_matches_parameters_and_formula(two):
    model = two()
    hidden, inter = 16, 32
    kv = 8  # v_proj maps 16 -> 8 (one key/value head of size 8); q_proj 16 -> 16
    lora = 2 * (2 * (hidden + hidden) + 2 * (hidden + kv))  # two layers, r=2
    pissa = 2 * 3 * (hidden + inter)  # two layers, r=3
    a, b, total = paretune.count(model, "a"), paretune.count(model, "b"), paretune.count(model)
    assert a["trainable"] == a["formula"] == lora
    assert b["trainable"] == b["formula"] == pissa
    assert total["trainable"] == lora + pissa
    assert a["stored_bytes"] == 4 * lora and b["stored_bytes"] == 4 * pissa
    base = sum(p.numel() for n, p in model.named_parameters() if ".deltas." not in n)
    assert a["base"] == b["base"] == total["base"] == base
    assert set(a) == {"trainable", "stored_bytes", "base", "base_bytes", "formula"}
    assert a["base_bytes"] == 4 * base  # float32


def test_count_on_a_plain_model_is_a_clear_error(make_llama):
    with pytest.raises(ParetuneError, match="adapter"):
        paretune.count(make_llama(), "a")


def test_outputs_start_equal_to_the_base(make_llama, ids):
    model = make_llama()
    want = _logits(model, ids)
    paretune.adapt(model, "lora", r=4, targets="all-linear")
    paretune.adapt(model, "pissa", name="p", r=2, targets=r".*\.o_proj")
    torch.testing.assert_close(_logits(model, ids), want, atol=1e-5, rtol=1e-4)
    assert not isinstance(model.lm_head, Host)  # all-linear leaves the output head alone
    assert list(model.model.layers[0].self_attn.o_proj.deltas) == ["default", "p"]


def test_an_adapter_takes_the_mode_of_the_model_it_joins(make_llama, perturb, ids):
    """adapt() on a model in eval mode gives eval-mode deltas: no dropout until model.train()."""
    model = make_llama()
    model.eval()
    paretune.adapt(model, "lora", r=2, dropout=0.5)
    perturb(model)
    deltas = [h.deltas["default"] for h in model.modules() if isinstance(h, Host)]
    assert deltas and not any(d.training for d in deltas)
    torch.testing.assert_close(_logits(model, ids), _logits(model, ids), atol=0, rtol=0)
    model.train()
    assert all(d.training for d in deltas)
    torch.manual_seed(0)
    first = _logits(model, ids)
    assert not torch.allclose(first, _logits(model, ids))  # dropout draws anew


def test_a_failed_adapt_leaves_the_model_as_it_was():
    from torch import nn

    from paretune.errors import ConfigError

    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    model[1].weight.requires_grad_(False)  # the user's own choice of what trains
    flags = [p.requires_grad for p in model.parameters()]
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match="exceeds"):
        paretune.adapt(model, "pissa", r=6)  # fits the first layer, not the second
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert not any(isinstance(m, Host) for m in model.modules()) and paretune.adapters(model) == {}


# -- rank above a layer's smaller side; alpha=0 ---------------------------------------------------

def test_rank_above_a_layers_smaller_side_is_refused_with_the_reason(make_llama):
    model = make_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    side = model.model.layers[0].self_attn.k_proj.weight.shape
    too_big = min(side) + 1
    with pytest.raises(paretune.ConfigError, match=rf"r={too_big} exceeds min\(d_out, d_in\) of every targeted "
                       rf"layer \(at most {min(side)}; e.g. .*k_proj"):
        paretune.adapt(model, "lora", r=too_big, targets=["k_proj"])
    assert not any(isinstance(m, Host) for m in model.modules()), "a refused adapt left hosts behind"
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    paretune.adapt(model, "lora", r=min(side), targets=["k_proj"])  # exactly the smaller side is fine


def test_rank_above_only_some_layers_smaller_side_is_a_warning(make_llama):
    """One r serves every layer: narrower layers (grouped-query k/v projections) only waste some
    parameters, so that is a warning naming them, not a refusal."""
    model = make_llama()
    k = model.model.layers[0].self_attn.k_proj.weight.shape
    q = model.model.layers[0].self_attn.q_proj.weight.shape
    assert min(k) < min(q), "the fixture's k_proj must be narrower than its q_proj"
    with pytest.warns(UserWarning, match=r"k_proj"):
        paretune.adapt(model, "lora", r=min(q), targets=["q_proj", "k_proj"])
    assert "default" in paretune.adapters(model)


def test_alpha_zero_warns_that_the_adapter_does_nothing(make_llama):
    model = make_llama()
    with pytest.warns(UserWarning, match="alpha=0"):
        paretune.adapt(model, "lora", r=2, alpha=0, targets=["q_proj"])


def test_adapt_shows_progress_over_layers_when_slow(make_llama, monkeypatch, capsys):
    import paretune.api as api

    real = api.bar
    monkeypatch.setattr(api, "bar", lambda *a, **k: real(*a, **{**k, "delay": 0.0}))  # as if building were slow
    monkeypatch.delenv("PARETUNE_PROGRESS", raising=False)
    model = make_llama()
    paretune.adapt(model, "lora", r=2, targets=["q_proj", "v_proj"])
    n = len(paretune.adapters(model)["default"].targets)
    assert f"adapt lora: {n}/{n} (100%)" in capsys.readouterr().err
