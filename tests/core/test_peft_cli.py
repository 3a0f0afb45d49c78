"""`paretune export` / `paretune import` through paretune.cli.main on a tiny model folder."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import paretune
from paretune import cli
from paretune.export_cli import export_command, import_command


@pytest.fixture(autouse=True)
def registered():
    names = {c.name for c in cli.app.registered_commands}
    for name, fn in (("export", export_command), ("import", import_command)):
        if name not in names:
            cli.app.command(name)(cli.guarded(fn))


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, 50)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture
def base(make_llama, tmp_path):
    make_llama().save_pretrained(tmp_path / "base")
    _tokenizer().save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_export_then_import_round_trip(base, make_llama, ids, perturb, tmp_path):
    ours = paretune.adapt(make_llama(), "vera", targets=["q_proj", "v_proj"], r=4)
    perturb(ours)
    paretune.save(ours, tmp_path / "ad")
    with pytest.raises(SystemExit) as e:
        cli.main(["export", str(tmp_path / "ad"), "--model", str(base), "--out", str(tmp_path / "peft")])
    assert e.value.code in (0, None)
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["base_model_name_or_path"]) == ("VERA", "CAUSAL_LM",
                                                                                    str(base.resolve()))
    theirs = PeftModel.from_pretrained(make_llama(), tmp_path / "peft").eval()
    torch.testing.assert_close(_logits(theirs, ids), _logits(ours, ids), atol=1e-5, rtol=0)
    with pytest.raises(SystemExit) as e:
        cli.main(["import", str(tmp_path / "peft"), "--model", str(base), "--out", str(tmp_path / "back")])
    assert e.value.code in (0, None)
    back = paretune.load(make_llama(), tmp_path / "back")
    torch.testing.assert_close(_logits(back, ids), _logits(ours, ids), atol=1e-5, rtol=0)


def test_import_of_a_peft_lora(base, make_llama, ids, tmp_path):
    theirs = get_peft_model(make_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "peft")
    with pytest.raises(SystemExit) as e:
        cli.main(["import", str(tmp_path / "peft"), "--model", str(base), "--out", str(tmp_path / "ad")])
    assert e.value.code in (0, None)
    ours = paretune.load(make_llama(), tmp_path / "ad")
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs.eval(), ids), atol=1e-5, rtol=0)


def test_errors_exit_2(base, tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("[1, 2]")
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(b"")
    for argv in (["import", str(tmp_path / "bad"), "--model", str(base), "--out", str(tmp_path / "o")],
                 ["export", str(tmp_path / "nothing"), "--model", str(base), "--out", str(tmp_path / "o")]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "o").exists()
