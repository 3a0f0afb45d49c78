"""merge_adapters: several adapters of one base become one LoRA adapter (truncated SVD of the
merged task vector). The references are computed here from the adapters' own tensors (B·A·s,
W·(l − 1)) and applied to a fresh copy of the base's weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import paretune
from paretune.errors import AdapterFileError, ConfigError, ParetuneError
from paretune.merging.adapters import merge_adapters
from paretune.merging.methods import METHODS

VOCAB = 50
IDS = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def build_llama(seed: int = 0, intermediate: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(cfg).float().eval()


def build_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # GPT-2 starts with zero biases, which IA3 would leave at zero
        for n, p in model.named_parameters():
            if n.endswith("attn.bias") or n.endswith(".bias"):
                p.normal_(0, 0.1)
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def deltas_of(model, name):
    """{layer: delta module} of adapter ``name``."""
    return {n: m.deltas[name] for n, m in model.named_modules() if hasattr(m, "deltas") and name in m.deltas}


def lora_tv(model, name):
    """ΔW = (alpha / r)·B·A of a LoRA adapter, per layer, in float64, from its parameters."""
    out = {}
    for layer, d in deltas_of(model, name).items():
        cfg = d.config
        out[layer] = (cfg.alpha / cfg.r) * d.B.detach().double() @ d.A.detach().double()
    return out


def ia3_tv(model, base, name):
    """IA3's ΔW = W·(l − 1) (rows for keys / values, columns for a feed-forward input)."""
    out = {}
    for layer, d in deltas_of(model, name).items():
        w = base.get_submodule(layer).weight.detach().double()
        l = d.l.detach().double() - 1
        out[layer] = w * (l[None, :] if layer.endswith("down_proj") else l[:, None])
    return out


def with_changes(base, dws, dbs=None, conv1d=False):
    """``base`` with W += ΔW (and b += Δb) on the named Linear (or GPT-2 Conv1D) layers."""
    with torch.no_grad():
        for layer, dw in dws.items():
            m = base.get_submodule(layer)
            m.weight += (dw.T if conv1d else dw).to(m.weight.dtype)
        for layer, db in (dbs or {}).items():
            m = base.get_submodule(layer)
            m.bias += db.to(m.bias.dtype)
    return base


def three_loras_and_ia3():
    """Three random LoRAs on overlapping targets (one with alpha != r) and an IA3 with random l."""
    model = build_llama()
    paretune.adapt(model, "lora", name="a", r=2, targets=["q_proj", "v_proj"], init="random")
    paretune.adapt(model, "lora", name="b", r=3, alpha=6.0, targets=["v_proj", "o_proj"], init="random")
    paretune.adapt(model, "lora", name="c", r=2, targets=["o_proj", "up_proj"], init="random")
    paretune.adapt(model, "ia3", name="d")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for d in deltas_of(model, "d").values():
            d.l.copy_(1 + 0.3 * torch.randn(d.l.shape, generator=g))
    return model


def all_tvs(model, names):
    base = build_llama()
    per = [ia3_tv(model, base, n) if n == "d" else lora_tv(model, n) for n in names]
    layers = [n for n, _ in model.named_modules() if any(n in p for p in per)]
    return layers, per


def reference(model, names, fn, lam=1.0, **kw):
    """{layer: lam · fn([ΔW_i (0 where i does not adapt the layer)])} in model order."""
    layers, per = all_tvs(model, names)
    out = {}
    for layer in layers:
        shape = next(p[layer] for p in per if layer in p).shape
        tvs = [p.get(layer, torch.zeros(shape, dtype=torch.float64)).float() for p in per]
        out[layer] = lam * fn(tvs, **kw).double()
    return out


def test_exact_task_arithmetic_of_loras_and_ia3_equals_the_formula():
    model = three_loras_and_ia3()
    names, w, lam = ["a", "b", "c", "d"], [0.5, 1.0, -0.3, 0.8], 0.9
    layers, per = all_tvs(model, names)
    expected = {}
    for layer in layers:  # lam · Σ w_i ΔW_i, written out
        expected[layer] = lam * sum(wi * p[layer] for wi, p in zip(w, per) if layer in p)
    report = merge_adapters(model, names, method="task_arithmetic", weights=w, lam=lam, progress=False)
    assert paretune.active(model) == ["merged"]
    assert paretune.adapters(model)["merged"].method == "lora"
    assert list(report["layers"]) == layers
    torch.testing.assert_close(logits(model), logits(with_changes(build_llama(), expected)), atol=2e-5, rtol=0)
    # exact: the largest numerical rank, each layer reproduced
    ranks = {}
    for layer, dw in expected.items():
        s = np.linalg.svd(dw.numpy(), compute_uv=False)
        ranks[layer] = int((s > s[0] * max(dw.shape) * np.finfo(np.float32).eps).sum())
        assert report["layers"][layer]["numerical_rank"] == ranks[layer]
        assert report["layers"][layer]["rel_error"] < 1e-6
    assert report["rank"] == max(ranks.values()) and report["exact"]
    assert report["max_rel_error"] < 1e-6
    # the inputs stay, unchanged and switched off
    paretune.set_active(model, ["a"])
    paretune.adapt(ref := build_llama(), "lora", name="a", r=2, targets=["q_proj", "v_proj"])
    with torch.no_grad():
        for layer, d in deltas_of(model, "a").items():
            ref.get_submodule(layer).deltas["a"].A.copy_(d.A)
            ref.get_submodule(layer).deltas["a"].B.copy_(d.B)
    torch.testing.assert_close(logits(model), logits(ref), atol=0, rtol=0)


