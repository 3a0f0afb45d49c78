"""task_type, base_model_name_or_path and task heads (modules_to_save): PEFT's auto classes load an
exported folder by itself with equal logits, and PEFT-written heads import back."""

import json

import pytest
import torch
from peft import (AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, LoraConfig,
                  get_peft_model)

import paretune
from paretune.peft_io import base_model_path, infer_task_type


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _saved(make, tmp_path, name):
    make().save_pretrained(tmp_path / name)
    return tmp_path / name


def test_causal_lm_loads_through_auto_peft(make_llama, ids, perturb, tmp_path):
    from transformers import LlamaForCausalLM

    base = _saved(make_llama, tmp_path, "base")
    ours = paretune.adapt(LlamaForCausalLM.from_pretrained(base).eval(), "lora", targets=["q_proj", "v_proj"], r=2)
    perturb(ours)
    paretune.export_peft(ours, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["base_model_name_or_path"] == str(base.resolve())
    assert cfg["modules_to_save"] is None  # lm_head is frozen: not a trained head
    theirs = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    torch.testing.assert_close(_logits(theirs, ids), _logits(ours, ids), atol=1e-5, rtol=0)


def test_classifier_head_is_modules_to_save_and_loads_through_auto_peft(make_bert, ids, perturb, tmp_path):
    from transformers import BertForSequenceClassification

    base = _saved(make_bert, tmp_path, "base")
    ours = paretune.adapt(BertForSequenceClassification.from_pretrained(base).eval(), "lora",
                          targets=["query", "value"], r=2)
    for p in ours.classifier.parameters():
        p.requires_grad_(True)
    perturb(ours)  # the adapter and the head move away from the saved base
    paretune.export_peft(ours, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]
    theirs = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "p").eval()
    want = _logits(ours, ids)
    assert not torch.allclose(want, _logits(make_bert(), ids), atol=1e-3)
    torch.testing.assert_close(_logits(theirs, ids), want, atol=1e-5, rtol=0)
    back = paretune.import_peft(make_bert(), tmp_path / "p")  # the head comes back too
    torch.testing.assert_close(_logits(back, ids), want, atol=1e-5, rtol=0)


def test_peft_written_head_imports(make_bert, ids, tmp_path):
    theirs = get_peft_model(make_bert(), LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"],
                                                    init_lora_weights=False))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    theirs.save_pretrained(tmp_path / "p")
    ours = paretune.import_peft(make_bert(), tmp_path / "p")
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs.eval(), ids), atol=1e-5, rtol=0)


def test_head_shape_mismatch_is_a_clear_error(make_bert, tmp_path):
    from paretune.errors import AdapterFileError

    theirs = get_peft_model(make_bert(), LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    theirs.save_pretrained(tmp_path / "p")
    model = make_bert()
    model.classifier = torch.nn.Linear(16, 5)
    with pytest.raises(AdapterFileError, match="num_labels=3"):
        paretune.import_peft(model, tmp_path / "p")
    assert paretune.adapters(model) == {}


def test_task_type_inference_and_override(make_llama, make_bert, make_toy, tmp_path):
    from transformers import BertConfig, BertModel

    assert infer_task_type(make_llama()) == "CAUSAL_LM"
    assert infer_task_type(make_bert()) == "SEQ_CLS"
    assert infer_task_type(BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=8))) == "FEATURE_EXTRACTION"
    assert infer_task_type(make_toy()) is None
    ours = paretune.adapt(make_llama(), "lora", targets=["q_proj"], r=2)
    paretune.export_peft(ours, tmp_path / "p", task_type="FEATURE_EXTRACTION", base_model_name_or_path="org/base")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert (cfg["task_type"], cfg["base_model_name_or_path"]) == ("FEATURE_EXTRACTION", "org/base")
    with pytest.raises(paretune.errors.AdapterFileError, match="task_type"):
        paretune.export_peft(ours, tmp_path / "q", task_type="CLASSIFY")


def test_base_model_path_of_bundled_and_hub_names(make_llama):
    from paretune.models import BUNDLED

    m = make_llama()
    m.config._name_or_path = "minilm-l6"
    loc = BUNDLED["minilm-l6"].location()
    assert base_model_path(m) == (str(loc) if loc is not None else BUNDLED["minilm-l6"].origin)
    m.config._name_or_path = "smollm2-135m"  # a GGUF file: transformers loads the origin repository instead
    assert base_model_path(m) == BUNDLED["smollm2-135m"].origin
    m.config._name_or_path = "someone/some-model"
    assert base_model_path(m) == "someone/some-model"
    m.config._name_or_path = ""
    assert base_model_path(m) is None
