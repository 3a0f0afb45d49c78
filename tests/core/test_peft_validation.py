"""Malformed PEFT configs and unreachable Hub ids are AdapterFileErrors with a message, never a
traceback from deeper code, and leave the model unchanged."""

import json

import pytest
from peft import LoraConfig, get_peft_model

import paretune
from paretune.errors import AdapterFileError


@pytest.fixture
def peft_dir(make_llama, tmp_path):
    theirs = get_peft_model(make_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    theirs.save_pretrained(tmp_path / "p")
    return tmp_path / "p"


def _edit(folder, change):
    f = folder / "adapter_config.json"
    cfg = json.loads(f.read_text())
    cfg = change(cfg)
    f.write_text(json.dumps(cfg))


BAD = {
    "a list": (lambda c: [c], "not an object"),
    "alpha a word": (lambda c: {**c, "lora_alpha": "sixteen"}, "lora_alpha='sixteen'.*finite number"),
    "r a float": (lambda c: {**c, "r": 2.5}, "r=2.5.*integer"),
    "r a bool": (lambda c: {**c, "r": True}, "r=True.*integer"),
    "no peft_type": (lambda c: {k: v for k, v in c.items() if k != "peft_type"}, "no 'peft_type'"),
    "unknown peft_type": (lambda c: {**c, "peft_type": "WIZARD"}, "'WIZARD'.*reads LORA"),
    "dropout out of range": (lambda c: {**c, "lora_dropout": 3}, "lora_dropout=3"),
    "rslora not a flag": (lambda c: {**c, "use_rslora": "yes"}, "use_rslora='yes'.*true or false"),
    "alpha_pattern a list": (lambda c: {**c, "alpha_pattern": [1]}, "alpha_pattern"),
    "modules_to_save a string": (lambda c: {**c, "modules_to_save": "classifier"}, "modules_to_save"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_is_a_clear_error(case, peft_dir, make_llama):
    change, message = BAD[case]
    _edit(peft_dir, change)
    model = make_llama()
    with pytest.raises(AdapterFileError, match=message):
        paretune.import_peft(model, peft_dir)
    assert paretune.adapters(model) == {}


def test_missing_required_key_is_named(make_llama, tmp_path):
    from peft import VeraConfig

    get_peft_model(make_llama(), VeraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "v")
    _edit(tmp_path / "v", lambda c: {k: v for k, v in c.items() if k != "r"})
    with pytest.raises(AdapterFileError, match="lacks 'r'"):
        paretune.import_peft(make_llama(), tmp_path / "v")


def test_hub_id_offline_is_a_clear_error(make_llama, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(AdapterFileError, match="someone/no-such-adapter.*HF_HUB_OFFLINE"):
        paretune.import_peft(make_llama(), "someone/no-such-adapter")


def test_missing_local_path_is_not_sent_to_the_hub(make_llama, tmp_path):
    with pytest.raises(AdapterFileError, match="does not exist"):
        paretune.import_peft(make_llama(), str(tmp_path / "nowhere"))
