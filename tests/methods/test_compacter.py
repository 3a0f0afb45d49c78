"""Compacter / Compacter++: the PHM weight against an explicit sum of Kronecker products, the adapted
BERT against the adapter written out by hand, the shared A (one parameter, stored once), the paper's
parameter count, placements, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import paretune
from paretune.core.host import Host
from paretune.errors import ConfigError
from paretune.methods.compacter import CompacterConfig, default_targets, phm_weight

from test_bottleneck import build_bert, build_llama, logits, randomize  # noqa: F401 (ids fixture below)


@pytest.fixture
def ids():
    return torch.randint(2, 50, (3, 7), generator=torch.Generator().manual_seed(1))


def deltas(model):
    return {n: m.deltas["default"] for n, m in model.named_modules() if isinstance(m, Host)}


def kron_sum(a, s, t):
    """Σ_i A_i ⊗ (s_i t_iᵀ) with torch.kron, term by term."""
    return sum(torch.kron(a[i], torch.outer(s[i], t[i])) for i in range(a.shape[0]))


def test_phm_weight_is_the_sum_of_kronecker_products():
    g = torch.Generator().manual_seed(0)
    a, s, t = torch.randn(4, 4, 4, generator=g), torch.randn(4, 3, generator=g), torch.randn(4, 5, generator=g)
    torch.testing.assert_close(phm_weight(a, s, t), kron_sum(a, s, t))


def test_compacter_pp_on_bert_matches_the_formula_by_hand(ids):
    model = build_bert(hidden=32)
    paretune.adapt(model, "compacter", bottleneck=8)
    randomize(model)
    got = logits(model, ids)
    ref = build_bert(hidden=32)
    found = deltas(model)
    assert list(found) == ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]
    for i, layer in enumerate(ref.bert.encoder.layer):
        d = {k: v.detach() for k, v in found[f"bert.encoder.layer.{i}.output.dense"].named_parameters()}
        a = d["bank.phm_rule"] if "bank.phm_rule" in d else found["bert.encoder.layer.0.output.dense"].phm_rule.detach()
        w_down = kron_sum(a, d["down_s"], d["down_t"])  # (m, d)
        w_up = kron_sum(a, d["up_s"], d["up_t"])  # (d, m)
        out = layer.output

        def hook(module, args, result, out=out, d=d, w_down=w_down, w_up=w_up):
            h, residual = args
            dense = out.dense(h)
            adapter = F.gelu(dense @ w_down.T + d["down_bias"]) @ w_up.T + d["up_bias"]
            return F.layer_norm(dense + adapter + residual, out.LayerNorm.normalized_shape, out.LayerNorm.weight,
                                out.LayerNorm.bias, out.LayerNorm.eps)

        out.register_forward_hook(hook)
    want = logits(ref, ids)
    assert (want - logits(build_bert(hidden=32), ids)).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_zero_start_init_and_the_shared_a(ids):
    model = build_llama()
    paretune.adapt(model, "compacter", targets=default_targets(model, CompacterConfig(variant="compacter")),
                   variant="compacter", phm_dim=2, reduction_factor=4, seed=3)
    torch.testing.assert_close(logits(model, ids), logits(build_llama(), ids), atol=0, rtol=0)
    ds = list(deltas(model).values())
    assert len(ds) == 4  # attention and FFN of two layers
    rule = ds[0].phm_rule
    assert all(d.phm_rule is rule for d in ds) and rule.requires_grad
    expected = torch.randn(2, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.01
    torch.testing.assert_close(rule.detach(), expected.float())
    for d in ds:
        assert torch.count_nonzero(d.up_s) == 0 and torch.count_nonzero(d.up_bias) == 0
        assert torch.count_nonzero(d.down_bias) == 0
        assert d.down_t.abs().max() <= (6 / (16 // 2 + 1)) ** 0.5  # glorot-uniform of a (d/n × 1) factor
    # the shared A is stored once, with the first module
    assert "phm_rule" in ds[0].stored_state() and all("phm_rule" not in d.stored_state() for d in ds[1:])


def test_paper_parameter_count():
    """Per adapted module 2(m + d) rank-one PHM weights + (m + d) biases; n³ for the shared A, once."""
    model = build_bert(hidden=32)
    cfg = CompacterConfig(variant="compacter", reduction_factor=4)
    paretune.adapt(model, "compacter", targets=default_targets(model, cfg), variant="compacter", reduction_factor=4)
    d, m, n, modules = 32, 8, 4, 4
    paper = 2 * (m + d) * modules + n ** 3  # the paper's 4L(k + d) + n³ for L = 2 layers
    assert paper == 4 * 2 * (m + d) + n ** 3
    cost = paretune.count(model)
    assert cost["trainable"] == cost["formula"] == paper + (m + d) * modules == 544


def test_gradients_reach_a_and_save_load_round_trips(ids, tmp_path):
    model = build_llama()
    paretune.adapt(model, "compacter", targets=default_targets(model, CompacterConfig(variant="compacter")),
                   variant="compacter", reduction_factor=4)
    randomize(model)
    model.train()
    model(ids).logits.square().mean().backward()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(n.endswith("phm_rule") for n in names) == 1
    for n, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) if p.requires_grad else p.grad is None, n
    model.eval()
    expected = logits(model, ids)
    paretune.save(model, tmp_path / "c")
    fresh = build_llama()
    paretune.load(fresh, tmp_path / "c")
    torch.testing.assert_close(logits(fresh, ids), expected, atol=1e-6, rtol=0)


def test_default_targets_per_variant():
    model = build_llama()
    assert default_targets(model) == default_targets(model, CompacterConfig())
    paretune.adapt(model, "compacter", targets=default_targets(model, CompacterConfig(variant="compacter")),
                   variant="compacter", reduction_factor=4)
    assert paretune.adapters(model)["default"].targets == [
        "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]


@pytest.mark.parametrize("options, match", [
    ({"phm_dim": 3}, "phm_dim=3 does not divide the adapted width 16"),
    ({"reduction_factor": 32}, "leaves a bottleneck of 0 for the width 16"),
    ({"reduction_factor": 8}, "leaves a bottleneck of 2 for the width 16, less than phm_dim=4"),
    ({"bottleneck": 6}, "bottleneck=6 is invalid; it must be divisible by phm_dim=4"),
    ({"variant": "compacter+"}, "variant"),
])
def test_bad_input_is_a_config_error_and_leaves_the_model(options, match, ids):
    model = build_llama()
    with pytest.raises(ConfigError, match=match):
        paretune.adapt(model, "compacter", **options)
    assert not any(isinstance(m, Host) for m in model.modules()) and paretune.adapters(model) == {}
    torch.testing.assert_close(logits(model, ids), logits(build_llama(), ids), atol=0, rtol=0)


def test_the_compacter_variant_chooses_attention_and_feed_forward():
    model = build_llama()
    paretune.adapt(model, "compacter", variant="compacter", reduction_factor=4)
    names = paretune.adapters(model)["default"].targets
    assert sorted({t.rsplit(".", 1)[1] for t in names}) == ["down_proj", "o_proj"] and len(names) == 4