@pytest.mark.parametrize("method,kw", [("ties", {"density": 0.5}), ("weighted_average", {}),
                                       ("pcb", {"ratio": 0.3}), ("ties", {"density": 0.3, "majority_sign": "frequency"})])
def test_exact_merge_equals_the_method_applied_to_the_task_vectors(method, kw):
    model = three_loras_and_ia3()
    names = ["a", "b", "d"]
    expected = reference(model, names, METHODS[method], lam=1.2, weights=[1.0, 0.5, 2.0], **kw)
    merge_adapters(model, names, method=method, lam=1.2, weights=[1.0, 0.5, 2.0], out_name="m", progress=False, **kw)
    torch.testing.assert_close(logits(model), logits(with_changes(build_llama(), expected)), atol=2e-5, rtol=0)


def test_dare_seed_draws_all_layers_from_one_generator_in_model_order():
    model = three_loras_and_ia3()
    g = torch.Generator().manual_seed(7)
    expected = reference(model, ["a", "c"], METHODS["dare_linear"], density=0.5, generator=g)
    merge_adapters(model, ["a", "c"], method="dare_linear", density=0.5, seed=7, progress=False)
    torch.testing.assert_close(logits(model), logits(with_changes(build_llama(), expected)), atol=2e-5, rtol=0)
    first = {k: v.A.detach().clone() for k, v in deltas_of(model, "merged").items()}
    merge_adapters(model, ["a", "c"], method="dare_ties", density=0.5, seed=7, out_name="again", progress=False)
    merge_adapters(model, ["a", "c"], method="dare_linear", density=0.5, seed=7, out_name="same", progress=False)
    for k, a in deltas_of(model, "same").items():
        assert torch.equal(a.A, first[k])


def test_truncated_rank_error_is_the_eckart_young_optimum():
    model = three_loras_and_ia3()
    names = ["a", "b", "c", "d"]
    expected = reference(model, names, METHODS["task_arithmetic"])
    report = merge_adapters(model, names, method="task_arithmetic", rank=2, progress=False)
    assert report["rank"] == 2 and not report["exact"]
    err2 = norm2 = 0.0
    truncated = 0
    for layer, dw in expected.items():
        s = np.linalg.svd(dw.numpy(), compute_uv=False)
        want = math.sqrt(float((s[2:] ** 2).sum())) / float(np.linalg.norm(dw.numpy()))
        got = report["layers"][layer]
        assert got["kept_rank"] == min(2, len(s))
        assert got["rel_error"] == pytest.approx(want, rel=1e-4, abs=1e-6)
        assert got["norm"] == pytest.approx(float(np.linalg.norm(dw.numpy())), rel=1e-6)
        err2 += float((s[2:] ** 2).sum())
        norm2 += float((s ** 2).sum())
        if (s > 1e-6 * s[0]).sum() > 2:  # the truncation is visible
            assert got["rel_error"] > 1e-3
            truncated += 1
    assert truncated >= 4
    assert report["rel_error"] == pytest.approx(math.sqrt(err2 / norm2), rel=1e-4)
    shapes = [tuple(model.get_submodule(n).weight.shape) for n in expected]
    assert report["trainable"] == sum(2 * (o + i) for o, i in shapes)
    assert report["trainable"] == paretune.count(model, "merged")["trainable"]


def test_merged_adapter_saves_and_loads(tmp_path):
    model = three_loras_and_ia3()
    merge_adapters(model, ["a", "b", "d"], method="ties", density=0.5, rank=3, progress=False)
    want = logits(model)
    paretune.save(model, tmp_path / "merged", name="merged")
    fresh = paretune.load(build_llama(), tmp_path / "merged")
    torch.testing.assert_close(logits(fresh), want, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for d in deltas_of(fresh, "merged").values() for p in d.parameters())


def test_saved_folders_are_loaded_merged_and_removed_again(tmp_path):
    model = three_loras_and_ia3()
    paretune.save(model, tmp_path / "a", name="a")
    paretune.save(model, tmp_path / "d", name="d")
    merge_adapters(model, ["a", "d"], method="ties", density=0.4, out_name="by_name", progress=False)
    want = logits(model)
    fresh = build_llama()
    report = merge_adapters(fresh, [tmp_path / "a", str(tmp_path / "d")], method="ties", density=0.4, progress=False)
    assert list(paretune.adapters(fresh)) == ["merged"]
    assert report["adapters"] == [str(tmp_path / "a"), str(tmp_path / "d")]
    torch.testing.assert_close(logits(fresh), want, atol=1e-6, rtol=0)


def _state(model):
    return ({n: (i.method, i.active, i.merged) for n, i in paretune.adapters(model).items()},
            [n for n, p in model.named_parameters() if p.requires_grad])


