"""LoRA-Mixer: the routed output and the Routing Specialization Loss against the formulas written out
by hand (loops over tokens and experts), the default attention targets, the loss reaching the
trainer's metrics, counts, save/load, the merge refusal and bad input.

PEFT has no LoRA-Mixer and the authors' code is not released, so the reference is the formula."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import paretune
from paretune.core.host import Host
from paretune.errors import ConfigError, ParetuneError, TargetError
from paretune.methods.lora_mixer import LoraMixerConfig

import tiny_transformers as tiny


def deltas(model: nn.Module) -> list:
    return [m.deltas["default"] for m in model.modules() if isinstance(m, Host)]


def single_linear(**options) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    paretune.adapt(model, "lora-mixer", targets=["0"], **options)
    delta = deltas(model)[0]
    with torch.no_grad():
        delta.B.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    return model, delta


@torch.no_grad()
def by_hand(delta, base: nn.Linear, x: torch.Tensor, sparse: bool) -> torch.Tensor:
    """W₀x + b + Σ_e g_e(x)·s·B_e A_e x, one token at a time."""
    cfg = delta.config
    rows = []
    for t in x.reshape(-1, x.shape[-1]):
        logits = torch.stack([delta.router[e] @ t for e in range(cfg.n_experts)])
        p = torch.exp(logits - logits.max())
        p = p / p.sum()
        g = p.clone()
        if sparse:
            keep = sorted(range(cfg.n_experts), key=lambda e: -float(p[e]))[: cfg.top_k]
            g = torch.tensor([float(p[e]) if e in keep else 0.0 for e in range(cfg.n_experts)])
            g = g / g.sum()
        y = base.weight @ t + base.bias
        for e in range(cfg.n_experts):
            y = y + g[e] * (cfg.alpha / cfg.r) * (delta.B[e] @ (delta.A[e] @ t))
        rows.append(y)
    return torch.stack(rows).reshape(*x.shape[:-1], -1)


def rsl_by_hand(delta, x: torch.Tensor) -> float:
    """α·Σ_i p̄_i f̄_i + λ·mean H(p): f̄ by counting each token's top-k experts."""
    cfg = delta.config
    tokens = x.reshape(-1, x.shape[-1])
    ps = []
    for t in tokens:
        logits = [float(delta.router[e] @ t) for e in range(cfg.n_experts)]
        z = sum(math.exp(v) for v in logits)
        ps.append([math.exp(v) / z for v in logits])
    counts = [0] * cfg.n_experts
    for p in ps:
        for e in sorted(range(cfg.n_experts), key=lambda i: -p[i])[: cfg.top_k]:
            counts[e] += 1
    n = len(ps)
    p_mean = [sum(p[e] for p in ps) / n for e in range(cfg.n_experts)]
    f = [c / (n * cfg.top_k) for c in counts]
    entropy = sum(-sum(v * math.log(v) for v in p) for p in ps) / n
    return cfg.balance_weight * sum(a * b for a, b in zip(p_mean, f)) + cfg.entropy_weight * entropy


def test_starts_equal_to_the_base():
    tiny.assert_starts_as_base("lora-mixer", train_atol=1e-6)


@pytest.mark.parametrize("routing,train_sparse,eval_sparse",
                         [("hard-soft", False, True), ("soft", False, False), ("top-k", True, True)])
def test_routed_output_is_the_formula(routing, train_sparse, eval_sparse):
    model, delta = single_linear(r=2, n_experts=4, top_k=2, routing=routing)
    base = nn.Linear(6, 5)
    base.load_state_dict({k.replace("base.", ""): v for k, v in model[0].state_dict().items() if "deltas" not in k})
    x = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(x), by_hand(delta, base, x, eval_sparse), atol=1e-5, rtol=0)
        model.train()
        torch.testing.assert_close(model(x), by_hand(delta, base, x, train_sparse), atol=1e-5, rtol=0)
    # top-k routing uses at most k experts per token: the eval output differs from the soft one
    if eval_sparse:
        assert (by_hand(delta, base, x, True) - by_hand(delta, base, x, False)).abs().max() > 1e-4


