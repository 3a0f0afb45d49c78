"""(IA)³ (Liu et al. 2022): l rescales the output of keys / values and the input of feed-forward layers.

Checked: default targets and feed-forward choice per architecture, zero start (l = 1), counts
(d_in or d_out per layer), outputs against an independent formula and against PEFT's IA3 for the
same random l (tiny Llama, BERT, GPT-2), merge (W·l exactly, unmerge back), save/load, gradients,
and bad input refused with the model left as it was."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import paretune
from paretune.core.geometry import geometry_for
from paretune.errors import ConfigError, ParetuneError, TargetError
from paretune.methods.ia3 import IA3Config, IA3Delta, is_feedforward

from tiny_transformers import build_bert, build_gpt2
from layer_chain import assert_only_these_get_gradients, deltas, left_unchanged, randomise

LLAMA_TARGETS = ["k_proj", "v_proj", "down_proj"]


def run(model, ids):
    """The last hidden states (BERT's random classifier nearly hides a change in its logits)."""
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states[-1]


IDS = torch.randint(2, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def expected_count(model: nn.Module, targets: list[str], ff: list[str]) -> int:
    """Σ d_in over feed-forward targets + Σ d_out over the others, read from the plain model."""
    total = 0
    for name, m in model.named_modules():
        if any(name.endswith("." + t) for t in targets):
            w = m.weight
            d_out, d_in = (m.out_features, m.in_features) if isinstance(m, nn.Linear) else (w.shape[1], w.shape[0])
            total += d_in if any(name.endswith("." + s) for s in ff) else d_out
    return total


# -- defaults, zero start, counts --------------------------------------------------------------

def test_default_targets_and_feedforward_on_llama(make_llama, llama_batch):
    base, model = make_llama(), make_llama()
    paretune.adapt(model, "ia3")
    ds = deltas(model)
    assert sorted({n.split(".")[-1] for n in ds}) == sorted(LLAMA_TARGETS)
    for name, d in ds.items():
        assert d.feedforward == name.endswith("down_proj")
        assert torch.equal(d.l, torch.ones(d.d_in if d.feedforward else d.d_out))
        assert torch.count_nonzero(d.delta_weight()) == 0
    assert torch.equal(model(llama_batch).logits, base(llama_batch).logits)  # l = 1: the base exactly
    cost = paretune.count(model)
    want = expected_count(base, LLAMA_TARGETS, ["down_proj"])
    assert cost["trainable"] == want == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert want == 2 * (16 + 16 + 64)  # per layer: k, v output (16 each) + down_proj input (64)


def test_formula_per_layer_uses_the_module_name(make_llama):
    model = make_llama()
    paretune.adapt(model, "ia3")
    for name, d in deltas(model).items():
        n = IA3Delta.layer_formula(d.geometry, d.config)
        assert n == d.l.numel() == (d.d_in if name.endswith("down_proj") else d.d_out)
    assert IA3Delta.trainable_formula(16, 64, IA3Config()) == 16  # by shape alone: output scaling


def test_count_formula_equals_trainable(make_llama):
    model = make_llama()
    paretune.adapt(model, "ia3")
    cost = paretune.count(model)
    assert cost["formula"] == cost["trainable"]


def test_defaults_for_bert_and_gpt2():
    bert, gpt2 = build_bert(), build_gpt2()
    paretune.adapt(bert, "ia3")
    paretune.adapt(gpt2, "ia3")
    ff_bert = {n for n, d in deltas(bert).items() if d.feedforward}
    assert sorted(deltas(bert)) == ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.attention.self.key",
                                    "bert.encoder.layer.0.attention.self.value", "bert.encoder.layer.0.output.dense"]
    # as PEFT's suffix match of "output.dense": the attention output too
    assert ff_bert == {"bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense"}
    assert {n: d.feedforward for n, d in deltas(gpt2).items()} == {"transformer.h.0.attn.c_attn": False,
                                                                  "transformer.h.0.mlp.c_proj": True}


def test_is_feedforward_rules():
    assert is_feedforward("model.layers.0.mlp.down_proj", None)
    assert not is_feedforward("model.layers.0.self_attn.k_proj", None)
    assert not is_feedforward("transformer.h.0.attn.c_proj", None)  # GPT-2's attention projection
    assert is_feedforward("a.b.k_proj", ["k_proj"]) and not is_feedforward("a.b.xk_proj", ["k_proj"])
    assert is_feedforward("a.b.k_proj", r".*\.k_proj") and not is_feedforward("a.b.k_proj", r"k_proj")
    assert not is_feedforward("model.layers.0.mlp.down_proj", [])


# -- the formula, independently ------------------------------------------------------------------

def test_outputs_follow_the_formula_on_linear_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    ref = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    ref.load_state_dict(model.state_dict())
    paretune.adapt(model, "ia3", targets=["0", "2"], feedforward_modules=["2"])
    randomise(model, seed=4)
    l0, l2 = deltas(model)["0"].l.detach(), deltas(model)["2"].l.detach()
    assert l0.shape == (5,) and l2.shape == (5,)
    x = torch.randn(3, 6)
    with torch.no_grad():
        h = torch.tanh((x @ ref[0].weight.T + ref[0].bias) * l0)  # output scaling: (Wx + b) ⊙ l
        want = (h * l2) @ ref[2].weight.T + ref[2].bias  # input scaling: W (h ⊙ l) + b
        torch.testing.assert_close(model(x), want, atol=1e-6, rtol=0)
        # the stacked path (base_out given) equals the fused one
        host = model[2]
        d = host.deltas["default"]
        torch.testing.assert_close(d(h, host.base(h)), d.fused_forward(h), atol=1e-6, rtol=0)


# -- PEFT ----------------------------------------------------------------------------------------

def _peft_model(make, targets, ff):
    from peft import IA3Config as PeftIA3Config
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out notices for GPT-2
        return get_peft_model(make(), PeftIA3Config(target_modules=targets, feedforward_modules=ff))


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_equals_peft_for_the_same_random_l(arch, make_llama):
    make = {"llama": make_llama, "bert": build_bert, "gpt2": build_gpt2}[arch]
    ours = make()
    paretune.adapt(ours, "ia3")  # default targets and feed-forward modules
    from paretune.methods.ia3 import ARCHITECTURES

    targets, ff = ARCHITECTURES[arch]
    theirs = _peft_model(make, list(targets), list(ff))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, d in deltas(ours).items():
            layer = theirs.base_model.model.get_submodule(name)
            assert d.feedforward == layer.is_feedforward
            peft_l = layer.ia3_l["default"]
            assert peft_l.numel() == d.l.numel()
            v = 1 + 0.5 * torch.randn(d.l.shape, generator=g)
            d.l.copy_(v)
            peft_l.copy_(v.view(peft_l.shape))
    want = run(theirs, IDS)
    assert (want - run(make(), IDS)).abs().max() > 1e-3  # l moved the outputs
    torch.testing.assert_close(run(ours, IDS), want, atol=1e-5, rtol=1e-5)
    paretune.merge(ours)
    torch.testing.assert_close(run(ours, IDS), want, atol=1e-5, rtol=1e-5)
    # merged weights as PEFT merges them
    theirs.merge_adapter()
    for name in deltas(ours):
        w_ours = ours.get_submodule(name).base.weight
        w_peft = theirs.base_model.model.get_submodule(name).base_layer.weight
        torch.testing.assert_close(w_ours, w_peft, atol=1e-6, rtol=0)


# -- merge, save / load, gradients ---------------------------------------------------------------

def test_merge_scales_rows_and_columns_and_unmerge_restores(make_llama, llama_batch):
    base, model = make_llama(), make_llama()
    paretune.adapt(model, "ia3")
    randomise(model, seed=2, scale=0.3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)  # l around 1
    unmerged = run(model, llama_batch)
    paretune.merge(model)
    torch.testing.assert_close(run(model, llama_batch), unmerged, atol=1e-5, rtol=1e-5)
    for name, d in deltas(model).items():
        w0 = base.get_submodule(name).weight
        want = w0 * d.l.view(1, -1) if d.feedforward else w0 * d.l.view(-1, 1)
        torch.testing.assert_close(model.get_submodule(name).base.weight, want.detach(), atol=1e-6, rtol=0)
    paretune.unmerge(model)
    torch.testing.assert_close(run(model, llama_batch), unmerged, atol=1e-5, rtol=1e-5)
    for name in deltas(model):
        torch.testing.assert_close(model.get_submodule(name).base.weight, base.get_submodule(name).weight,
                                   atol=1e-6, rtol=0)


def test_output_scaling_merges_the_bias_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    b0 = model[0].bias.detach().clone()
    paretune.adapt(model, "ia3", targets=["0"], feedforward_modules=[])
    with torch.no_grad():
        deltas(model)["0"].l.copy_(torch.tensor([2.0, 0.5, -1.0]))
    x = torch.randn(2, 4)
    with torch.no_grad():
        ref = model(x)
        paretune.merge(model)
        torch.testing.assert_close(model[0].base.bias, b0 * torch.tensor([2.0, 0.5, -1.0]))
        torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=0)
        paretune.unmerge(model)
        torch.testing.assert_close(model[0].base.bias, b0, atol=1e-7, rtol=0)


