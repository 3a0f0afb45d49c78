"""LayerNorm tuning (Qi et al. 2022): Δγ and Δβ of the normalisation layers train.

Checked: default targets (every norm; PEFT's list on Llama), zero start, counts (2·d for a LayerNorm,
d for an RMSNorm), equality with PEFT's LN tuning whose trained copy holds γ + Δγ, β + Δβ (tiny
Llama and BERT), merge (γ, β changed exactly) and unmerge, save/load, gradients, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import paretune
from paretune.errors import ConfigError, TargetError
from paretune.methods.ln_tuning import LNTuningConfig, LNTuningDelta

from tiny_transformers import build_bert, hidden as _hidden
from layer_chain import assert_only_these_get_gradients, deltas, left_unchanged, randomise

IDS = torch.randint(2, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def hidden(model, ids=IDS):
    return _hidden(model, ids)


LLAMA_NORMS = {"model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
               "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm", "model.norm"}
BERT_NORMS = {"bert.embeddings.LayerNorm", "bert.encoder.layer.0.attention.output.LayerNorm",
              "bert.encoder.layer.0.output.LayerNorm"}


def test_default_targets_zero_start_and_counts(make_llama):
    llama, bert = make_llama(), build_bert()
    paretune.adapt(llama, "ln-tuning")
    paretune.adapt(bert, "ln-tuning")
    assert set(deltas(llama)) == LLAMA_NORMS  # PEFT's llama entry: input_layernorm, post_attention_layernorm, norm
    assert set(deltas(bert)) == BERT_NORMS
    assert torch.equal(hidden(llama), hidden(make_llama()))
    assert torch.equal(hidden(bert), hidden(build_bert()))
    for d in [*deltas(llama).values(), *deltas(bert).values()]:
        assert torch.count_nonzero(d.delta_weight()) == 0 and d.delta_weight().shape == (d.d_out, 1)
    assert all(d.shift is None for d in deltas(llama).values())  # RMSNorm: no β
    assert all(d.shift is not None and not d.shift.any() for d in deltas(bert).values())
    assert paretune.count(llama)["trainable"] == 5 * 32
    assert paretune.count(bert)["trainable"] == paretune.count(bert)["formula"] == 3 * 2 * 16
    for model in (llama, bert):
        for d in deltas(model).values():
            n = sum(p.numel() for p in d.parameters())
            assert LNTuningDelta.layer_formula(d.geometry, d.config) == n


def test_count_formula_on_rmsnorms(make_llama):
    model = make_llama()
    paretune.adapt(model, "ln-tuning")
    cost = paretune.count(model)
    assert cost["formula"] == cost["trainable"]


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_equals_peft_ln_tuning_with_the_same_trained_norms(arch, make_llama):
    from peft import LNTuningConfig as PeftLNTuningConfig
    from peft import get_peft_model

    make = {"llama": make_llama, "bert": build_bert}[arch]
    ours = make()
    paretune.adapt(ours, "ln-tuning")
    randomise(ours, seed=3, scale=0.3)
    theirs = get_peft_model(make(), PeftLNTuningConfig(target_modules=sorted(deltas(ours))))
    with torch.no_grad():
        for name, d in deltas(ours).items():
            copy = theirs.base_model.model.get_submodule(name).ln_tuning_layers["default"]
            copy.weight.add_(d.gain.view(-1))  # PEFT trains a copy of the norm: γ' = γ + Δγ, β' = β + Δβ
            if d.shift is not None:
                copy.bias.add_(d.shift)
            else:
                assert getattr(copy, "bias", None) is None
    want = hidden(theirs)
    assert (want - hidden(make())).abs().max() > 1e-2
    torch.testing.assert_close(hidden(ours), want, atol=1e-5, rtol=1e-5)
    paretune.merge(ours)
    torch.testing.assert_close(hidden(ours), want, atol=1e-5, rtol=1e-5)


def test_merge_changes_gamma_and_beta_exactly_and_unmerge_restores():
    base, model = build_bert(), build_bert()
    paretune.adapt(model, "ln-tuning")
    randomise(model, seed=4, scale=0.3)
    unmerged = hidden(model)
    paretune.merge(model)
    torch.testing.assert_close(hidden(model), unmerged, atol=1e-5, rtol=0)
    for name, d in deltas(model).items():
        m, m0 = model.get_submodule(name).base, base.get_submodule(name)
        torch.testing.assert_close(m.weight, m0.weight + d.gain.view(-1), atol=1e-7, rtol=0)
        torch.testing.assert_close(m.bias, m0.bias + d.shift, atol=1e-7, rtol=0)
    paretune.unmerge(model)
    torch.testing.assert_close(hidden(model), unmerged, atol=1e-5, rtol=0)
    for name in deltas(model):
        torch.testing.assert_close(model.get_submodule(name).base.weight, base.get_submodule(name).weight,
                                   atol=1e-7, rtol=0)


def test_forward_is_gamma_plus_delta_on_a_layernorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(6))
    with torch.no_grad():
        model[0].weight.normal_()
        model[0].bias.normal_()
    g0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    paretune.adapt(model, "ln-tuning")
    randomise(model, seed=2)
    d = deltas(model)["0"]
    x = torch.randn(3, 6) * 4 + 1
    xhat = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    with torch.no_grad():
        want = xhat * (g0 + d.gain.view(-1)) + b0 + d.shift
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=0)


def test_save_load_and_gradients(make_llama, llama_batch, tmp_path):
    model = make_llama()
    paretune.adapt(model, "ln-tuning")
    randomise(model, seed=5, scale=0.3)
    paretune.save(model, tmp_path / "a")
    fresh = make_llama()
    paretune.load(fresh, tmp_path / "a")
    assert torch.equal(hidden(fresh, llama_batch), hidden(model, llama_batch))
    assert paretune.count(fresh)["stored_bytes"] == 4 * 5 * 32  # Δγ only on RMSNorms
    model.train()
    model(llama_batch).logits.square().mean().backward()
    assert_only_these_get_gradients(model, (".gain",), bank=False)


def test_model_without_norms_is_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    with left_unchanged(model):
        with pytest.raises(TargetError, match="no normalisation layer"):
            paretune.adapt(model, "ln-tuning")


def test_a_linear_target_is_refused(make_llama):
    model = make_llama()
    with left_unchanged(model):
        with pytest.raises(TargetError, match="norm"):
            paretune.adapt(model, "ln-tuning", targets=["q_proj"])


def test_unknown_option_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown option"):
        LNTuningConfig.from_dict({"r": 4})
