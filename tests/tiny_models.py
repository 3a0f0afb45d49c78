"""Tiny random transformers models (hidden 32, 2 layers) for the probe and fuzz tests."""

from __future__ import annotations

import torch

VOCAB = 64


def llama(seed: int = 0, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0,
                      eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(cfg).float().eval()


def bert_cls(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def save_tiny_bert_classifier(folder):
    """A tiny BERT classifier (hidden 32, 2 layers, 2 labels, seed 0) with MiniLM's tokenizer, saved
    as a local model folder at ``folder`` (for command-line cases without a real model load)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from paretune.models import BUNDLED

    tok = AutoTokenizer.from_pretrained(BUNDLED["minilm-l6"].location())
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