def test_unmerge_refused_when_l_has_a_zero():
    model = nn.Sequential(nn.Linear(4, 3))
    paretune.adapt(model, "ia3", targets=["0"], feedforward_modules=[])
    with torch.no_grad():
        deltas(model)["0"].l[1] = 0.0
    paretune.merge(model)
    with pytest.raises(ParetuneError, match="cannot be unmerged"):
        paretune.unmerge(model)


def test_save_load_and_gradients(make_llama, llama_batch, tmp_path):
    model = make_llama()
    paretune.adapt(model, "ia3")
    randomise(model, seed=6, scale=0.5)
    paretune.save(model, tmp_path / "a")
    fresh = make_llama()
    paretune.load(fresh, tmp_path / "a")
    assert torch.equal(run(fresh, llama_batch), run(model, llama_batch))
    assert all(torch.equal(deltas(fresh)[n].l, d.l) for n, d in deltas(model).items())
    model.train()
    model(llama_batch).logits.square().mean().backward()
    assert_only_these_get_gradients(model, (".l",), bank=False)


def test_gpt2_conv1d_input_and_output_scaling_against_the_formula():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(6, 4), Conv1D(3, 6))  # weights (in, out)
    ref = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in model]
    paretune.adapt(model, "ia3", targets=["0", "1"], feedforward_modules=["1"])
    randomise(model, seed=8)
    l0, l1 = deltas(model)["0"].l.detach(), deltas(model)["1"].l.detach()
    assert l0.shape == (6,) and l1.shape == (6,)
    x = torch.randn(2, 4)
    with torch.no_grad():
        h = (x @ ref[0][0] + ref[0][1]) * l0
        torch.testing.assert_close(model(x), (h * l1) @ ref[1][0] + ref[1][1], atol=1e-6, rtol=0)
    assert geometry_for(model[1].base).kind == "conv1d"


