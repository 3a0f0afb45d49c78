"""PELA: truncated-SVD factorisation (Eckart–Young error), rank by energy, distillation recovery."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from paretune.compress.lowrank import (LowRankLinear, count_parameters, distill, distill_loss, factorize,
                                       factorize_linear, svd_rank)
from compress_models import tiny_llama
from paretune.errors import ConfigError, TargetError


def test_error_is_svd_tail():
    torch.manual_seed(0)
    lin = nn.Linear(20, 12)
    w = lin.weight.detach().double().numpy()
    s = np.linalg.svd(w, compute_uv=False)
    for r in (1, 4, 7):
        low = factorize_linear(lin, rank=r)
        err = np.linalg.norm(w - low.weight.detach().double().numpy()) ** 2
        np.testing.assert_allclose(err, np.sum(s[r:] ** 2), rtol=1e-4)
        x = torch.randn(3, 20)
        torch.testing.assert_close(low(x), x @ low.weight.T + lin.bias, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(low.up.bias, lin.bias)
        # the two factors carry the singular values evenly
        np.testing.assert_allclose(np.linalg.norm(low.up.weight.detach().numpy(), axis=0),
                                   np.sqrt(s[:r]), rtol=1e-4)


def test_rank_by_energy():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # squares 16, 4, 1, 1 of 22
    assert svd_rank(s, 16 / 22) == 1
    assert svd_rank(s, 0.75) == 2
    assert svd_rank(s, 0.95) == 3  # 21/22 = 0.9545
    assert svd_rank(s, 1.0) == 4
    torch.manual_seed(1)
    lin = nn.Linear(30, 30)
    sv = np.linalg.svd(lin.weight.detach().double().numpy(), compute_uv=False)
    kept = np.cumsum(sv ** 2) / np.sum(sv ** 2)
    want = int(np.argmax(kept >= 0.5)) + 1
    assert factorize_linear(lin, energy=0.5).rank == want


def test_factorize_model():
    base = tiny_llama()
    model = factorize(copy.deepcopy(base), rank=4, targets=["q_proj", "gate_proj"])
    lows = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert sorted(n.split(".")[-1] for n in lows) == ["gate_proj", "gate_proj", "q_proj", "q_proj"]
    saved = 2 * ((16 * 16 - 4 * 32) + (32 * 16 - 4 * 48))
    assert count_parameters(model) == count_parameters(base) - saved
    ids = torch.randint(2, 50, (2, 6))
    assert torch.isfinite(model(ids).logits).all()
    with pytest.warns(UserWarning, match="would not store fewer"):
        kept = factorize(copy.deepcopy(base), rank=12, targets=["q_proj"])  # 12·32 ≥ 16·16: kept
    assert not any(isinstance(m, LowRankLinear) for m in kept.modules())
    with pytest.warns(UserWarning, match="gate_proj"):  # full energy: rank 16, nothing to gain
        factorize(copy.deepcopy(base), energy=1.0, targets=["gate_proj"])


def test_bad_input():
    with pytest.raises(ConfigError, match="exactly one"):
        factorize(tiny_llama())
    with pytest.raises(ConfigError, match="exactly one"):
        factorize(tiny_llama(), rank=2, energy=0.9)
    with pytest.raises(ConfigError, match="rank"):
        factorize(tiny_llama(), rank=0)
    with pytest.raises(ConfigError, match="energy"):
        factorize(tiny_llama(), energy=1.5)
    with pytest.raises(TargetError, match="matched no Linear"):
        factorize(tiny_llama(), rank=2, targets=["nothing"])
    with pytest.raises(ConfigError, match="no LowRankLinear"):
        distill(tiny_llama(), tiny_llama(), [torch.ones(1, 3, dtype=torch.long)], steps=1)


def test_distill_loss_matches_kl_div_and_mse():
    torch.manual_seed(2)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    hs, ht = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    kl = nn.functional.kl_div(torch.log_softmax(s / 2, -1), torch.log_softmax(t / 2, -1), log_target=True,
                              reduction="sum") / 10 * 4
    mse = nn.functional.mse_loss(hs, ht)
    got = distill_loss(s, t, [hs], [ht], logit_weight=0.5, feature_weight=3.0, temperature=2.0)
    torch.testing.assert_close(got, 0.5 * kl + 3.0 * mse)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    keep = mask.bool()
    want = nn.functional.kl_div(torch.log_softmax(s[keep], -1), torch.log_softmax(t[keep], -1), log_target=True,
                                reduction="batchmean")
    torch.testing.assert_close(distill_loss(s, t, mask=mask), want)


def test_distillation_lowers_the_gap():
    teacher = tiny_llama()
    student = factorize(copy.deepcopy(teacher), rank=2)
    g = torch.Generator().manual_seed(3)
    train = [torch.randint(2, 50, (8, 12), generator=g) for _ in range(4)]
    held = torch.randint(2, 50, (8, 12), generator=g)

    def gap() -> float:
        with torch.no_grad():
            return float(distill_loss(student(held).logits, teacher(held).logits))

    before = gap()
    history = distill(student, teacher, train, steps=30, lr=1e-2, feature_layers=[1, -1], progress=False)
    after = gap()
    assert len(history) == 30 and history[-1] < history[0]
    assert after < 0.7 * before
    # only the factors trained: the embeddings are still the teacher's
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
