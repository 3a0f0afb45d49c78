import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import paretune
from paretune.errors import ParetuneError
from paretune.training import train
from paretune.training.batching import collate, encode
from paretune.training.trainer import evaluate
from paretune.data import load_data

HERE = Path(__file__).parent


def _trained(result):
    return {n: p.detach().clone() for n, p in result.model.named_parameters() if p.requires_grad}


def test_lora_trains_only_adapter_and_head(tiny_bert, minilm_tokenizer, colour_data):
    model = tiny_bert(minilm_tokenizer.vocab_size)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = train(model, colour_data, colour_data, tokenizer=minilm_tokenizer, method="lora", options={"r": 2},
                steps=5, lr=1e-2, batch_size=8, progress=False)
    changed = {n for n, p in res.model.named_parameters() if n in before and not torch.equal(before[n], p)}
    assert changed and all(n.startswith("classifier.") for n in changed)  # base frozen, head trained
    assert res.metrics["trainable"] == paretune.count(res.model)["trainable"] + 16 * 3 + 3
    assert 0 <= res.metrics["accuracy"] <= 1 and res.metrics["metric"] == "accuracy"
    assert len(res.history) == 5 and res.metrics["train_seconds"] > 0 and res.metrics["peak_memory_bytes"] > 0


def test_grad_accumulation_matches_one_big_batch(tiny_bert, minilm_tokenizer, colour_data):
    runs = []
    for accum in (1, 4):
        model = tiny_bert(minilm_tokenizer.vocab_size)
        res = train(model, colour_data, tokenizer=minilm_tokenizer, method="lora", options={"r": 2, "init": "random"},
                    steps=4, lr=1e-2, batch_size=8, grad_accum=accum, progress=False)
        runs.append(_trained(res))
    for n in runs[0]:
        torch.testing.assert_close(runs[0][n], runs[1][n], atol=5e-4, rtol=1e-3)  # Adam amplifies fp noise


def test_two_processes_equal_one(tmp_path):
    """2 CPU processes (gloo, through torchrun) give the adapter weights of 1 process, same global batch."""
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = str(HERE / "dist_worker.py")
    one, two = tmp_path / "one.st", tmp_path / "two.st"
    subprocess.run([sys.executable, worker, str(one)], check=True, env=env, capture_output=True, timeout=300)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           worker, str(two)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(str(one)), load_file(str(two))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=5e-4, rtol=1e-3)
    # and training moved them: not a comparison of two untouched inits
    assert any(not torch.allclose(a[k], torch.zeros_like(a[k])) for k in a)


def test_checkpoint_resume_equals_uninterrupted(tiny_bert, minilm_tokenizer, colour_data, tmp_path, interrupt_at,
                                                 interrupted):
    kw = dict(tokenizer=minilm_tokenizer, method="lora", options={"r": 2, "dropout": 0.1}, steps=6, lr=1e-2,
              batch_size=8, progress=False, seed=3)
    full = _trained(train(tiny_bert(minilm_tokenizer.vocab_size), colour_data, **kw))

    ck = tmp_path / "ck"
    with pytest.raises(interrupted):
        train(tiny_bert(minilm_tokenizer.vocab_size), colour_data, checkpoint_dir=str(ck), checkpoint_every=3,
              on_step=interrupt_at(4), **kw)
    assert (ck / "state.safetensors").is_file() and (ck / "state.json").is_file()
    resumed = train(tiny_bert(minilm_tokenizer.vocab_size), colour_data, checkpoint_dir=str(ck), checkpoint_every=3,
                    resume=True, **kw)
    assert len(resumed.history) == 6
    got = _trained(resumed)
    for n in full:
        torch.testing.assert_close(got[n], full[n], atol=1e-6, rtol=1e-5)


def test_on_step_hooks_run_every_step(tiny_bert, minilm_tokenizer, colour_data, monkeypatch):
    from paretune.methods.lora import LoraDelta

    seen, delta_steps = [], []
    monkeypatch.setattr(LoraDelta, "on_step", lambda self, step, total: delta_steps.append((step, total)),
                        raising=False)
    train(tiny_bert(minilm_tokenizer.vocab_size), colour_data, tokenizer=minilm_tokenizer, method="lora",
          steps=3, batch_size=8, progress=False, on_step=lambda step, model, opt: seen.append(step))
    assert seen == [1, 2, 3]
    assert sorted({s for s, _ in delta_steps}) == [1, 2, 3] and all(t == 3 for _, t in delta_steps)


