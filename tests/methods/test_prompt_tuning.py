"""Prompt tuning (Lester et al. 2021): equality with PEFT's prompt tuning (same prompt tensor copied
into both) on a tiny Llama causal LM (logits with the virtual positions, loss with padded labels,
a padded attention mask) and a BERT classifier (token type ids); the init options; counts;
inputs_embeds and position ids; save / load; removing the adapter gives the base back (zero start
is not defined for this method); generation; bad input leaves the model unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import paretune
from paretune.core.host import Host
from paretune.errors import ConfigError, ParetuneError, TargetError
from paretune.methods.prompt_tuning import PromptTuningConfig, default_targets

import tiny_transformers as tiny

N = 3


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, tiny.VOCAB, (2, 5), generator=g)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0  # a left-padded row
    return ids, mask


def delta_of(model: nn.Module):
    return model.get_input_embeddings().deltas["default"]


def peft_twin(build, task: str, model: nn.Module):
    """PEFT's prompt tuning on a fresh base, with our adapter's prompt copied in."""
    from peft import PromptTuningConfig as PeftConfig, get_peft_model

    twin = get_peft_model(build(), PeftConfig(task_type=task, num_virtual_tokens=N))
    with torch.no_grad():
        twin.prompt_encoder["default"].embedding.weight.copy_(delta_of(model).prompt)
    return twin.eval()


# -- equality with PEFT ----------------------------------------------------------------------------

def test_causal_lm_equals_peft(batch):
    ids, mask = batch
    model = tiny.build_llama16()
    paretune.adapt(model, "prompt-tuning", num_virtual_tokens=N)
    twin = peft_twin(tiny.build_llama16, "CAUSAL_LM", model)
    ours, theirs = model(input_ids=ids, attention_mask=mask, labels=ids), twin(input_ids=ids, attention_mask=mask,
                                                                             labels=ids)
    assert ours.logits.shape == (2, N + 5, tiny.VOCAB)  # the virtual positions are kept, as PEFT's
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-6, rtol=0)
    base = tiny.build_llama16()(input_ids=ids, attention_mask=mask).logits
    assert (ours.logits[:, N:] - base).abs().max() > 1e-3  # the prompt does change the outputs


def test_sequence_classifier_equals_peft(batch):
    ids, mask = batch
    types = torch.zeros_like(ids)
    types[:, 3:] = 1
    model = tiny.build_bert()
    paretune.adapt(model, "prompt-tuning", num_virtual_tokens=N)
    twin = peft_twin(tiny.build_bert, "SEQ_CLS", model)
    ours = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    theirs = twin(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert ours.shape == (2, 3)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_inputs_embeds_and_default_position_ids_give_the_same_outputs(batch):
    ids, mask = batch
    model = tiny.build_llama16()
    paretune.adapt(model, "prompt-tuning", num_virtual_tokens=N)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        embeds = model.get_input_embeddings().base(ids)
        via_embeds = model(inputs_embeds=embeds, attention_mask=mask).logits
        positional = model(ids, mask).logits  # positional arguments are bound by name
        with_pos = model(input_ids=ids, position_ids=torch.arange(5).expand(2, 5)).logits
        without_pos = model(input_ids=ids).logits
    torch.testing.assert_close(via_embeds, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(positional, ref, atol=0, rtol=0)
    torch.testing.assert_close(with_pos, without_pos, atol=1e-6, rtol=0)


def test_the_embedding_called_alone_is_unchanged(batch):
    ids, _ = batch
    model = tiny.build_llama16()
    paretune.adapt(model, "prompt-tuning", num_virtual_tokens=N)
    emb = model.get_input_embeddings()
    torch.testing.assert_close(emb(ids), emb.base(ids), atol=0, rtol=0)


# -- init and counts -------------------------------------------------------------------------------

def test_count_is_n_times_d():
    model = tiny.build_llama16()
    paretune.adapt(model, "prompt-tuning", num_virtual_tokens=7)
    cost = paretune.count(model)
    assert cost["trainable"] == cost["formula"] == 7 * 16
    assert cost["stored_bytes"] == 4 * 7 * 16
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "model.embed_tokens.deltas.default.prompt"]


def test_random_init_is_seeded_standard_normal():
    a, b, c = (tiny.build_llama16() for _ in range(3))
    paretune.adapt(a, "prompt-tuning", num_virtual_tokens=N, seed=4)
    paretune.adapt(b, "prompt-tuning", num_virtual_tokens=N, seed=4)
    paretune.adapt(c, "prompt-tuning", num_virtual_tokens=N, seed=5)
    expected = torch.randn(N, 16, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(delta_of(a).prompt.detach(), expected, atol=0, rtol=0)
    assert torch.equal(delta_of(a).prompt, delta_of(b).prompt)
    assert not torch.equal(delta_of(a).prompt, delta_of(c).prompt)


def test_sample_vocab_init_copies_rows_of_the_embedding():
    model = tiny.build_llama16()
    paretune.adapt(model, "prompt-tuning", num_virtual_tokens=N, init="sample_vocab", seed=2)
    rows = torch.randint(0, tiny.VOCAB, (N,), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(delta_of(model).prompt.detach(), model.get_input_embeddings().weight[rows].detach(),
                               atol=0, rtol=0)


def test_text_init_repeats_the_texts_tokens_up_to_n(monkeypatch):
    import transformers

    class FakeTokenizer:
        def __call__(self, text):
            return {"input_ids": [7, 11]}

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", staticmethod(lambda name: FakeTokenizer()))
    model = tiny.build_llama16()
    paretune.adapt(model, "prompt-tuning", num_virtual_tokens=5, init="text", init_text="classify", tokenizer="t")
    w = model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(delta_of(model).prompt.detach(), w[[7, 11, 7, 11, 7]], atol=0, rtol=0)


def test_default_target_is_the_input_embedding():
    assert default_targets(tiny.build_llama16()) == ["model.embed_tokens"]
    assert default_targets(tiny.build_bert()) == ["bert.embeddings.word_embeddings"]
    with pytest.raises(TargetError, match="targets="):
        default_targets(nn.Sequential(nn.Embedding(4, 3)))


# -- the adapter's life ----------------------------------------------------------------------------

def test_inactive_removed_and_unloaded_adapters_give_the_base(batch):
    ids, mask = batch
    base = tiny.build_llama16()(input_ids=ids, attention_mask=mask).logits
    model = tiny.build_llama16()
    paretune.adapt(model, "prompt-tuning", num_virtual_tokens=N)
    paretune.set_active(model, [])
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, base, atol=0, rtol=0)
    paretune.set_active(model, "default")
    paretune.remove(model, "default")
    assert tiny.hooks_of(model) == 0
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, base, atol=0, rtol=0)
    paretune.adapt(model, "prompt-tuning", num_virtual_tokens=N)
    paretune.unload(model)
    assert tiny.hooks_of(model) == 0 and not any(isinstance(m, Host) for m in model.modules())
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, base, atol=0, rtol=0)


def test_save_load_gives_the_same_outputs(batch, tmp_path):
    ids, mask = batch
    model = tiny.build_llama16()
    paretune.adapt(model, "prompt-tuning", num_virtual_tokens=N, seed=3)
    with torch.no_grad():
        delta_of(model).prompt.mul_(2.0)  # as if trained
    paretune.save(model, tmp_path / "a")
    fresh = tiny.build_llama16()
    paretune.load(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(input_ids=ids, attention_mask=mask).logits,
                               model(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)


def test_gradients_reach_the_prompt_only(batch):
    ids, mask = batch
    model = tiny.build_llama16()
    paretune.adapt(model, "prompt-tuning", num_virtual_tokens=N)
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"model.embed_tokens.deltas.default.prompt"}
    assert delta_of(model).prompt.grad.abs().sum() > 0


def test_generation_equals_greedy_decoding_without_cache(batch):
    ids, _ = batch
    model = tiny.build_llama16()
    paretune.adapt(model, "prompt-tuning", num_virtual_tokens=N)
    with torch.no_grad():
        delta_of(model).prompt.mul_(20.0)  # large enough to change the greedy tokens
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        x = ids
        for _ in range(4):
            logits = model(input_ids=x, use_cache=False).logits
            x = torch.cat([x, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        base = tiny.build_llama16().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                             do_sample=False)
    assert torch.equal(out, x)
    assert not torch.equal(out, base)


# -- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("options,match", [
    ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
    ({"init": "zeros"}, "init"),
    ({"init": "text"}, "init_text"),
    ({"init": "text", "init_text": "hello"}, "tokenizer"),
])
def test_bad_options_are_refused_and_leave_the_model(options, match):
    model = tiny.build_llama16()
    with pytest.raises(ConfigError, match=match):
        paretune.adapt(model, "prompt-tuning", **options)
    assert paretune.adapters(model) == {} and tiny.hooks_of(model) == 0
    assert not any(isinstance(m, Host) for m in model.modules())
    assert PromptTuningConfig().num_virtual_tokens == 20


def test_an_embedding_outside_a_transformers_model_is_refused():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    with pytest.raises(TargetError, match="input_ids"):
        paretune.adapt(model, "prompt-tuning", targets=["0"])
    assert not any(isinstance(m, Host) for m in model.modules())


def test_merge_is_refused():
    model = tiny.build_llama16()
    paretune.adapt(model, "prompt-tuning", num_virtual_tokens=N)
    with pytest.raises(ParetuneError, match="cannot be merged"):
        paretune.merge(model)
