"""Target selection and option validation: names, suffixes, regex, "all-linear"; clear errors."""

import pytest
import torch
from torch import nn

import paretune
from paretune.core.host import Host
from paretune.core.inject import hosts
from paretune.errors import ConfigError, ParetuneError, TargetError


def _adapted(model):
    return sorted(n for n, _ in hosts(model))


def test_all_linear_on_llama_skips_the_output_head(make_llama):
    model = paretune.adapt(make_llama(), "lora", r=2)
    names = _adapted(model)
    assert "lm_head" not in names and not any("embed" in n for n in names)
    per_layer = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {n.split(".")[-1] for n in names} == per_layer and len(names) == 2 * len(per_layer)
    assert paretune.adapters(model)["default"].targets == names or sorted(paretune.adapters(model)["default"].targets) == names


def test_all_linear_on_gpt2_takes_conv1d_and_skips_the_tied_head(make_gpt2):
    model = paretune.adapt(make_gpt2(), "lora", targets="all-linear", r=2)
    names = _adapted(model)
    assert {n.split(".")[-1] for n in names} == {"c_attn", "c_proj", "c_fc"}
    assert len(names) == 2 * 4 and "lm_head" not in names


def test_all_linear_on_a_classifier_skips_the_classifier(make_bert):
    names = _adapted(paretune.adapt(make_bert(), "lora", r=2))
    assert "classifier" not in names and "bert.encoder.layer.0.attention.self.query" in names


def test_suffixes_and_exact_names(make_llama):
    model = paretune.adapt(make_llama(), "lora", targets=["q_proj", "model.layers.1.mlp.down_proj"], r=2)
    assert _adapted(model) == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                               "model.layers.1.self_attn.q_proj"]


def test_regex_matches_whole_names(make_llama):
    model = paretune.adapt(make_llama(), "lora", targets=r"model\.layers\.0\.self_attn\.(q|v)_proj", r=2)
    assert _adapted(model) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    with pytest.raises(TargetError, match="matched no module"):  # "q_proj" alone is not a whole name
        paretune.adapt(make_llama(), "lora", targets=r"q_proj", r=2)


def test_target_matching_nothing_lists_candidates(make_llama):
    model = make_llama()
    with pytest.raises(TargetError) as e:
        paretune.adapt(model, "lora", targets=["query"], r=2)
    msg = str(e.value)
    assert "matched no module" in msg and "model.layers.0.self_attn.q_proj" in msg and "q_proj" in msg
    assert not any(isinstance(m, Host) for m in model.modules())  # nothing changed
    assert paretune.adapters(model) == {}


def test_targets_of_an_unsupported_type_say_so(make_llama):
    with pytest.raises(TargetError, match="LlamaRMSNorm"):
        paretune.adapt(make_llama(), "lora", targets=["input_layernorm"], r=2)


def test_bad_targets_value(make_llama):
    with pytest.raises(TargetError, match="not understood"):
        paretune.adapt(make_llama(), "lora", targets=3, r=2)
    with pytest.raises(TargetError, match="regular expression"):
        paretune.adapt(make_llama(), "lora", targets="(", r=2)


def test_unknown_method_lists_known_ones(make_llama):
    with pytest.raises(ConfigError) as e:
        paretune.adapt(make_llama(), "lroa")
    assert "lora" in str(e.value) and "pissa" in str(e.value) and "Did you mean 'lora'" in str(e.value)


@pytest.mark.parametrize("options, word", [
    (dict(r=0), "r"), (dict(r=-2), "r"), (dict(r=2.5), "r"), (dict(alpha=-1.0), "alpha"),
    (dict(dropout=1.0), "dropout"), (dict(dropout=-0.1), "dropout"), (dict(init="xavier"), "init"),
    (dict(rank=4), "rank"),
])
def test_bad_options_are_clear_errors(make_llama, options, word):
    model = make_llama()
    with pytest.raises(ConfigError, match=word):
        paretune.adapt(model, "lora", **options)
    assert not any(isinstance(m, Host) for m in model.modules()) and paretune.adapters(model) == {}


def test_unknown_option_names_the_known_ones(make_llama):
    with pytest.raises(ConfigError) as e:
        paretune.adapt(make_llama(), "lora", rank=4)
    assert "'r'" in str(e.value) or " r" in str(e.value)


def test_bad_adapter_names(make_llama):
    model = paretune.adapt(make_llama(), "lora", r=2)
    with pytest.raises(ParetuneError, match="already has an adapter named"):
        paretune.adapt(model, "lora", r=2)
    for bad in ("", "a.b", 3):
        with pytest.raises(ParetuneError, match="invalid"):
            paretune.adapt(model, "lora", name=bad, r=2)


def test_a_failing_adapt_leaves_the_model_as_it_was(make_llama, monkeypatch):
    from paretune.methods.lora import LoraDelta

    model = make_llama()
    paretune.adapt(model, "lora", name="keep", targets=["q_proj"], r=2)
    calls = {"n": 0}
    original = LoraDelta.reset_parameters

    def fail_third(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        original(self)

    monkeypatch.setattr(LoraDelta, "reset_parameters", fail_third)
    with pytest.raises(RuntimeError, match="boom"):
        paretune.adapt(model, "lora", name="new", r=2)
    assert list(paretune.adapters(model)) == ["keep"]
    assert _adapted(model) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert all(list(h.deltas) == ["keep"] for _, h in hosts(model))
    assert isinstance(model.model.layers[0].self_attn.k_proj, nn.Linear)
