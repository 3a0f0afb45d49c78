"""VeRA, RandLoRA and LoKr cross over to PEFT's own formats in both directions with equal outputs:
PEFT get_peft_model -> save_pretrained -> import_peft, and paretune -> export_peft ->
PeftModel.from_pretrained."""

import json

import pytest
import torch
from peft import LoKrConfig, PeftModel, RandLoraConfig, VeraConfig, get_peft_model

import paretune
from paretune.errors import AdapterFileError

ATOL = 1e-5
TARGETS = ["q_proj", "v_proj", "up_proj"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _randomize_peft(model, words, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(w in n for w in words):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


PEFT_CASES = {
    "vera": (lambda: VeraConfig(r=4, target_modules=TARGETS, save_projection=True, projection_prng_key=7),
             ["vera_lambda"], "vera"),
    "randlora": (lambda: RandLoraConfig(r=4, randlora_alpha=12, target_modules=TARGETS, projection_prng_key=3),
                 ["randlora_lambda", "randlora_gamma"], "randlora"),
    "lokr-lowrank": (lambda: LoKrConfig(r=2, alpha=3, target_modules=TARGETS), ["lokr_w"], "kronecker"),
    "lokr-full": (lambda: LoKrConfig(r=16, alpha=5, target_modules=TARGETS), ["lokr_w"], "kronecker"),
    "lokr-both": (lambda: LoKrConfig(r=1, alpha=2, decompose_both=True, decompose_factor=2, target_modules=TARGETS),
                  ["lokr_w"], "kronecker"),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_built_adapter_imports_with_equal_outputs(case, make_llama, ids, tmp_path):
    make_cfg, words, method = PEFT_CASES[case]
    theirs = get_peft_model(make_llama(), make_cfg())
    _randomize_peft(theirs, words)
    theirs.save_pretrained(tmp_path / "p")
    ours = paretune.import_peft(make_llama(), tmp_path / "p", name="x")
    assert paretune.adapters(ours)["x"].method == method
    want = _logits(theirs.eval(), ids)
    assert not torch.allclose(want, _logits(make_llama(), ids), atol=1e-3)
    torch.testing.assert_close(_logits(ours, ids), want, atol=ATOL, rtol=0)


OUR_CASES = {
    "vera": ("vera", dict(r=4, seed=5), "VERA"),
    "randlora-peft": ("randlora", dict(r=4, alpha=9, convention="peft", seed=2), "RANDLORA"),
    "randlora-paper": ("randlora", dict(r=3, seed=2), "RANDLORA"),  # 3 divides neither 16 nor 8
    "kronecker-lowrank": ("kronecker", dict(r=2, alpha=3), "LOKR"),
    "kronecker-full": ("kronecker", dict(factor=2, alpha=0.5), "LOKR"),
    "kronecker-both": ("kronecker", dict(r=1, alpha=2, decompose_both=True, factor=2), "LOKR"),
}


@pytest.mark.parametrize("case", list(OUR_CASES))
def test_export_loads_in_peft_with_equal_outputs(case, make_llama, ids, perturb, tmp_path):
    method, options, peft_type = OUR_CASES[case]
    ours = paretune.adapt(make_llama(), method, targets=TARGETS, **options)
    perturb(ours)
    paretune.export_peft(ours, tmp_path / "p")
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["peft_type"] == peft_type
    theirs = PeftModel.from_pretrained(make_llama(), tmp_path / "p").eval()
    want = _logits(ours, ids)
    assert not torch.allclose(want, _logits(make_llama(), ids), atol=1e-3)
    torch.testing.assert_close(_logits(theirs, ids), want, atol=ATOL, rtol=0)
    # and back: the exported folder imports with the same outputs
    again = paretune.import_peft(make_llama(), tmp_path / "p")
    torch.testing.assert_close(_logits(again, ids), want, atol=ATOL, rtol=0)


def test_vera_can_still_be_written_as_lora(make_llama, ids, perturb, tmp_path):
    ours = paretune.adapt(make_llama(), "vera", targets=TARGETS, r=4)
    perturb(ours)
    paretune.export_peft(ours, tmp_path / "p", peft_type="LORA")
    theirs = PeftModel.from_pretrained(make_llama(), tmp_path / "p").eval()
    torch.testing.assert_close(_logits(theirs, ids), _logits(ours, ids), atol=ATOL, rtol=0)


def test_inexpressible_adapters_are_refused_with_the_reason(make_llama, tmp_path):
    paper = paretune.adapt(make_llama(), "randlora", targets=["q_proj"], r=4)  # 4 divides 16: one basis more
    with pytest.raises(AdapterFileError, match="convention='peft'"):
        paretune.export_peft(paper, tmp_path / "a")
    shaped = paretune.adapt(make_llama(), "kronecker", targets=["q_proj"], a_shape=(2, 8))
    with pytest.raises(AdapterFileError, match="LoKr"):
        paretune.export_peft(shaped, tmp_path / "b")
    lora = paretune.adapt(make_llama(), "lora", targets=["q_proj"], r=2)
    with pytest.raises(AdapterFileError, match="cannot be written as PEFT VERA"):
        paretune.export_peft(lora, tmp_path / "c", peft_type="VERA")
    assert not any((tmp_path / d).exists() for d in "abc")


def test_vera_with_foreign_projections_is_refused(make_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    theirs = get_peft_model(make_llama(), VeraConfig(r=4, target_modules=["q_proj"], save_projection=True))
    theirs.save_pretrained(tmp_path / "p")
    f = tmp_path / "p" / "adapter_model.safetensors"
    t = load_file(str(f))
    t["base_model.vera_A"] = t["base_model.vera_A"] + 1.0
    save_file(t, str(f))
    model = make_llama()
    with pytest.raises(AdapterFileError, match="projection_prng_key"):
        paretune.import_peft(model, tmp_path / "p")
    assert paretune.adapters(model) == {}
