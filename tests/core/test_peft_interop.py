"""Numerical equality with PEFT's LoRA: same weights -> same outputs (unmerged and merged), and
adapters crossing over in both directions (export_peft -> PeftModel.from_pretrained, PEFT
save_pretrained -> import_peft)."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import paretune
from paretune.core.inject import hosts
from paretune.errors import AdapterFileError

ATOL = 1e-5


def _peft_module(peft_model, name):
    return peft_model.base_model.model.get_submodule(name)


@torch.no_grad()
def copy_from_peft(peft_model, model, adapter="default"):
    """Give paretune's LoRA factors PEFT's values (matrix layout (r, d_in) / (d_out, r))."""
    n = 0
    for name, host in hosts(model):
        m, d = _peft_module(peft_model, name), host.deltas[adapter]
        if host.kind == "embedding":
            a, b = m.lora_embedding_A[adapter], m.lora_embedding_B[adapter]
        else:
            a, b = m.lora_A[adapter].weight, m.lora_B[adapter].weight
        d.A.copy_(a.reshape(d.A.shape))
        d.B.copy_(b.reshape(d.B.shape))
        assert d.scaling == pytest.approx(m.scaling[adapter])
        n += 1
    return n


def _both(make, peft_kwargs, paretune_kwargs, targets):
    theirs = get_peft_model(make(), LoraConfig(init_lora_weights=False, **peft_kwargs, target_modules=targets))
    ours = paretune.adapt(make(), "lora", targets=targets, **paretune_kwargs)
    assert copy_from_peft(theirs, ours) == len(list(_peft_lora_layers(theirs)))
    return theirs.eval(), ours.eval()


def _peft_lora_layers(peft_model):
    from peft.tuners.lora import LoraLayer

    return [m for m in peft_model.modules() if isinstance(m, LoraLayer)]


CASES = {
    "llama": ("make_llama", dict(r=4, lora_alpha=8), dict(r=4, alpha=8),
              ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "llama-rslora": ("make_llama", dict(r=4, lora_alpha=3, use_rslora=True), dict(r=4, alpha=3, rslora=True),
                     ["q_proj", "v_proj", "down_proj"]),
    "gpt2-conv1d": ("make_gpt2", dict(r=3, lora_alpha=6, fan_in_fan_out=True), dict(r=3, alpha=6),
                    ["c_attn", "c_proj", "c_fc"]),
}


def _run(model, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("case", list(CASES))
def test_lora_equals_peft_unmerged_and_merged(case, request, ids):
    fixture, pk, ok, targets = CASES[case]
    theirs, ours = _both(request.getfixturevalue(fixture), pk, ok, targets)
    base = _run(request.getfixturevalue(fixture)(), {"input_ids": ids})
    a, b = _run(ours, {"input_ids": ids}), _run(theirs, {"input_ids": ids})
    assert not torch.allclose(a, base, atol=1e-3)  # the adapters do something
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    paretune.merge(ours)
    merged_theirs = theirs.merge_and_unload()
    torch.testing.assert_close(_run(ours, {"input_ids": ids}), _run(merged_theirs, {"input_ids": ids}),
                               atol=ATOL, rtol=0)


def test_embedding_and_conv2d_equal_peft(make_toy, toy_inputs):
    theirs, ours = _both(make_toy, dict(r=2, lora_alpha=5), dict(r=2, alpha=5), ["emb", "lin", "conv"])
    torch.testing.assert_close(_run(ours, toy_inputs), _run(theirs, toy_inputs), atol=ATOL, rtol=0)
    assert not torch.allclose(_run(ours, toy_inputs), _run(make_toy(), toy_inputs), atol=1e-3)
    paretune.merge(ours)
    torch.testing.assert_close(_run(ours, toy_inputs), _run(theirs.merge_and_unload(), toy_inputs), atol=ATOL, rtol=0)


@pytest.mark.parametrize("fixture, targets, inputs", [
    ("make_llama", ["q_proj", "v_proj", "up_proj"], "ids"),
    ("make_gpt2", ["c_attn", "c_fc"], "ids"),
    ("make_toy", ["emb", "lin", "conv"], "toy_inputs"),
])
def test_export_peft_loads_in_peft_with_equal_outputs(fixture, targets, inputs, request, tmp_path):
    make, x = request.getfixturevalue(fixture), request.getfixturevalue(inputs)
    x = {"input_ids": x} if inputs == "ids" else x
    ours = paretune.adapt(make(), "lora", targets=targets, r=3, alpha=7, init="random")
    paretune.export_peft(ours, tmp_path / "peft")
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    theirs = PeftModel.from_pretrained(make(), tmp_path / "peft").eval()
    torch.testing.assert_close(_run(theirs, x), _run(ours, x), atol=ATOL, rtol=0)


def test_export_rslora_keeps_the_scaling(make_llama, ids, tmp_path):
    ours = paretune.adapt(make_llama(), "lora", targets=["q_proj"], r=4, alpha=2, rslora=True, init="random")
    paretune.export_peft(ours, tmp_path / "p")
    theirs = PeftModel.from_pretrained(make_llama(), tmp_path / "p").eval()
    torch.testing.assert_close(_run(theirs, {"input_ids": ids}), _run(ours, {"input_ids": ids}), atol=ATOL, rtol=0)


@pytest.mark.parametrize("fixture, peft_kwargs, targets, inputs", [
    ("make_llama", dict(r=4, lora_alpha=8), ["q_proj", "o_proj", "down_proj"], "ids"),
    ("make_llama", dict(r=2, lora_alpha=8, use_rslora=True), ["k_proj"], "ids"),
    ("make_gpt2", dict(r=2, lora_alpha=4, fan_in_fan_out=True), ["c_attn", "c_proj"], "ids"),
    ("make_toy", dict(r=2, lora_alpha=3), ["emb", "lin", "conv"], "toy_inputs"),
])
def test_import_peft_gives_peft_outputs(fixture, peft_kwargs, targets, inputs, request, tmp_path):
    make, x = request.getfixturevalue(fixture), request.getfixturevalue(inputs)
    x = {"input_ids": x} if inputs == "ids" else x
    theirs = get_peft_model(make(), LoraConfig(init_lora_weights=False, target_modules=targets, **peft_kwargs))
    theirs.save_pretrained(tmp_path / "peft")
    ours = paretune.import_peft(make(), tmp_path / "peft", name="imported")
    assert paretune.adapters(ours)["imported"].method == "lora"
    torch.testing.assert_close(_run(ours, x), _run(theirs.eval(), x), atol=ATOL, rtol=0)
    assert not torch.allclose(_run(ours, x), _run(make(), x), atol=1e-3)


def test_pissa_export_loads_on_the_original_base(make_llama, ids, tmp_path):
    ours = paretune.adapt(make_llama(), "pissa", targets=["q_proj", "v_proj", "gate_proj"], r=2, alpha=4)
    with torch.no_grad():  # a trained PiSSA: move A and B away from their start
        for _, host in hosts(ours):
            host.deltas["default"].A.add_(0.1 * torch.randn_like(host.deltas["default"].A))
            host.deltas["default"].B.add_(0.1 * torch.randn_like(host.deltas["default"].B))
    paretune.export_peft(ours, tmp_path / "p")
    theirs = PeftModel.from_pretrained(make_llama(), tmp_path / "p").eval()  # the ORIGINAL weights
    want = _run(ours, {"input_ids": ids})
    assert not torch.allclose(want, _run(make_llama(), {"input_ids": ids}), atol=1e-3)
    torch.testing.assert_close(_run(theirs, {"input_ids": ids}), want, atol=ATOL, rtol=0)


def test_import_errors(make_llama, tmp_path):
    with pytest.raises(AdapterFileError, match="adapter_config.json"):
        paretune.import_peft(make_llama(), tmp_path)
    theirs = get_peft_model(make_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    theirs.save_pretrained(tmp_path / "p")
    (tmp_path / "p" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    model = make_llama()
    with pytest.raises(AdapterFileError, match="corrupt"):
        paretune.import_peft(model, tmp_path / "p")
    assert paretune.adapters(model) == {}


def test_merged_adapter_cannot_be_exported(make_llama, tmp_path):
    model = paretune.adapt(make_llama(), "lora", r=2)
    paretune.merge(model)
    with pytest.raises(AdapterFileError, match="unmerge"):
        paretune.export_peft(model, tmp_path / "p")
    assert not (tmp_path / "p").exists()
