"""BitFit (Ben Zaken et al. 2022): only the biases (Linear biases and LayerNorm β) train.

Checked: default targets on BERT (every Linear with a bias but the head, every LayerNorm), zero
start, counts (the bias sizes) and saved bytes, outputs against the plain model whose biases were
changed by hand (Linear, LayerNorm, GPT-2 Conv1D, Conv2d), merge (biases only, weights untouched)
and unmerge, save/load, gradients, and the bias-free cases: refused by default, a zero bias with
add_missing=True (Llama), an RMSNorm always refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import paretune
from paretune.errors import ConfigError, TargetError

from tiny_transformers import build_bert, hidden as _hidden
from layer_chain import assert_only_these_get_gradients, deltas, left_unchanged, randomise

IDS = torch.randint(2, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def hidden(model, ids=IDS):
    return _hidden(model, ids)


def with_biases_moved(plain: nn.Module, adapted: nn.Module) -> nn.Module:
    """The plain model with each adapted module's bias replaced by b + Δb (the reference)."""
    with torch.no_grad():
        for name, d in deltas(adapted).items():
            m = plain.get_submodule(name)
            if m.bias is None:
                m.bias = nn.Parameter(torch.zeros_like(d.bias))
            m.bias.add_(d.bias)
    return plain


BERT_TARGETS = {
    "bert.embeddings.LayerNorm",
    "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.key",
    "bert.encoder.layer.0.attention.self.value", "bert.encoder.layer.0.attention.output.dense",
    "bert.encoder.layer.0.attention.output.LayerNorm", "bert.encoder.layer.0.intermediate.dense",
    "bert.encoder.layer.0.output.dense", "bert.encoder.layer.0.output.LayerNorm", "bert.pooler.dense",
}


def test_default_targets_zero_start_and_count_on_bert():
    base, model = build_bert(), build_bert()
    paretune.adapt(model, "bitfit")
    assert set(deltas(model)) == BERT_TARGETS  # the classifier (output head) is left out
    assert torch.equal(hidden(model), hidden(base))
    for d in deltas(model).values():
        assert torch.count_nonzero(d.bias) == 0 and torch.count_nonzero(d.delta_weight()) == 0
    want = sum(base.get_submodule(n).bias.numel() for n in BERT_TARGETS)
    cost = paretune.count(model)
    assert cost["trainable"] == cost["formula"] == want == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert cost["stored_bytes"] == 4 * want


def test_outputs_equal_the_model_with_moved_biases():
    model = build_bert()
    paretune.adapt(model, "bitfit")
    randomise(model, seed=4, scale=0.5)
    ref = with_biases_moved(build_bert(), model)
    assert (hidden(ref) - hidden(build_bert())).abs().max() > 1e-2
    torch.testing.assert_close(hidden(model), hidden(ref), atol=1e-5, rtol=0)
    host = model.get_submodule("bert.encoder.layer.0.intermediate.dense")  # stacked path == fused path
    d, x = host.deltas["default"], torch.randn(2, 3, 16)
    with torch.no_grad():
        torch.testing.assert_close(d(x, host.base(x)), d.fused_forward(x), atol=1e-6, rtol=0)


def test_merge_writes_biases_only_and_unmerge_restores():
    base, model = build_bert(), build_bert()
    paretune.adapt(model, "bitfit")
    randomise(model, seed=5, scale=0.5)
    unmerged = hidden(model)
    paretune.merge(model)
    torch.testing.assert_close(hidden(model), unmerged, atol=1e-5, rtol=0)
    for name, d in deltas(model).items():
        m, m0 = model.get_submodule(name).base, base.get_submodule(name)
        assert torch.equal(m.weight, m0.weight)  # ΔW = 0: no weight entry written
        torch.testing.assert_close(m.bias, m0.bias + d.bias, atol=1e-7, rtol=0)
    paretune.unmerge(model)
    for name in deltas(model):
        torch.testing.assert_close(model.get_submodule(name).base.bias, base.get_submodule(name).bias,
                                   atol=1e-7, rtol=0)


