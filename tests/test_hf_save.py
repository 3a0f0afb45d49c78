"""An adapted transformers model's save_pretrained / Trainer.save_model: the base under its own
names (transformers loads it with no missing or unexpected keys) plus paretune adapter folders,
and paretune.hf.from_pretrained giving the adapted model back."""

import copy
import os

import pytest
import torch

import paretune
from paretune import hf

VOCAB = 50


def _llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(cfg).float().eval()


def _bert(seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, max_position_embeddings=32)
    return BertForSequenceClassification(cfg).eval()


IDS = torch.randint(2, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))


def _randomize(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _out(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _plain_load(cls, path):
    model, info = cls.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize("build", [_llama, _bert], ids=["llama", "bert"])
def test_save_pretrained_writes_the_base_and_adapters(build, tmp_path):
    model = build()
    targets = ["q_proj", "v_proj"] if "Llama" in type(model).__name__ else ["query", "value"]
    paretune.adapt(model, "lora", targets=targets, r=2)
    if hasattr(model, "classifier"):
        model.classifier.requires_grad_(True)  # a head trained beside the adapter
        model.config.id2label = {0: "a", 1: "b", 2: "c"}
        model.config.label2id = {"a": 0, "b": 1, "c": 2}
    _randomize(model)
    want = _out(model)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path / hf.ADAPTERS_DIR)) == ["adapters.json", "default"]
    base = _plain_load(type(model), tmp_path)
    reference = build()  # the base as it was, with the trained head
    if hasattr(model, "classifier"):
        reference.classifier.load_state_dict(model.classifier.state_dict())
    for k, v in reference.state_dict().items():
        assert torch.equal(base.state_dict()[k], v), k
    back = hf.from_pretrained(tmp_path)
    torch.testing.assert_close(_out(back), want, atol=1e-6, rtol=0)
    if hasattr(model, "classifier"):
        assert back.config.id2label == {0: "a", 1: "b", 2: "c"}


def test_several_adapters_merged_and_pissa(tmp_path):
    model = _llama()
    paretune.adapt(model, "lora", name="m", targets=["q_proj"], r=2)
    _randomize(model, 1)
    paretune.merge(model, "m")  # merged before PiSSA is built on the same layers: PiSSA's base includes it
    paretune.adapt(model, "pissa", name="p", targets=["q_proj", "up_proj"], r=2)
    _randomize(model, 2)
    paretune.adapt(model, "lora", name="off", targets=["v_proj"], r=2)
    _randomize(model, 3)
    paretune.set_active(model, ["m", "p"])
    want = _out(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # put back bit for bit
    assert sorted(os.listdir(tmp_path / hf.ADAPTERS_DIR)) == ["adapters.json", "off", "p"]  # merged: none
    base = _plain_load(type(model), tmp_path)
    merged_only = _llama()
    with torch.no_grad():  # the written base: the original plus the merged adapter, PiSSA's residual undone
        for i in (0, 1):
            q = f"model.layers.{i}.self_attn.q_proj"
            merged_only.get_submodule(q).weight += model.get_submodule(q).deltas["m"].delta_weight()
    for k, v in merged_only.state_dict().items():
        torch.testing.assert_close(base.state_dict()[k], v, atol=1e-6, rtol=0)
    back = hf.from_pretrained(tmp_path)
    assert paretune.active(back) == ["p"] and sorted(paretune.adapters(back)) == ["off", "p"]
    torch.testing.assert_close(_out(back), want, atol=1e-5, rtol=0)


def test_hook_follows_copy_and_leaves_with_unload(tmp_path):
    model = _llama()
    paretune.adapt(model, "lora", targets=["q_proj"], r=2)
    _randomize(model)
    twin = copy.deepcopy(model)
    assert twin.save_pretrained.__self__ is twin
    twin.save_pretrained(tmp_path / "twin")
    torch.testing.assert_close(_out(hf.from_pretrained(tmp_path / "twin")), _out(model), atol=1e-6, rtol=0)
    paretune.unload(model)
    assert "save_pretrained" not in model.__dict__
    paretune.adapt(model, "lora", name="x", targets=["v_proj"], r=2)
    paretune.remove(model, "x")
    assert "save_pretrained" not in model.__dict__
    model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / hf.ADAPTERS_DIR).exists()
    _plain_load(type(model), tmp_path / "plain")


def test_trainer_save_model_round_trip(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _llama().train()
    paretune.adapt(model, "lora", targets=["q_proj", "v_proj"], r=2)
    data = [{"input_ids": IDS[i % 3], "labels": IDS[i % 3]} for i in range(6)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data).train()
    model.eval()
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.deltas["default"].B,
                           torch.zeros_like(model.model.layers[0].self_attn.q_proj.deltas["default"].B))
    Trainer(model=model, args=args).save_model(str(tmp_path / "saved"))
    _plain_load(type(model), tmp_path / "saved")
    torch.testing.assert_close(_out(hf.from_pretrained(tmp_path / "saved")), _out(model), atol=1e-6, rtol=0)


def test_plain_state_dict_names():
    model = _llama()
    names = set(model.state_dict())
    paretune.adapt(model, "lora", targets=["q_proj"], r=2)
    assert set(hf.plain_state_dict(model)) == names


def test_models_load_finds_the_adapters(tmp_path):
    """paretune.models.load on a folder an adapted model's save_pretrained wrote gives the adapted model."""
    from paretune import models

    model = _llama()
    paretune.adapt(model, "lora", targets=["q_proj"], r=2)
    _randomize(model)
    want = _out(model)
    model.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(models.BUNDLED["minilm-l6"].location()).save_pretrained(tmp_path)  # any tokenizer
    back, _ = models.load(str(tmp_path), task="causal-lm", progress=False)
    assert list(paretune.adapters(back)) == ["default"]
    torch.testing.assert_close(_out(back), want, atol=1e-6, rtol=0)
