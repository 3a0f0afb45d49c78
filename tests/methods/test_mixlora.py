"""MixLoRA (Li et al. 2024): LoRA experts in each feed-forward block, a top-k router, a load-balance
loss, LoRA on the attention projections. Checked against independent computations: the routed
mixture of expert FFNs written out token by token (Llama, GPT-2, BERT's two-module FFN), the
load-balance loss on a hand batch, the counts by hand; zero start on three architectures; the loss
reaches the trainer's metrics; training evens the expert load; save / load; bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import paretune
from paretune.core.host import Host
from paretune.errors import ConfigError, ParetuneError, TargetError
from paretune.methods.mixlora import MixLoraConfig, MixLoraDelta, default_targets

import tiny_transformers as tiny

E, K, R = 4, 2, 2


def moved(model: nn.Module, seed: int = 7, scale: float = 0.3) -> nn.Module:
    """Every trainable number moved at random (B no longer zero)."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def routed(x: torch.Tensor, router: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(experts (N, k), weights (N, k)): the top-k logits and a softmax over those k alone."""
    logits = x @ router.T
    top, idx = logits.topk(k, dim=-1)
    return idx, top.softmax(dim=-1)


def lora(h: torch.Tensor, delta, key: str, e: int) -> torch.Tensor:
    return delta.scaling * (h @ delta.lora_A[key][e].T) @ delta.lora_B[key][e].T


def ids(n: int = 6, seed: int = 3) -> torch.Tensor:
    return tiny.token_ids(n, seed)


# -- zero start, and the mixture against a direct computation -----------------------------------------
@pytest.mark.parametrize("build", [tiny.build_llama16, tiny.build_gpt2, tiny.build_bert])
def test_zero_start_is_exactly_the_base(build):
    base, model = build(), build()
    paretune.adapt(model, "mixlora", r=R, num_experts=E, top_k=K)
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, base(ids()).logits)
    moved(model)
    with torch.no_grad():
        assert not torch.allclose(model(ids()).logits, base(ids()).logits, atol=1e-4)


