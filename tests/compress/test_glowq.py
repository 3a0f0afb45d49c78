"""GlowQ: input-sharing groups, the shared-R correction, its SVD initialisation, selection, files."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from paretune.compress import quantize, quantized_modules
from paretune.compress.glowq import (GlowQGroup, GlowQLinear, glowq, glowq_parameters, glowq_report, load_glowq,
                                     save_glowq)
from paretune.compress.quantized import QuantizedLinear
from paretune.errors import AdapterFileError, ConfigError, ParetuneError, TargetError

G = 32  # quantisation group size: divides 64 and 128


def tiny_llama(seed: int = 0):
    """Random 2-layer Llama: hidden 64, 4 heads (2 KV heads: k/v out 32), MLP 128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(cfg).float().eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=32)).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=32)).eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread avoids the threading overhead of small SVDs and matmuls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


IDS = torch.randint(2, 50, (2, 9), generator=torch.Generator().manual_seed(1))


def groups(model) -> list[list[str]]:
    seen = {}
    for m in model.modules():
        if isinstance(m, GlowQLinear):
            seen.setdefault(id(m.group), m.group)
    return [g.members for g in seen.values()]


def stacked_error(float_model, names, bits=2):
    """E = [W_i − Q(W_i)] from an independent plain RTN quantisation of a copy (float64)."""
    q = quantized_modules(quantize(copy.deepcopy(float_model), bits=bits, group_size=G, progress=False))
    ws = [float_model.get_submodule(n).weight.detach().double() for n in names]
    return torch.cat(ws) - torch.cat([q[n].dequantized_weight(torch.float64) for n in names]), torch.cat(ws)


def test_groups_found_on_llama_gpt2_and_bert():
    m = glowq(tiny_llama(), bits=4, rank=4, group_size=G, progress=False)
    want = []
    for i in range(2):
        p = f"model.layers.{i}."
        want += [[p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"], [p + "self_attn.o_proj"],
                 [p + "mlp.gate_proj", p + "mlp.up_proj"], [p + "mlp.down_proj"]]
    assert groups(m) == want
    layer = m.model.layers[0]
    assert layer.self_attn.q_proj.group is layer.self_attn.v_proj.group is not layer.mlp.up_proj.group
    g2 = glowq(tiny_gpt2(), bits=4, rank=4, group_size=G, progress=False)
    assert all(len(g) == 1 for g in groups(g2)) and len(groups(g2)) == 4  # c_attn alone
    b = glowq(tiny_bert(), bits=4, rank=4, group_size=G, progress=False)
    p = "encoder.layer.0."
    assert [p + "attention.self.query", p + "attention.self.key", p + "attention.self.value"] in groups(b)


@pytest.mark.parametrize("build,rank", [(tiny_llama, 64), (tiny_gpt2, 32)])
def test_full_rank_reproduces_the_float_model(build, rank):
    base = build()
    ref = base(IDS).logits
    m = glowq(copy.deepcopy(base), bits=2, rank=rank, group_size=G, progress=False)
    assert not torch.allclose(quantize(copy.deepcopy(base), bits=2, group_size=G, progress=False)(IDS).logits, ref,
                              atol=1e-2)  # plain 2-bit RTN is far off
    floats = dict(base.named_modules())
    for name, layer in m.named_modules():
        if isinstance(layer, GlowQLinear):
            w = floats[name].weight.detach()
            w = w if isinstance(floats[name], torch.nn.Linear) else w.T  # GPT-2 Conv1D stores (in, out)
            torch.testing.assert_close(layer.corrected_weight(), w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m(IDS).logits, ref, atol=1e-4, rtol=1e-4)


def test_error_decreases_with_rank_and_matches_the_weights():
    base = tiny_llama()
    errs = []
    for r in (2, 8, 32):
        m = glowq(copy.deepcopy(base), bits=3, rank=r, group_size=G, progress=False)
        rep = glowq_report(m)
        errs.append(rep["error_after"])
        # independent: relative error of the corrected dense weights against the float ones, per group
        floats = dict(base.named_modules())
        mods = dict(m.named_modules())
        per = []
        for members in groups(m):
            w = torch.cat([floats[n].weight.detach().double() for n in members])
            c = torch.cat([mods[n].corrected_weight(torch.float64).detach() for n in members])
            per.append(float((w - c).norm() / w.norm()))
        assert rep["error_after"] == pytest.approx(sum(per) / len(per), rel=1e-4)
        assert rep["error_after"] < rep["error_before"]
    assert errs[0] > errs[1] > errs[2]


def test_svd_init_is_the_best_rank_r_approximation():
    base, r = tiny_llama(), 8
    m = glowq(copy.deepcopy(base), bits=2, rank=r, group_size=G, progress=False)
    mods = dict(m.named_modules())
    names = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    e, _ = stacked_error(base, names)
    s = torch.linalg.svdvals(e)
    R = mods[names[0]].group.right.detach().double()
    L = torch.cat([mods[n].left.detach().double() for n in names])
    torch.testing.assert_close(R @ R.T, torch.eye(r, dtype=torch.float64), atol=1e-6, rtol=0)  # orthonormal rows
    torch.testing.assert_close(L, e @ R.T, atol=1e-5, rtol=1e-5)  # L = (U S)_r = E V_r
    # Eckart–Young: ‖E − L R‖² = Σ_{i>r} σ_i², and no other rank-r matrix does better
    assert float((e - L @ R).norm() ** 2) == pytest.approx(float((s[r:] ** 2).sum()), rel=1e-4)
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(e.shape[1], r, generator=g, dtype=torch.float64))
    assert float((e - (e @ q) @ q.T).norm()) > float((e - L @ R).norm())
    # the selection score: energy removed per stored parameter
    score = float((s[:r] ** 2).sum()) / (r * (e.shape[1] + e.shape[0]))
    assert mods[names[0]].group.score == pytest.approx(score, rel=1e-4)