@pytest.mark.parametrize("entropy_weight", [0.01, 0.5, -0.3])
def test_aux_loss_is_the_routing_specialization_loss(entropy_weight):
    model, delta = single_linear(r=2, n_experts=5, top_k=2, balance_weight=0.7, entropy_weight=entropy_weight)
    x = torch.randn(2, 6, 6, generator=torch.Generator().manual_seed(2))
    model.train()
    model(x)
    aux = delta.aux_loss()
    assert aux is not None and aux.requires_grad
    assert float(aux) == pytest.approx(rsl_by_hand(delta, x), abs=1e-6)
    assert delta.aux_loss() is None  # returned once, then forgotten
    # the loss reaches the router
    model(x)
    delta.aux_loss().backward()
    assert delta.router.grad is not None and delta.router.grad.abs().sum() > 0


def test_no_aux_loss_in_eval_or_without_gradients():
    model, delta = single_linear()
    x = torch.randn(4, 6)
    model.eval()
    model(x)
    assert delta.aux_loss() is None
    model.train()
    with torch.no_grad():
        model(x)
    assert delta.aux_loss() is None


def test_default_targets_are_the_attention_projections():
    model = tiny.build_llama16()
    paretune.adapt(model, "lora-mixer")
    targets = paretune.adapters(model)["default"].targets
    assert sorted({t.rsplit(".", 1)[1] for t in targets}) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert len(targets) == 4 * len(model.model.layers)
    bert = tiny.build_bert()
    paretune.adapt(bert, "lora-mixer")
    names = paretune.adapters(bert)["default"].targets
    assert sorted(n.split("attention.", 1)[1] for n in names) == ["output.dense", "self.key", "self.query", "self.value"]
    gpt2 = tiny.build_gpt2()
    paretune.adapt(gpt2, "lora-mixer")
    assert sorted(n.split("attn.", 1)[1] for n in paretune.adapters(gpt2)["default"].targets) == ["c_attn", "c_proj"]


def test_unknown_architecture_needs_targets():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TargetError, match="targets="):
        paretune.adapt(model, "lora-mixer")
    assert not any(isinstance(m, Host) for m in model.modules())


def test_count_is_the_formula():
    model = tiny.build_llama16()
    paretune.adapt(model, "lora-mixer", r=3, n_experts=5, top_k=2)
    by_hand = 0
    for d in deltas(model):
        by_hand += 5 * 3 * (d.d_in + d.d_out) + 5 * d.d_in
    cost = paretune.count(model)
    assert cost["trainable"] == cost["formula"] == by_hand
    assert by_hand == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_save_load_round_trip(tmp_path):
    model = tiny.build_llama16()
    paretune.adapt(model, "lora-mixer", r=2)
    with torch.no_grad():
        for d in deltas(model):
            d.B.normal_(0, 0.3)
    fresh = tiny.assert_save_load_logits(model, tmp_path / "mixer", tiny.token_ids())
    assert paretune.adapters(fresh)["default"].config.n_experts == 4


def test_merge_is_refused():
    model, _ = single_linear()
    with pytest.raises(ParetuneError, match="cannot be merged"):
        paretune.merge(model)


@pytest.mark.parametrize("options", [
    {"r": 0}, {"n_experts": 0}, {"top_k": 0}, {"top_k": 5, "n_experts": 4}, {"routing": "gumbel"},
    {"balance_weight": -1.0}, {"entropy_weight": float("nan")}, {"dropout": 1.0}, {"alpha": -2.0},
])
def test_bad_options_are_config_errors(options):
    with pytest.raises(ConfigError):
        LoraMixerConfig(**options)
    model = nn.Sequential(nn.Linear(6, 5))
    with pytest.raises(ConfigError):
        paretune.adapt(model, "lora-mixer", targets=["0"], **options)
    assert isinstance(model[0], nn.Linear)


def test_training_adds_and_logs_the_loss():
    from paretune.training import train

    tok = tiny.minilm_tokenizer()
    res = train(tiny.build_bert(vocab=tok.vocab_size), tiny.COLOURS, tokenizer=tok, method="lora-mixer",
                options={"r": 2, "balance_weight": 1.0, "entropy_weight": 0.5}, steps=3, batch_size=8, lr=1e-2,
                progress=False)
    assert len(res.aux_history) == 3 and all(a > 0 for a in res.aux_history)
    assert res.metrics["aux_loss"] == pytest.approx(sum(res.aux_history) / 3)
    assert len(deltas(res.model)) == 4  # query, key, value, attention.output.dense