def test_generation_exact_match_equals_greedy_decoding(tiny_llama, char_tokenizer):
    data = load_data([{"prompt": f"{w}=", "completion": w[::-1]} for w in ["abc", "hello", "xyz", "paretune"]])
    model = tiny_llama(len(char_tokenizer))
    res = train(model, data, data, tokenizer=char_tokenizer, method="lora", options={"r": 4}, steps=60, lr=3e-2,
                batch_size=4, progress=False, warmup=0)
    assert res.history[-1] < res.history[0]
    enc = encode(data, char_tokenizer)
    model = res.model.eval()
    greedy_right = 0
    for row in data.rows:
        ids = torch.tensor([char_tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]])
        target = char_tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [1]
        out = model.generate(ids, max_new_tokens=len(target), do_sample=False, pad_token_id=0, eos_token_id=1)
        greedy_right += out[0, ids.shape[1]:].tolist() == target
    metrics = evaluate(model, enc, 0, torch.device("cpu"))
    assert metrics["exact_match"] == greedy_right / len(data)
    assert res.metrics["exact_match"] == metrics["exact_match"]


def test_collate_masks_prompt_tokens(char_tokenizer):
    data = load_data([{"prompt": "ab=", "completion": "ba"}, {"prompt": "x=", "completion": "xyz"}])
    enc = encode(data, char_tokenizer)
    batch = collate(enc, [0, 1], 0, torch.device("cpu"))
    assert batch["labels"][0].tolist() == [-100, -100, -100, *enc.ids[0][3:]]  # "ba" + eos
    assert batch["labels"][1].tolist() == [-100, -100, *enc.ids[1][2:]]  # "xyz" + eos
    assert enc.ids[0][-1] == char_tokenizer.eos_token_id
    batch = collate(enc, [0, 1, 0], 0, torch.device("cpu"))
    assert batch["input_ids"].shape == (3, 6) and batch["attention_mask"].sum().item() == 6 + 6 + 6
    assert enc.loss_units([0, 1]) == 3 + 4