def test_right_factor_runs_once_per_group_and_outputs_match():
    base = tiny_llama()
    m = glowq(copy.deepcopy(base), bits=3, rank=8, group_size=G, progress=False)
    calls: dict[int, int] = {}
    grp = {id(mod): mod for mod in m.modules() if isinstance(mod, GlowQGroup)}
    for g in grp.values():
        g.register_forward_hook(lambda mod, a, o: calls.__setitem__(id(mod), calls.get(id(mod), 0) + 1))
    seen = {}
    for name, mod in m.named_modules():
        if isinstance(mod, GlowQLinear):
            mod.register_forward_hook(lambda mod, a, o, n=name: seen.__setitem__(n, (a[0], o)))
    m(IDS)
    assert calls == {k: 1 for k in grp}
    m(IDS)
    assert calls == {k: 2 for k in grp}
    q = quantized_modules(quantize(copy.deepcopy(base), bits=3, group_size=G, progress=False))
    mods = dict(m.named_modules())
    for n, (x, y) in seen.items():
        ref = F.linear(x, q[n].dequantized_weight(), q[n].bias) + (x @ mods[n].group.right.T) @ mods[n].left.T
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    # a different input (or an updated R) is projected afresh
    layer = m.model.layers[0].self_attn
    x1, x2 = torch.randn(3, 64), torch.randn(3, 64)
    a = layer.q_proj(x1)
    torch.testing.assert_close(layer.k_proj(x2), F.linear(x2, q["model.layers.0.self_attn.k_proj"].dequantized_weight())
                               + x2 @ layer.k_proj.group.right.T @ layer.k_proj.left.T, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        layer.q_proj.group.right.mul_(2)
    assert not torch.allclose(layer.q_proj(x1), a)


def test_gradient_reaches_only_the_factors():
    base = tiny_llama()
    m = glowq(copy.deepcopy(base), bits=2, rank=4, group_size=G, progress=False)
    for p in m.parameters():
        p.requires_grad_(False)
    params = glowq_parameters(m)
    assert len(params) == 8 + 14  # one R per group, one L per layer
    for p in params:
        p.requires_grad_(True)
    assert {id(p) for p in m.parameters() if p.requires_grad} == {id(p) for p in params}
    codes = {n: mod.packed.clone() for n, mod in quantized_modules(m).items()}
    opt = torch.optim.Adam(params, lr=1e-2)
    target = base(IDS).logits.detach()
    losses = []
    for _ in range(5):
        loss = F.mse_loss(m(IDS).logits, target)
        opt.zero_grad()
        loss.backward()
        losses.append(float(loss))
        assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in params)
        opt.step()
    assert losses[-1] < losses[0]
    assert all(p.grad is None for n, p in m.named_parameters() if not (n.endswith(".right") or n.endswith(".left")))
    assert all(torch.equal(mod.packed, codes[n]) for n, mod in quantized_modules(m).items())


