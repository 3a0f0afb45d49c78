"""INT2.1-style error correction: a LoRA on the quantised model trained against the float model."""

from __future__ import annotations

import copy

import pytest
import torch
from compress_models import tiny_llama

import paretune
from paretune.compress import quantize, quantized_modules
from paretune.compress.correction import correct_quantization
from paretune.compress.lowrank import distill_loss
from paretune.errors import ConfigError, ParetuneError


def _data():
    g = torch.Generator().manual_seed(5)
    train = [torch.randint(2, 50, (8, 12), generator=g) for _ in range(4)]
    held = torch.randint(2, 50, (8, 12), generator=g)
    return train, held


def test_correction_closes_the_gap_to_the_float_model():
    teacher = tiny_llama()
    student = quantize(copy.deepcopy(teacher), bits=2, group_size=16)
    codes = {n: m.packed.clone() for n, m in quantized_modules(student).items()}
    train, held = _data()

    def gap() -> float:
        with torch.no_grad():
            return float(distill_loss(student(held).logits, teacher(held).logits))

    before = gap()
    history = correct_quantization(student, teacher, train, steps=40, lr=1e-2, r=4, progress=False)
    after = gap()
    assert len(history) == 40 and history[-1] < history[0]
    assert after < 0.6 * before, (before, after)
    # the k-bit base did not move; only the adapter trained; the float teacher is untouched
    for n, m in quantized_modules(student).items():
        assert torch.equal(m.packed, codes[n])
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    # every quantised layer (2 layers x q, k, v, o, gate, up, down; the tied head is not quantised)
    # carries the rank-4 LoRA: r * (d_in + d_out) summed = 4 * 2 * (32 + 24 + 24 + 32 + 48 + 48 + 48)
    assert paretune.adapters(student)["correction"].targets == list(quantized_modules(student))
    assert paretune.count(student)["trainable"] == 4 * 2 * 256


def test_correction_starts_as_the_quantised_model():
    teacher = tiny_llama()
    student = quantize(copy.deepcopy(teacher), bits=4, group_size=16)
    _, held = _data()
    with torch.no_grad():
        want = student(held).logits
    correct_quantization(student, teacher, [held], steps=1, lr=0.0 + 1e-12, r=2, progress=False)
    paretune.set_active(student, "correction")
    with torch.no_grad():
        torch.testing.assert_close(student(held).logits, want, atol=1e-5, rtol=0)


def test_correction_refuses_bad_input():
    teacher = tiny_llama()
    _, held = _data()
    with pytest.raises(ParetuneError, match="no quantised layer"):
        correct_quantization(copy.deepcopy(teacher), teacher, [held], steps=1)
    student = quantize(copy.deepcopy(teacher), bits=4, group_size=16)
    with pytest.raises(ConfigError, match="float model"):
        correct_quantization(student, student, [held], steps=1)
    with pytest.raises(ConfigError, match="quantised too"):
        correct_quantization(student, quantize(copy.deepcopy(teacher), bits=4, group_size=16), [held], steps=1)
