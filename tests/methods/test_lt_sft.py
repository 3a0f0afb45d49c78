"""LT-SFT (Ansell et al., ACL 2022): dense phase 1, then only the K entries that changed most train
from the original weights. Checked against independent computations: the mask is the top-K of
phase 1's |ΔW| (numpy argsort), nothing outside it differs from W₀ after phase 2 (also under the
real trainer with AdamW weight decay), composition adds ΔWs, storage is K·(4+4) bytes per layer."""

from __future__ import annotations

import string

import numpy as np
import pytest
import torch
from torch import nn

import paretune
from paretune.errors import ConfigError, ParetuneError
from paretune.methods.lt_sft import LtSftDelta, switch_step

from layer_chain import CHAIN_SHAPES, TARGETS, chain, deltas, left_unchanged
from sparse_checks import assert_merge_touches_only_the_support


def _capture_switches(monkeypatch) -> list[dict[int, np.ndarray]]:
    """Record every layer's ΔW just before a switch (before the mask is chosen)."""
    seen: list[dict[int, np.ndarray]] = []
    original = LtSftDelta.switch

    def spy(self):
        members = self.bank.members if self.bank is not None else [self]
        seen.append({id(m): m.delta.detach().double().numpy().copy() for m in members})
        original(self)

    monkeypatch.setattr(LtSftDelta, "switch", spy)
    return seen


def simulate(model: nn.Module, name: str, steps: int, seed: int = 0, weight_decay: float = 0.1) -> None:
    """Train adapter ``name`` as paretune.train would: AdamW (with weight decay) steps on a random
    regression, then on_step(step, steps) of each of its deltas."""
    ds = list(deltas(model, name).values())
    params = [d.delta for d in ds]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 7, generator=g)
    for step in range(steps):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for d in ds:
            d.on_step(step + 1, steps)


def test_switch_step():
    assert switch_step(150, 0.5) == 75
    assert switch_step(10, 0.3) == 3
    assert switch_step(2, 0.5) == 1 and switch_step(2, 0.99) == 1  # phase 2 gets at least one step
    assert switch_step(1, 0.5) == 1
    assert switch_step(100, 0.001) == 1


def test_layer_mask_is_the_top_k_of_phase_one_and_the_rest_stays_at_w0(monkeypatch):
    seen = _capture_switches(monkeypatch)
    base, model = chain(), chain()
    k = 5
    paretune.adapt(model, "lt-sft", count=k, selection="layer")
    simulate(model, "default", steps=10)
    assert len(seen) == len(TARGETS)  # one switch per layer
    before = {}
    for s in seen:
        before.update(s)
    for t in TARGETS:
        d = deltas(model)[t]
        dw1 = before[id(d)]
        # independent top-K: numpy argsort of |ΔW| after phase 1
        expected = set(np.argsort(-np.abs(dw1).ravel(), kind="stable")[:k].tolist())
        assert set(d.indices.tolist()) == expected and d.indices.dtype == torch.int32
        assert int(d.mask.sum()) == k
        full = d.delta.detach()
        assert torch.count_nonzero(full[~d.mask]) == 0  # held exactly at zero despite weight decay / momentum
        assert torch.count_nonzero(full[d.mask]) > 0  # phase 2 trained the masked entries
        # phase 2 restarted from W₀: the masked values are not phase 1's
        assert not np.allclose(full.double().numpy().ravel()[sorted(expected)], dw1.ravel()[sorted(expected)])
    # merged: every weight entry outside the masks is the original one, to the bit
    paretune.merge(model)
    for t in TARGETS:
        d = deltas(model)[t]
        w, w0 = model.get_submodule(t).base.weight, base.get_submodule(t).weight
        assert torch.equal(w[~d.mask], w0[~d.mask])
        assert not torch.equal(w, w0)
    assert paretune.count(model)["stored_bytes"] == len(TARGETS) * k * (4 + 4)


def test_global_selection_is_one_ranking_over_all_layers(monkeypatch):
    seen = _capture_switches(monkeypatch)
    model = chain()
    count = 4
    paretune.adapt(model, "lt-sft", count=count)  # selection="global" by default (the reference)
    ds = [deltas(model)[t] for t in TARGETS]
    simulate(model, "default", steps=6)
    assert len(seen) == 1  # the first layer reaching the switch chose for all
    flat = np.concatenate([np.abs(seen[0][id(d)]).ravel() for d in ds])
    k_total = count * len(TARGETS)
    top = np.argsort(-flat, kind="stable")[:k_total]
    offsets = np.cumsum([0] + [d.d_out * d.d_in for d in ds])
    for i, d in enumerate(ds):
        mine = {int(p - offsets[i]) for p in top if offsets[i] <= p < offsets[i + 1]}
        assert set(d.indices.tolist()) == mine
        assert torch.count_nonzero(d.delta.detach()[~d.mask]) == 0
    assert sum(int(d.mask.sum()) for d in ds) == k_total
    assert len({int(d.mask.sum()) for d in ds}) > 1  # the layers did not get equal shares
    assert paretune.count(model)["stored_bytes"] == k_total * (4 + 4)