def test_select_keeps_the_best_scoring_groups():
    base = tiny_llama()
    full = glowq(copy.deepcopy(base), bits=3, rank=4, group_size=G, progress=False)
    scores = {tuple(m.group.members): m.group.score for m in full.modules() if isinstance(m, GlowQLinear)}
    best = sorted(scores, key=scores.get, reverse=True)
    for frac, k in ((0.5, 4), (0.3, 3), (1.0, 8), (0.01, 1)):
        m = glowq(copy.deepcopy(base), bits=3, rank=4, group_size=G, select=frac, progress=False)
        assert {tuple(g) for g in groups(m)} == set(best[:k])
        rep = glowq_report(m)
        assert rep["groups"] == k
        kept = sum(len(g) for g in best[:k])
        assert rep["plain_layers"] == 14 - kept
        assert len(quantized_modules(m)) == 14  # every targeted layer is quantised
        assert rep["parameters"] == sum(4 * (m.get_submodule(g[0]).in_features
                                             + sum(m.get_submodule(n).out_features for n in g)) for g in best[:k])
        assert rep["bytes"] == 4 * rep["parameters"]


def test_save_load_gives_identical_outputs(tmp_path):
    m = glowq(tiny_llama(), bits=3, rank=8, group_size=G, select=0.75, progress=False)
    with torch.no_grad():  # trained factors must round-trip too
        for p in glowq_parameters(m):
            p.add_(0.01 * torch.randn_like(p))
    ref = m(IDS).logits
    assert torch.equal(copy.deepcopy(m)(IDS).logits, ref)
    out = save_glowq(m, tmp_path / "g")
    meta = json.loads((out / "glowq.json").read_text())
    assert (meta["bits"], meta["group_size"], meta["rank"], len(meta["groups"])) == (3, G, 8, 6)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert sum(k.endswith("group.right") for k in f.keys()) == 6  # R once per group
    fresh = tiny_llama(seed=7)
    load_glowq(fresh, out)
    assert torch.equal(fresh(IDS).logits, ref)
    assert groups(fresh) == groups(m)
    assert glowq_report(fresh)["error_after"] == glowq_report(m)["error_after"]
    lay = fresh.model.layers[1].self_attn
    if isinstance(lay.q_proj, GlowQLinear):
        assert lay.q_proj.group is lay.k_proj.group
    # another layout is refused, and the model is untouched
    other = tmp_path / "other"
    other.mkdir()
    (other / "glowq.json").write_text(json.dumps({"format": "paretune-recursive"}))
    plain = tiny_llama()
    with pytest.raises(AdapterFileError, match="not a GlowQ"):
        load_glowq(plain, other)
    with pytest.raises(AdapterFileError):
        load_glowq(plain, tmp_path / "missing")
    with pytest.raises(AdapterFileError):
        load_glowq(tiny_gpt2(), out)
    assert not any(isinstance(x, QuantizedLinear) for x in plain.modules())
    with pytest.raises(ConfigError, match="no GlowQ layer"):
        save_glowq(plain, tmp_path / "x")


def test_bad_input_leaves_the_model_untouched():
    base = tiny_llama()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    cases = [(dict(rank=0), ConfigError, "rank"), (dict(rank=65), ConfigError, "at most 64"),
             (dict(rank=2.5), ConfigError, "rank"), (dict(bits=5), ConfigError, "bits"),
             (dict(targets=["nope"]), TargetError, "matched no"), (dict(select=0), ConfigError, "select"),
             (dict(select=1.5), ConfigError, "select"), (dict(select=True), ConfigError, "select"),
             (dict(group_size=48), ConfigError, "group_size"), (dict(example=3), ConfigError, "example")]
    for kwargs, err, msg in cases:
        opts = dict(bits=4, rank=4, group_size=G, progress=False) | kwargs
        with pytest.raises(err, match=msg):
            glowq(base, **opts)
        assert not any(isinstance(x, (QuantizedLinear, GlowQLinear)) for x in base.modules())
        assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())
    with pytest.raises(ParetuneError, match="already quantised"):
        glowq(quantize(copy.deepcopy(base), bits=4, group_size=G, progress=False), rank=4, group_size=G)
    # targets restrict the layers; the rank limit then applies to them only
    m = glowq(copy.deepcopy(base), bits=4, rank=4, group_size=G, targets=["k_proj", "v_proj"], progress=False)
    assert groups(m) == [[f"model.layers.{i}.self_attn.k_proj", f"model.layers.{i}.self_attn.v_proj"]
                         for i in range(2)]
    assert math.isfinite(glowq_report(m)["error_after"])