def test_save_load_and_gradients(tmp_path):
    model = build_bert()
    paretune.adapt(model, "bitfit")
    randomise(model, seed=6)
    paretune.save(model, tmp_path / "a")
    fresh = build_bert()
    paretune.load(fresh, tmp_path / "a")
    assert torch.equal(hidden(fresh), hidden(model))
    model.train()
    out = model(IDS, output_hidden_states=True)
    (out.logits.square().sum() + out.hidden_states[-1].square().mean()).backward()  # the pooler is on the logits' path
    assert_only_these_get_gradients(model, (".bias",), bank=False)


def test_conv1d_and_conv2d_biases():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)

    def make():
        torch.manual_seed(0)
        return nn.ModuleDict({"proj": Conv1D(6, 4), "conv": nn.Conv2d(3, 5, 3, padding=1)})

    model = make()
    paretune.adapt(model, "bitfit", targets=["proj", "conv"])
    randomise(model, seed=7)
    ref = with_biases_moved(make(), model)
    x, img = torch.randn(2, 3, 4), torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(model["proj"](x), ref["proj"](x), atol=1e-6, rtol=0)
        torch.testing.assert_close(model["conv"](img), ref["conv"](img), atol=1e-6, rtol=0)
        paretune.merge(model)
        torch.testing.assert_close(model["conv"](img), ref["conv"](img), atol=1e-6, rtol=0)


# -- bias-free modules ---------------------------------------------------------------------------

def test_llama_without_add_missing_is_refused_naming_the_modules(make_llama):
    model = make_llama()
    with left_unchanged(model):
        with pytest.raises(TargetError, match=r"no bias term to train; pass add_missing=True"):
            paretune.adapt(model, "bitfit")  # default targets: Llama has no bias at all
    with left_unchanged(model):
        with pytest.raises(TargetError, match=r"no bias term: model\.layers\.0\.self_attn\.q_proj, "
                                              r"model\.layers\.1\.self_attn\.q_proj\. .*add_missing=True"):
            paretune.adapt(model, "bitfit", targets=["q_proj"])


def test_llama_with_add_missing_gets_zero_biases_that_merge(make_llama, llama_batch):
    base, model = make_llama(), make_llama()
    paretune.adapt(model, "bitfit", add_missing=True)
    names = set(deltas(model))
    linears = {n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    assert names == linears
    with torch.no_grad():
        assert torch.equal(model(llama_batch).logits, base(llama_batch).logits)
    assert paretune.count(model)["trainable"] == sum(base.get_submodule(n).out_features for n in linears)
    randomise(model, seed=8, scale=0.3)
    ref = with_biases_moved(make_llama(), model)
    with torch.no_grad():
        unmerged = model(llama_batch).logits
        torch.testing.assert_close(unmerged, ref(llama_batch).logits, atol=1e-5, rtol=0)
        paretune.merge(model)
        assert all(model.get_submodule(n).base.bias is not None for n in names)
        torch.testing.assert_close(model(llama_batch).logits, unmerged, atol=1e-5, rtol=0)
        paretune.unmerge(model)
        assert all(model.get_submodule(n).base.bias is None for n in names)  # the made biases are removed


def test_rmsnorm_is_refused_even_with_add_missing(make_llama):
    model = make_llama()
    with left_unchanged(model):
        with pytest.raises(TargetError, match="RMSNorm"):
            paretune.adapt(model, "bitfit", targets=["input_layernorm"], add_missing=True)


def test_a_linear_without_bias_among_targets_is_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3, bias=False))
    with left_unchanged(model):
        with pytest.raises(TargetError, match=r"no bias term: 1\."):
            paretune.adapt(model, "bitfit", targets=["0", "1"])
    paretune.adapt(model, "bitfit")  # default: the layer with a bias only
    assert set(deltas(model)) == {"0"}


@pytest.mark.parametrize("bad", [{"add_missing": "yes"}, {"add_mising": True}])
def test_bad_options_are_config_errors(bad):
    model = nn.Sequential(nn.Linear(4, 4))
    with left_unchanged(model):
        with pytest.raises(ConfigError):
            paretune.adapt(model, "bitfit", **bad)