def test_two_sparse_adapters_compose_by_adding_their_deltas():
    base, model = chain(), chain()
    paretune.adapt(model, "lt-sft", name="lang", count=6, selection="layer")
    simulate(model, "lang", steps=6, seed=1)
    paretune.adapt(model, "lt-sft", name="task", count=6, selection="layer")
    simulate(model, "task", steps=6, seed=2)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(9))
    # by hand: every Linear with W₀ + ΔW_lang + ΔW_task
    h = x
    with torch.no_grad():
        for t in TARGETS:
            lin = base.get_submodule(t)
            dw = deltas(model, "lang")[t].delta_weight() + deltas(model, "task")[t].delta_weight()
            h = h @ (lin.weight + dw).T + lin.bias
        torch.testing.assert_close(model(x), h, atol=1e-5, rtol=1e-5)
        paretune.merge(model, "lang")
        paretune.merge(model, "task")
        for t in TARGETS:
            dw = deltas(model, "lang")[t].delta_weight() + deltas(model, "task")[t].delta_weight()
            torch.testing.assert_close(model.get_submodule(t).base.weight, base.get_submodule(t).weight + dw)
        torch.testing.assert_close(model(x), h, atol=1e-5, rtol=1e-5)


def test_save_load_keeps_outputs_and_stores_k_values_and_int32_indices(tmp_path):
    model = chain()
    k = 7
    paretune.adapt(model, "lt-sft", count=k, selection="layer")
    simulate(model, "default", steps=6)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(x)
    for d in deltas(model).values():
        st = d.stored_state()
        assert set(st) == {"indices", "values"} and st["indices"].dtype == torch.int32 and st["values"].numel() == k
    assert paretune.count(model)["stored_bytes"] == len(TARGETS) * k * (4 + 4)
    paretune.save(model, tmp_path / "a")
    fresh = chain()
    paretune.load(fresh, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref, atol=0, rtol=0)
    for t in TARGETS:
        saved, got = deltas(model)[t], deltas(fresh)[t]
        assert got.sparse and torch.equal(saved.indices, got.indices)
        assert torch.equal(saved.delta_weight(), got.delta_weight())
    assert paretune.count(fresh)["stored_bytes"] == len(TARGETS) * k * (4 + 4)
    assert_merge_touches_only_the_support(fresh, x)


def test_real_trainer_runs_both_phases(monkeypatch):
    """paretune.train (AdamW, weight decay 0.1): the switch happens inside the run, and afterwards
    only K entries per layer differ from the base weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    chars = sorted(set(string.ascii_lowercase + " "))
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     max_position_embeddings=32)
    model = BertForSequenceClassification(cfg)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    words = ["red", "green", "blue", "cyan", "pink", "gold"]
    data = [{"text": f"{a} {b}", "label": str((i + j) % 3)} for i, a in enumerate(words) for j, b in enumerate(words)]
    seen = _capture_switches(monkeypatch)
    k = 9
    res = paretune.train(model, data, tokenizer=tokenizer, method="lt-sft",
                         options={"count": k, "selection": "layer"}, steps=8, lr=1e-2, batch_size=8,
                         weight_decay=0.1, warmup=0.0, max_length=16, progress=False)
    hosts = {n: m for n, m in res.model.named_modules() if hasattr(m, "deltas") and "default" in m.deltas}
    assert hosts and len(seen) == len(hosts)
    before = {}
    for s in seen:
        before.update(s)
    paretune.merge(res.model)
    for name, host in hosts.items():
        d = host.deltas["default"]
        expected = set(np.argsort(-np.abs(before[id(d)]).ravel(), kind="stable")[:k].tolist())
        assert set(d.indices.tolist()) == expected
        w0 = original[f"{name}.weight"]
        w = host.base.weight.detach()
        differ = (w != w0)
        assert bool(differ.any()) and int(differ.sum()) <= k
        assert not bool(differ[~d.mask].any())  # nothing outside the mask moved


def test_count_is_dense_during_training_and_formula_matches():
    model = chain()
    paretune.adapt(model, "lt-sft", count=3)
    cost = paretune.count(model)
    assert cost["trainable"] == cost["formula"] == sum(a * b for a, b in CHAIN_SHAPES)


def test_resume_after_the_switch_is_refused():
    model = chain()
    paretune.adapt(model, "lt-sft", count=3, selection="layer")
    d = deltas(model)["0"]
    with pytest.raises(ParetuneError, match="resum"):
        d.on_step(6, 10)


@pytest.mark.parametrize("bad", [
    {"fraction": 0.0}, {"fraction": 1.5}, {"fraction": -0.1}, {"fraction": True}, {"count": 0},
    {"count": 2, "fraction": 0.1}, {"phase1_fraction": 0.0}, {"phase1_fraction": 1.0},
    {"selection": "row"},
])
def test_bad_options_are_config_errors(bad):
    model = chain()
    x = torch.randn(2, 8)
    with left_unchanged(model, x), pytest.raises(ConfigError):
        paretune.adapt(model, "lt-sft", **bad)


@pytest.mark.parametrize("selection", ["layer", "global"])
def test_count_above_the_layer_size_is_a_config_error_leaving_the_model_unchanged(selection):
    model = chain()
    x = torch.randn(2, 8)
    too_many = {"layer": 8 * 16 + 1, "global": 30 * 12 + 1}[selection]  # global: above the mean layer size
    with left_unchanged(model, x), pytest.raises(ConfigError, match="lt-sft"):
        paretune.adapt(model, "lt-sft", count=too_many, selection=selection)