def test_errors_name_the_problem_and_leave_the_model_alone(tmp_path):
    model = three_loras_and_ia3()
    other = build_llama(intermediate=48)
    paretune.adapt(other, "lora", name="wide", targets=["up_proj"])
    paretune.save(other, tmp_path / "wide", name="wide")
    paretune.adapt(model, "prefix-tuning", name="p", num_virtual_tokens=2)
    paretune.set_active(model, ["a", "b"])
    before = _state(model)
    cases = [
        (ParetuneError, "no adapter named 'zz'", dict(names=["a", "zz"], method="task_arithmetic")),
        (ConfigError, "no weight change", dict(names=["a", "p"], method="task_arithmetic")),
        (AdapterFileError, "another base model", dict(names=["a", tmp_path / "wide"], method="task_arithmetic")),
        (ConfigError, "unknown merge method 'tie'.*'ties'", dict(names=["a", "b"], method="tie")),
        (ConfigError, "rank=0", dict(names=["a", "b"], method="ties", rank=0)),
        (ConfigError, "rank=True", dict(names=["a", "b"], method="ties", rank=True)),
        (ConfigError, "no option 'dnesity'", dict(names=["a", "b"], method="ties", dnesity=0.3)),
        (ConfigError, "needs density=", dict(names=["a", "b"], method="dare_linear")),
        (ConfigError, "density", dict(names=["a", "b"], method="ties", density=1.5)),
        (ConfigError, "one number per adapter", dict(names=["a", "b"], method="ties", weights=[1.0])),
        (ConfigError, "more than once", dict(names=["a", "a"], method="ties")),
        (ConfigError, "non-empty list", dict(names=[], method="ties")),
        (ParetuneError, "already has an adapter named 'b'", dict(names=["a", "c"], method="ties", out_name="b")),
        (ConfigError, "bias=", dict(names=["a", "b"], method="ties", bias="keep")),
    ]
    for exc, match, kw in cases:
        with pytest.raises(exc, match=match):
            merge_adapters(model, progress=False, **kw)
        assert _state(model) == before, match
    paretune.set_active(model, ["a", "b", "c", "d"])
    paretune.merge(model, "c")
    with pytest.raises(ParetuneError, match="unmerge"):
        merge_adapters(model, ["a", "b", "c"], method="ties", progress=False)
    with pytest.raises(ParetuneError, match=r"o_proj has adapters merged"):
        merge_adapters(model, ["a", "b"], method="ties", progress=False)
    assert "merged" not in paretune.adapters(model)


def _ia3_pair():
    model = build_gpt2()
    for name, seed in (("x", 4), ("y", 5)):
        paretune.adapt(model, "ia3", name=name)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for d in deltas_of(model, name).values():
                d.l.copy_(1 + 0.3 * torch.randn(d.l.shape, generator=g))
    return model


def _gpt2_reference(model, kw):
    """lam·ties(ΔW_i) and lam·ties(Δb_i) for GPT-2's IA3 pair (Conv1D: W as (out, in) is weight.T)."""
    base = build_gpt2()
    dws, dbs = {}, {}
    for layer in deltas_of(model, "x"):
        w = base.get_submodule(layer).weight.detach().double().T
        b = base.get_submodule(layer).bias.detach().double()
        ff = layer.endswith("mlp.c_proj")
        tv, bv = [], []
        for name in ("x", "y"):
            l = deltas_of(model, name)[layer].l.detach().double() - 1
            tv.append((w * (l[None, :] if ff else l[:, None])).float())
            bv.append((torch.zeros_like(b) if ff else b * l).float())
        dws[layer] = METHODS["ties"](tv, **kw).double()
        if not ff:
            dbs[layer] = METHODS["ties"](bv, **kw).double()
    return dws, dbs


def test_bias_changes_are_refused_kept_in_bitfit_or_dropped():
    model = _ia3_pair()
    before = _state(model)
    with pytest.raises(ParetuneError, match="change biases.*c_attn.*bias='bitfit'"):
        merge_adapters(model, ["x", "y"], method="ties", density=0.5, progress=False)
    assert _state(model) == before
    dws, dbs = _gpt2_reference(model, {"density": 0.5})
    report = merge_adapters(model, ["x", "y"], method="ties", density=0.5, bias="bitfit", progress=False)
    assert report["bias"] == {"layers": ["transformer.h.0.attn.c_attn"], "kept_as": "merged_bias"}
    assert paretune.active(model) == ["merged", "merged_bias"]
    want = logits(with_changes(build_gpt2(), dws, dbs, conv1d=True))
    torch.testing.assert_close(logits(model), want, atol=2e-5, rtol=0)
    with pytest.warns(UserWarning, match="dropped"):
        report = merge_adapters(model, ["x", "y"], method="ties", density=0.5, bias="drop", out_name="nb",
                                progress=False)
    assert report["bias"]["kept_as"] == "dropped"
    want = logits(with_changes(build_gpt2(), dws, conv1d=True))
    torch.testing.assert_close(logits(model), want, atol=2e-5, rtol=0)