def test_llama_block_is_the_routed_mixture_of_expert_ffns():
    model = tiny.build_llama16().double()
    paretune.adapt(model, "mixlora", r=R, num_experts=E, top_k=K, alpha=3.0)
    moved(model)
    host = model.model.layers[0].mlp
    mlp, delta = host.base, host.deltas["default"]
    x = torch.randn(2, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = host(x)
        idx, w = routed(x.reshape(-1, 16), delta.router, K)
        want = torch.zeros(10, 16, dtype=torch.float64)
        for n, row in enumerate(x.reshape(-1, 16)):
            for j in range(K):
                e = int(idx[n, j])
                gate = row @ mlp.gate_proj.weight.T + lora(row, delta, "gate_proj", e)
                up = row @ mlp.up_proj.weight.T + lora(row, delta, "up_proj", e)
                h = F.silu(gate) * up
                want[n] += w[n, j] * (h @ mlp.down_proj.weight.T + lora(h, delta, "down_proj", e))
    torch.testing.assert_close(got, want.view(2, 5, 16), rtol=1e-10, atol=1e-10)


def test_gpt2_block_is_the_routed_mixture_of_expert_ffns():
    model = tiny.build_gpt2().double()
    paretune.adapt(model, "mixlora", r=R, num_experts=E, top_k=K)
    moved(model)
    host = model.transformer.h[0].mlp
    mlp, delta = host.base, host.deltas["default"]
    x = torch.randn(7, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = host(x)
        idx, w = routed(x, delta.router, K)
        want = torch.zeros(7, 16, dtype=torch.float64)
        for n, row in enumerate(x):
            for j in range(K):
                e = int(idx[n, j])
                h = mlp.act(row @ mlp.c_fc.weight + mlp.c_fc.bias + lora(row, delta, "c_fc", e))
                want[n] += w[n, j] * (h @ mlp.c_proj.weight + mlp.c_proj.bias + lora(h, delta, "c_proj", e))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_bert_ffn_spans_intermediate_and_output_dense():
    model = tiny.build_bert().double()
    paretune.adapt(model, "mixlora", r=R, num_experts=E, top_k=K)
    moved(model)
    layer = model.bert.encoder.layer[0]
    first, second = layer.intermediate, layer.output.dense
    assert isinstance(first, Host) and first.kind == "block" and isinstance(second, Host)
    d1, d2 = first.deltas["default"], second.deltas["default"]
    assert (d1.role, d2.role) == ("first", "second")
    assert layer.attention.output.dense.deltas["default"].role == "lora"
    x = torch.randn(2, 3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h = first(x)
        torch.testing.assert_close(h, first.base(x))  # the intermediate's own output is unchanged
        got = second(h)
        W1, b1 = first.base.dense.weight, first.base.dense.bias
        W2, b2 = second.base.weight, second.base.bias
        idx, w = routed(x.reshape(-1, 16), d1.router, K)
        want = torch.zeros(6, 16, dtype=torch.float64)
        for n, row in enumerate(x.reshape(-1, 16)):
            for j in range(K):
                e = int(idx[n, j])
                he = F.gelu(row @ W1.T + b1 + lora(row, d1, "dense", e))
                want[n] += w[n, j] * (he @ W2.T + b2 + lora(he, d2, "dense", e))
    torch.testing.assert_close(got, want.view(2, 3, 16), rtol=1e-10, atol=1e-10)
    assert not d1.bank.mailbox  # handed over and consumed


def test_attention_projections_get_plain_lora():
    from paretune.methods.lora import LoraDelta

    model = tiny.build_llama16()
    paretune.adapt(model, "mixlora", r=R, attn_r=3, alpha=6.0, num_experts=E)
    part = model.model.layers[0].self_attn.q_proj.deltas["default"].part
    assert isinstance(part, LoraDelta) and part.A.shape == (3, 16) and part.scaling == 2.0


# -- the load-balance loss ---------------------------------------------------------------------------
def test_aux_loss_equals_the_formula_on_a_hand_batch():
    model = tiny.build_llama16()
    paretune.adapt(model, "mixlora", r=R, num_experts=4, top_k=2, aux_loss_coef=0.5)
    host = model.model.layers[0].mlp
    delta = host.deltas["default"]
    router = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]
    tokens = [[2.0, 1.0], [1.0, 2.0], [-1.0, 0.5]]
    with torch.no_grad():
        delta.router.zero_()
        delta.router[:, :2] = torch.tensor(router)
    x = torch.zeros(1, 3, 16)
    x[0, :, :2] = torch.tensor(tokens)
    model.train()
    host(x)
    got = delta.aux_loss()
    # by hand: p = softmax(router·x) per token, each token's two largest p, then E·Σ f_e·P_e
    f, P = [0.0] * 4, [0.0] * 4
    for t in tokens:
        z = [r[0] * t[0] + r[1] * t[1] for r in router]
        p = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
        for e in sorted(range(4), key=lambda i: -p[i])[:2]:
            f[e] += 1 / 3
        for e in range(4):
            P[e] += p[e] / 3
    want = 0.5 * 4 * sum(a * b for a, b in zip(f, P)) / 2  # averaged over the model's two routed layers
    assert got is not None and got.requires_grad
    assert float(got.detach()) == pytest.approx(want, rel=1e-6)
    assert delta.aux_loss() is None  # returned once, then forgotten
    assert delta.load.tolist() == pytest.approx([2 / 6, 3 / 6, 1 / 6, 0.0])  # slots: (0, 1), (1, 0), (2, 1)
    model.eval()
    host(x)
    assert delta.aux_loss() is None  # only built while training


# -- training: the loss reaches the trainer, the load evens out ----------------------------------------
def load_cv(model: nn.Module, batch: dict) -> float:
    """Coefficient of variation (std / mean) of the fraction of routed slots per expert, over the
    real (unpadded) tokens of ``batch``, averaged over the routed layers."""
    model.eval()
    cvs = []
    keep = batch["attention_mask"].reshape(-1).bool()
    for _, h in model.named_modules():
        if isinstance(h, Host) and h.kind == "block":
            delta = h.deltas["default"]
            x = []
            handle = h.register_forward_pre_hook(lambda m, a, kw: x.append(a[0] if a else kw["hidden_states"]),
                                                 with_kwargs=True)
            with torch.no_grad():
                model(**batch)
                handle.remove()
                idx, _ = routed(x[0].reshape(-1, x[0].shape[-1])[keep], delta.router, delta.config.top_k)
            load = torch.bincount(idx.reshape(-1), minlength=delta.config.num_experts).float()
            cvs.append(float(load.std(unbiased=False) / load.mean()))
    return sum(cvs) / len(cvs)


def _train_bert(coef: float, steps: int = 30):
    """A tiny BERT classifier with MixLoRA (E = 4, k = 2, r = 2) trained ``steps`` steps on the
    colour pairs; (load CV before, load CV after, the training result)."""
    from paretune.training import train

    tok, data = tiny.minilm_tokenizer(), tiny.COLOURS
    model = tiny.build_bert(vocab=tok.vocab_size)
    paretune.adapt(model, "mixlora", r=R, num_experts=E, top_k=K, aux_loss_coef=coef)
    batch = dict(tok([d["text"] for d in data], return_tensors="pt", padding=True))
    batch.pop("token_type_ids", None)
    before = load_cv(model, batch)
    result = train(model, data, tokenizer=tok, steps=steps, batch_size=16, lr=1e-2, progress=False)
    return before, load_cv(model, batch), result


def test_training_logs_the_aux_loss_and_evens_the_expert_load():
    steps = 30
    before, after, result = _train_bert(0.01, steps)
    print(f"mixlora expert load CV on a tiny BERT: {before:.3f} before, {after:.3f} after {steps} steps; "
          f"aux loss {result.aux_history[0]:.5f} -> {result.aux_history[-1]:.5f}")
    assert len(result.aux_history) == steps
    # one routed layer: 0.01·E·Σ f_e·P_e, k·0.01 = 0.02 for a balanced router, at most 0.01·E (f_e <= 1, Σ P_e = 1)
    assert all(0 < a <= 0.01 * E for a in result.aux_history)
    assert result.aux_history[-1] == pytest.approx(0.02, abs=2e-3)
    assert result.metrics["aux_loss"] == pytest.approx(sum(result.aux_history[-10:]) / 10)
    assert after < 0.75 * before


@pytest.mark.slow
def test_without_the_aux_loss_the_load_collapses():
    _, balanced, _ = _train_bert(0.01)
    before, collapsed, result = _train_bert(0.0)
    print(f"mixlora expert load CV after 30 steps: {balanced:.3f} with the aux loss, {collapsed:.3f} without "
          f"(start {before:.3f})")
    assert result.aux_history == [0.0] * 30
    assert collapsed > before and balanced < 0.5 * collapsed


# -- counts, save / load, refusals -----------------------------------------------------------------
def test_counts_equal_the_formula_by_hand():
    model = tiny.build_llama16()  # d 16, FFN 32, k/v 8 wide, 2 layers
    paretune.adapt(model, "mixlora", r=R, num_experts=E, attn_r=3)
    ffn = E * R * ((16 + 32) + (16 + 32) + (32 + 16)) + 16 * E
    attn = 3 * ((16 + 16) + (16 + 8) + (16 + 8) + (16 + 16))
    c = paretune.count(model)
    assert c["trainable"] == c["formula"] == 2 * (ffn + attn)

    bert = tiny.build_bert()  # d 16, intermediate 32, 1 layer
    paretune.adapt(bert, "mixlora", r=R, num_experts=E, attn_r=0)
    c = paretune.count(bert)
    assert c["trainable"] == c["formula"] == E * R * (16 + 32) * 2 + 16 * E


def test_save_load_round_trip(tmp_path):
    model = moved(paretune.adapt(tiny.build_bert(), "mixlora", r=R, num_experts=E))
    paretune.save(model, tmp_path / "a")
    fresh = paretune.load(tiny.build_bert(), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids()).logits, model(ids()).logits, rtol=0, atol=0)


def test_default_targets_per_family():
    cfg = MixLoraConfig()
    assert "mlp" in default_targets(tiny.build_llama16(), cfg)
    llama = paretune.adapt(tiny.build_llama16(), "mixlora", r=R, num_experts=E)
    assert isinstance(llama.model.layers[1].mlp, Host) and isinstance(llama.model.layers[1].self_attn.o_proj, Host)
    gpt2 = paretune.adapt(tiny.build_gpt2(), "mixlora", r=R, num_experts=E, attn_r=0)
    assert isinstance(gpt2.transformer.h[0].mlp, Host) and not isinstance(gpt2.transformer.h[0].attn.c_attn, Host)
    with pytest.raises(TargetError, match="targets="):
        default_targets(nn.Sequential(nn.Linear(4, 4)), cfg)


@pytest.mark.parametrize("options, option", [
    ({"top_k": 3, "num_experts": 2}, "top_k"),
    ({"top_k": 0}, "top_k"),
    ({"num_experts": 0}, "num_experts"),
    ({"attn_r": -1}, "attn_r"),
    ({"aux_loss_coef": -0.1}, "aux_loss_coef"),
    ({"r": 0}, "r"),
])
def test_bad_options_are_refused_and_the_model_is_unchanged(options, option):
    model, base = tiny.build_llama16(), tiny.build_llama16()
    with pytest.raises(ConfigError, match=option):
        paretune.adapt(model, "mixlora", **options)
    assert not any(isinstance(m, Host) for m in model.modules())
    assert str(model) == str(base)


def test_bad_targets_are_refused_and_the_model_is_unchanged():
    bert = tiny.build_bert()
    with pytest.raises(TargetError, match="intermediate"):  # one half of BERT's FFN alone
        paretune.adapt(bert, "mixlora", targets=["bert.encoder.layer.0.output.dense"])
    assert not any(isinstance(m, Host) for m in bert.modules())
    llama = tiny.build_llama16()
    with pytest.raises(TargetError, match="feed-forward"):  # an attention block is no expert block
        paretune.adapt(llama, "mixlora", targets=["model.layers.0.self_attn"])
    with pytest.raises(TargetError, match="attn_r"):
        paretune.adapt(llama, "mixlora", attn_r=0, targets=["model.layers.0.mlp", "q_proj"])
    assert not any(isinstance(m, Host) for m in llama.modules())


def test_merge_and_per_sample_are_refused():
    model = paretune.adapt(tiny.build_llama16(), "mixlora", r=R, num_experts=E)
    with pytest.raises(ParetuneError, match="cannot be merged"):
        paretune.merge(model, "default")
    with pytest.raises(ParetuneError, match="per-sample"):
        with paretune.per_sample(model, ["default", None]):
            model(ids())


def test_delta_is_not_mergeable():
    assert MixLoraDelta.mergeable is False