# -- bad input -----------------------------------------------------------------------------------

def test_unknown_feedforward_module_is_refused(make_llama):
    model = make_llama()
    with left_unchanged(model):
        with pytest.raises(TargetError, match="mlp_out"):
            paretune.adapt(model, "ia3", feedforward_modules=["down_proj", "mlp_out"])
    with left_unchanged(model):
        with pytest.raises(TargetError, match="q_proj"):  # not among the targets
            paretune.adapt(model, "ia3", targets=["k_proj", "v_proj"], feedforward_modules=["q_proj"])
    with left_unchanged(model):
        with pytest.raises(TargetError, match="matches none"):
            paretune.adapt(model, "ia3", feedforward_modules=r".*\.up_proj")


@pytest.mark.parametrize("bad", [{"feedforward_modules": 3}, {"feedforward_modules": ["down_proj", ""]},
                                 {"feedforward_modules": "("}, {"feedforward_module": ["down_proj"]}])
def test_bad_options_are_config_errors(bad, make_llama):
    model = make_llama()
    with left_unchanged(model):
        with pytest.raises(ConfigError):
            paretune.adapt(model, "ia3", **bad)


def test_unknown_architecture_needs_targets():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with left_unchanged(model):
        with pytest.raises(TargetError, match="targets="):
            paretune.adapt(model, "ia3")
    paretune.adapt(model, "ia3", targets=["0", "1"])  # explicit targets: output scaling (no default name)
    assert not any(d.feedforward for d in deltas(model).values())


def test_embedding_is_not_a_kind(make_llama):
    model = make_llama()
    with left_unchanged(model):
        with pytest.raises(TargetError):
            paretune.adapt(model, "ia3", targets=["embed_tokens"])


def test_tuple_option_is_stored_as_a_list():
    assert IA3Config(feedforward_modules=("a", "b")).feedforward_modules == ["a", "b"]