def test_bad_inputs(tiny_bert, minilm_tokenizer, colour_data):
    model = tiny_bert(minilm_tokenizer.vocab_size)
    with pytest.raises(ParetuneError, match="never saw"):
        train(model, colour_data, [{"text": "red red", "label": "purple"}], tokenizer=minilm_tokenizer,
              method="lora", steps=1, progress=False)
    with pytest.raises(ParetuneError, match="no examples"):
        train(model, [], tokenizer=minilm_tokenizer, method="lora", steps=1, progress=False)
    with pytest.raises(ParetuneError, match="divide evenly"):
        train(model, colour_data, tokenizer=minilm_tokenizer, method="lora", steps=1, batch_size=6, grad_accum=4)
    with pytest.raises(ParetuneError, match="output labels"):
        train(tiny_bert(minilm_tokenizer.vocab_size, num_labels=5), colour_data, tokenizer=minilm_tokenizer,
              method="lora", steps=1, progress=False)
    with pytest.raises(ParetuneError, match="steps"):
        train(model, colour_data, tokenizer=minilm_tokenizer, method="lora", steps=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_training_uses_bf16(tiny_bert, minilm_tokenizer, colour_data):
    res = train(tiny_bert(minilm_tokenizer.vocab_size), colour_data, colour_data, tokenizer=minilm_tokenizer,
                method="lora", steps=3, batch_size=8, progress=False)
    assert res.metrics["device"].startswith("cuda") and res.metrics["mixed_precision"] == "bf16"
    assert res.metrics["peak_memory_bytes"] > 0 and res.history[-1] == res.history[-1]  # finite


def test_head_lr_gives_the_head_its_own_rate(tiny_bert, minilm_tokenizer, colour_data):
    seen = []

    def record(step, model, opt):
        seen.append(sorted((len(g["params"]), g["peak_lr"], g["lr"]) for g in opt.param_groups))

    train(tiny_bert(minilm_tokenizer.vocab_size), colour_data, tokenizer=minilm_tokenizer, method="lora",
          steps=2, batch_size=8, lr=1e-3, head_lr=5e-3, warmup=0, schedule="constant", progress=False,
          on_step=record)
    (adapter, head) = sorted(seen[-1], key=lambda g: g[1])
    assert adapter[1] == adapter[2] == 1e-3 and head[1] == head[2] == 5e-3
    assert head[0] == 2  # the classifier's weight and bias
    with pytest.raises(ParetuneError, match="head_lr"):
        train(tiny_bert(minilm_tokenizer.vocab_size), colour_data, tokenizer=minilm_tokenizer, method="lora",
              steps=1, batch_size=8, head_lr=0.0, progress=False)


def test_resumed_schedule_and_checkpoint_keep_frozen_tensors(tiny_bert, minilm_tokenizer, colour_data, tmp_path):
    """LaMDA freezes B mid-run: a checkpoint still holds it, and a resumed run freezes it again."""
    kw = dict(tokenizer=minilm_tokenizer, method="lamda", options={"r": 2, "freeze_fraction": 0.25}, steps=8,
              batch_size=8, progress=False, seed=1)
    full = train(tiny_bert(minilm_tokenizer.vocab_size), colour_data, **kw)
    part = train(tiny_bert(minilm_tokenizer.vocab_size), colour_data, checkpoint_dir=str(tmp_path / "ck"),
                 checkpoint_every=4, **{**kw, "steps": 8})
    from safetensors.torch import load_file

    state = load_file(tmp_path / "ck" / "state.safetensors")
    assert any(n.startswith("param/") and n.endswith(".B") for n in state)  # frozen by step 4, still saved
    resumed = train(tiny_bert(minilm_tokenizer.vocab_size), colour_data, checkpoint_dir=str(tmp_path / "ck"),
                    resume=True, **kw)
    want = {n: p for n, p in full.model.named_parameters() if ".deltas." in n}
    got = {n: p for n, p in resumed.model.named_parameters() if ".deltas." in n}
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5)
    assert part.metrics["trainable"] == full.metrics["trainable"]


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning"])
def test_virtual_token_methods_train_on_generation(tiny_llama, char_tokenizer, method):
    """Prompt tuning's logits carry its virtual positions first: the loss scores the batch's own
    positions only, so training and evaluation run, and the loss falls."""
    data = load_data([{"prompt": f"{w}=", "completion": w[::-1]} for w in ["abc", "hello", "xyz", "paretune"]])
    model = tiny_llama(len(char_tokenizer))
    res = train(model, data, data, tokenizer=char_tokenizer, method=method, options={"num_virtual_tokens": 4},
                steps=20, lr=3e-2, batch_size=4, progress=False, warmup=0)
    assert res.history[-1] < res.history[0]
    assert 0.0 <= res.metrics["exact_match"] <= 1.0


def test_bitnet_option_trains_ternary_layers(tiny_bert, minilm_tokenizer, colour_data, tmp_path):
    """train(..., bitnet=True): the Linears become BitNet b1.58 layers before training, their latent
    weights train, and freezing gives int8 codes in {-1, 0, 1} with the same outputs."""
    from paretune.compress import BitLinear, TernaryLinear, freeze_ternary

    model = tiny_bert(minilm_tokenizer.vocab_size)
    res = train(model, colour_data, tokenizer=minilm_tokenizer, method="full", bitnet=True, steps=3, batch_size=8,
                lr=1e-2, progress=False)
    bit = [m for m in res.model.modules() if isinstance(m, BitLinear)]
    assert bit and all(m.weight.requires_grad for m in bit)
    assert all(math.isfinite(v) for v in res.history)
    batch = minilm_tokenizer(["red blue", "gold teal"], return_tensors="pt", padding=True)
    res.model.eval()
    with torch.no_grad():
        before = res.model(**batch).logits
        frozen = freeze_ternary(res.model)
        after = frozen(**batch).logits
    codes = [m for m in frozen.modules() if isinstance(m, TernaryLinear)]
    assert len(codes) == len(bit)
    assert all(set(torch.unique(m.codes).tolist()) <= {-1, 0, 1} for m in codes)
    torch.testing.assert_close(after, before)
