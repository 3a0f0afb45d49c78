"""Batched greedy generation with left padding (paretune.generate_cli, models.load's tokenizer)
against an independent greedy loop over each prompt alone, and the `paretune generate` verb."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import paretune
import paretune.models
from paretune.cli import app
from paretune.generate_cli import generate, read_prompts

PROMPTS = ["paris is the capital of", "the", "a long prompt about the river and the city of rome", "berlin"]


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    """A tiny random Llama saved with the bundled MiniLM tokenizer (a real tokenizer, offline)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    loc = paretune.models.BUNDLED["minilm-l6"].location()
    if loc is None:
        pytest.skip("the bundled minilm-l6 package is not installed")
    tok = AutoTokenizer.from_pretrained(str(loc), local_files_only=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(cfg)
    folder = tmp_path_factory.mktemp("lm") / "tiny-lm"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _greedy_alone(model, tokenizer, prompt: str, n: int) -> str:
    """Greedy decoding of one unpadded prompt by hand: argmax of the last logits, n times."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True)


def test_load_gives_a_left_padding_tokenizer_that_batches_generation(lm_folder):
    model, tok = paretune.models.load(str(lm_folder))
    assert tok.padding_side == "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    batched = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert batched == [_greedy_alone(model, tok, p, 5) for p in PROMPTS]


def test_classification_tokenizer_keeps_its_padding_side(lm_folder):
    _, tok = paretune.models.load(str(lm_folder), task="classification", num_labels=3)
    assert tok.padding_side == "right"


def test_generate_equals_each_prompt_alone_and_restores_padding_side(lm_folder):
    model, tok = paretune.models.load(str(lm_folder))
    tok.padding_side = "right"  # whatever the caller set is restored
    got = generate(model, tok, PROMPTS, max_new_tokens=4, batch_size=3, progress=False)
    assert got == [_greedy_alone(model, tok, p, 4) for p in PROMPTS]
    assert tok.padding_side == "right"


def test_generate_rejects_bad_numbers_and_missing_chat_template(lm_folder):
    model, tok = paretune.models.load(str(lm_folder))
    with pytest.raises(paretune.ParetuneError, match="max_new_tokens"):
        generate(model, tok, ["x"], max_new_tokens=0)
    with pytest.raises(paretune.ParetuneError, match="batch_size"):
        generate(model, tok, ["x"], batch_size=0)
    with pytest.raises(paretune.ParetuneError, match="chat template"):
        generate(model, tok, ["x"], chat=True)


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\nsecond\\nline\n")
    assert read_prompts(tmp_path / "p.txt") == ["first", "second\nline"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b", "x": 1}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a", "b"]
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(paretune.ParetuneError, match="line 1"):
        read_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(paretune.ParetuneError, match="does not exist"):
        read_prompts(tmp_path / "none.txt")


def test_generate_command_with_an_adapter_and_a_run_folder(lm_folder, tmp_path):
    model, tok = paretune.models.load(str(lm_folder))
    paretune.adapt(model, "lora", r=2, targets=["q_proj", "v_proj"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    run = tmp_path / "run"
    paretune.save(model, run / "adapter")
    want = _greedy_alone(model, tok, PROMPTS[0], 3)
    runner = CliRunner()
    res = runner.invoke(app, ["generate", "--model", str(lm_folder), "--adapter", str(run), "--prompt", PROMPTS[0],
                              "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == want.strip()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:2]))
    res = runner.invoke(app, ["generate", "--model", str(lm_folder), "--prompts", str(prompts), "--json",
                              "--max-new-tokens", "2", "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS[:2]
    res = runner.invoke(app, ["generate", "--model", str(lm_folder)])
    assert res.exit_code == 2 and "either --prompt" in res.stderr
