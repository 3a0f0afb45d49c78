"""Bottleneck adapters: the adapted model against the adapter's math written out by hand (hooks on a
fresh copy of the base), placements per architecture, counts, the BERT parallel path's hooks, and
bad input.

AdapterHub's ``adapters`` library cannot be compared here: every release pins transformers below 5
(the newest, 1.3, needs transformers >=4.57.6,<4.58; `uv pip compile` of ``adapters`` beside
transformers 5.24 finds no solution), so the reference is the formula written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import paretune
from paretune.core.host import Host
from paretune.errors import ConfigError, ParetuneError, TargetError
from paretune.methods.bottleneck import BottleneckConfig, default_targets

import tiny_transformers as tiny

VOCAB = tiny.VOCAB
ACTS = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "identity": lambda h: h}


def build_bert(seed: int = 0, hidden: int = 16):
    return tiny.build_bert(seed, hidden, layers=2)


def build_gpt2(seed: int = 0):
    return tiny.build_gpt2(seed, layers=2)


build_llama = tiny.build_llama16
BUILDERS = {"llama": build_llama, "bert": build_bert, "gpt2": build_gpt2}


@pytest.fixture
def ids():
    return torch.randint(2, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def randomize(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def deltas(model: nn.Module, name: str = "default") -> dict[str, nn.Module]:
    return {n: m.deltas[name] for n, m in model.named_modules() if isinstance(m, Host) and name in m.deltas}


def by_hand(d, h: torch.Tensor, act: str, s: float) -> torch.Tensor:
    """s·(W_up f(W_down h + b_down) + b_up), written out from the delta's tensors."""
    down = h @ d.down.detach().T + d.down_bias.detach()
    return s * (ACTS[act](down) @ d.up.detach().T + d.up_bias.detach())


# -- zero start, targets ---------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("style", ["series", "parallel"])
def test_starts_equal_to_the_base_with_zero_up(arch, style, ids):
    build = BUILDERS[arch]
    model = build()
    cfg = BottleneckConfig(style=style, placement="both", reduction_factor=4)
    paretune.adapt(model, "bottleneck", targets=default_targets(model, cfg), style=style, placement="both",
                   reduction_factor=4)
    for d in deltas(model).values():
        assert torch.count_nonzero(d.up) == 0 and torch.count_nonzero(d.up_bias) == 0
        assert torch.count_nonzero(d.down_bias) == 0 and d.down.abs().max() > 0
        bound = 1 / math.sqrt(d.d_a)  # kaiming-uniform(a=√5) as nn.Linear
        assert d.down.abs().max() <= bound
    torch.testing.assert_close(logits(model, ids), logits(build(), ids), atol=0, rtol=0)


@pytest.mark.parametrize("arch, placement, style, expected", [
    ("llama", "ffn", "series", ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]),
    ("llama", "attn", "series", ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]),
    ("llama", "ffn", "parallel", ["model.layers.0.mlp", "model.layers.1.mlp"]),
    ("llama", "both", "parallel", ["model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn",
                                   "model.layers.1.mlp"]),
    ("bert", "ffn", "series", ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]),
    ("bert", "attn", "series", ["bert.encoder.layer.0.attention.output.dense",
                                "bert.encoder.layer.1.attention.output.dense"]),
    ("bert", "ffn", "scaled-parallel", ["bert.encoder.layer.0.output", "bert.encoder.layer.1.output"]),
    ("gpt2", "both", "series", ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj",
                                "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]),
    ("gpt2", "attn", "parallel", ["transformer.h.0.attn", "transformer.h.1.attn"]),
])
def test_default_targets_per_architecture(arch, placement, style, expected):
    model = BUILDERS[arch]()
    cfg = BottleneckConfig(style=style, placement=placement, reduction_factor=4)
    paretune.adapt(model, "bottleneck", targets=default_targets(model, cfg), style=style, placement=placement,
                   reduction_factor=4)
    assert paretune.adapters(model)["default"].targets == expected


def test_adapt_without_targets_is_series_after_the_ffn():
    model = build_llama()
    paretune.adapt(model, "bottleneck", reduction_factor=4)
    assert paretune.adapters(model)["default"].targets == ["model.layers.0.mlp.down_proj",
                                                          "model.layers.1.mlp.down_proj"]


# -- the math against hand-written references -------------------------------------------------------

@pytest.mark.parametrize("act", list(ACTS))
def test_series_on_bert_is_layernorm_of_dense_plus_adapter_plus_residual(act, ids):
    """LN(dense(x) + A(dense(x)) + input_tensor), computed by a hook that replaces BertOutput's forward."""
    model = build_bert()
    paretune.adapt(model, "bottleneck", reduction_factor=4, non_linearity=act)
    randomize(model)
    got = logits(model, ids)

    ref = build_bert()
    found = deltas(model)
    handles = []
    for i, layer in enumerate(ref.bert.encoder.layer):
        d = found[f"bert.encoder.layer.{i}.output.dense"]
        out = layer.output

        def hook(module, args, result, d=d, out=out):
            h, residual = args
            dense = out.dense(h)
            return F.layer_norm(dense + by_hand(d, dense, act, 1.0) + residual, out.LayerNorm.normalized_shape,
                                out.LayerNorm.weight, out.LayerNorm.bias, out.LayerNorm.eps)

        handles.append(out.register_forward_hook(hook))
    want = logits(ref, ids)
    assert (want - logits(build_bert(), ids)).abs().max() > 1e-3  # the adapter changes the outputs
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("style, s", [("parallel", 1.0), ("scaled-parallel", 4.0)])
def test_parallel_on_bert_adds_the_adapter_before_the_layernorm(style, s, ids):
    """LN(dense(h) + s·A(x) + x), x the FFN's input (BertOutput's input_tensor)."""
    model = build_bert()
    cfg = BottleneckConfig(style=style, reduction_factor=4)
    paretune.adapt(model, "bottleneck", targets=default_targets(model, cfg), style=style, reduction_factor=4)
    randomize(model)
    got = logits(model, ids)

    ref = build_bert()
    found = deltas(model)
    for i, layer in enumerate(ref.bert.encoder.layer):
        d = found[f"bert.encoder.layer.{i}.output"]
        out = layer.output

        def hook(module, args, result, d=d, out=out):
            h, x = args
            z = out.dense(h) + by_hand(d, x, "relu", s) + x
            return F.layer_norm(z, out.LayerNorm.normalized_shape, out.LayerNorm.weight, out.LayerNorm.bias,
                                out.LayerNorm.eps)

        out.register_forward_hook(hook)
    torch.testing.assert_close(got, logits(ref, ids), atol=1e-5, rtol=0)


def test_parallel_on_bert_attention_uses_the_attention_input(ids):
    model = build_bert()
    cfg = BottleneckConfig(style="parallel", placement="attn", reduction_factor=4)
    paretune.adapt(model, "bottleneck", targets=default_targets(model, cfg), style="parallel", placement="attn",
                   reduction_factor=4)
    randomize(model)
    got = logits(model, ids)
    ref = build_bert()
    found = deltas(model)
    for i, layer in enumerate(ref.bert.encoder.layer):
        d, out = found[f"bert.encoder.layer.{i}.attention.output"], layer.attention.output

        def hook(module, args, result, d=d, out=out):
            h, x = args
            return F.layer_norm(out.dense(h) + by_hand(d, x, "relu", 1.0) + x, out.LayerNorm.normalized_shape,
                                out.LayerNorm.weight, out.LayerNorm.bias, out.LayerNorm.eps)

        out.register_forward_hook(hook)
    torch.testing.assert_close(got, logits(ref, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("placement", ["ffn", "attn"])
def test_parallel_on_llama_adds_the_adapter_of_the_block_input(placement, ids):
    model = build_llama()
    cfg = BottleneckConfig(style="scaled-parallel", placement=placement, reduction_factor=4, non_linearity="silu")
    paretune.adapt(model, "bottleneck", targets=default_targets(model, cfg), **{
        k: getattr(cfg, k) for k in ("style", "placement", "reduction_factor", "non_linearity")})
    randomize(model)
    got = logits(model, ids)
    ref = build_llama()
    found = deltas(model)
    for i, layer in enumerate(ref.model.layers):
        block = layer.mlp if placement == "ffn" else layer.self_attn
        d = found[f"model.layers.{i}.{'mlp' if placement == 'ffn' else 'self_attn'}"]

        def hook(module, args, kwargs, result, d=d):
            x = args[0] if args else kwargs["hidden_states"]
            if isinstance(result, tuple):
                return (result[0] + by_hand(d, x, "silu", 4.0), *result[1:])
            return result + by_hand(d, x, "silu", 4.0)

        block.register_forward_hook(hook, with_kwargs=True)
    torch.testing.assert_close(got, logits(ref, ids), atol=1e-5, rtol=0)


def test_series_on_gpt2_conv1d(ids):
    model = build_gpt2()
    paretune.adapt(model, "bottleneck", bottleneck=3, scaling=0.5, non_linearity="tanh")
    randomize(model)
    got = logits(model, ids)
    ref = build_gpt2()
    found = deltas(model)
    for i, layer in enumerate(ref.transformer.h):
        d = found[f"transformer.h.{i}.mlp.c_proj"]
        layer.mlp.c_proj.register_forward_hook(lambda m, a, out, d=d: out + by_hand(d, out, "tanh", 0.5))
    torch.testing.assert_close(got, logits(ref, ids), atol=1e-5, rtol=0)


# -- counts, gradients, save / load, unload ----------------------------------------------------------

def test_count_is_2dm_plus_m_plus_d_per_layer():
    model = build_bert(hidden=32)
    cfg = BottleneckConfig(placement="both", reduction_factor=8)
    paretune.adapt(model, "bottleneck", targets=default_targets(model, cfg), placement="both", reduction_factor=8)
    d, m, layers = 32, 4, 4  # two layers, attention and FFN
    cost = paretune.count(model)
    assert cost["trainable"] == cost["formula"] == layers * (2 * d * m + m + d) == 4 * 292


def test_parallel_block_count_and_gradients_only_in_the_adapter(ids):
    model = build_bert()
    cfg = BottleneckConfig(style="parallel", reduction_factor=4)
    paretune.adapt(model, "bottleneck", targets=default_targets(model, cfg), style="parallel", reduction_factor=4)
    assert paretune.count(model)["trainable"] == 2 * (2 * 16 * 4 + 4 + 16)
    randomize(model)
    model.train()
    model(ids).logits.square().mean().backward()
    for n, p in model.named_parameters():
        if ".deltas.default." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n


@pytest.mark.parametrize("style", ["series", "parallel"])
def test_save_load_and_unload_remove_the_hooks(style, ids, tmp_path):
    model = build_bert()
    cfg = BottleneckConfig(style=style, reduction_factor=4)
    targets = default_targets(model, cfg)
    paretune.adapt(model, "bottleneck", targets=targets, style=style, reduction_factor=4)
    randomize(model)
    expected = logits(model, ids)
    paretune.save(model, tmp_path / "a")
    fresh = build_bert()
    paretune.load(fresh, tmp_path / "a")
    torch.testing.assert_close(logits(fresh, ids), expected, atol=1e-6, rtol=0)

    with pytest.raises(ParetuneError, match="cannot be merged"):
        paretune.merge(fresh)
    paretune.unload(fresh)
    for module in fresh.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks
    torch.testing.assert_close(logits(fresh, ids), logits(build_bert(), ids), atol=0, rtol=0)


def test_remove_and_set_active_on_parallel_bert(ids):
    model = build_bert()
    cfg = BottleneckConfig(style="parallel", reduction_factor=4)
    paretune.adapt(model, "bottleneck", targets=default_targets(model, cfg), style="parallel", reduction_factor=4)
    randomize(model)
    base = logits(build_bert(), ids)
    paretune.set_active(model, [])
    torch.testing.assert_close(logits(model, ids), base, atol=0, rtol=0)
    paretune.set_active(model, "default")
    assert (logits(model, ids) - base).abs().max() > 1e-3
    paretune.remove(model, "default")
    assert not any(m._forward_pre_hooks for m in model.modules())


# -- bad input ---------------------------------------------------------------------------------

def _unchanged(model: nn.Module) -> bool:
    return not any(isinstance(m, Host) for m in model.modules()) and paretune.adapters(model) == {}


def test_a_model_without_the_placement_is_a_target_error():
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    with pytest.raises(TargetError, match="targets="):
        paretune.adapt(mlp, "bottleneck")
    assert _unchanged(mlp)

    class FfnOnly(nn.Module):  # Llama-style names, but no attention sub-layer
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Module()])
            self.layers[0].mlp = nn.Module()
            self.layers[0].mlp.down_proj = nn.Linear(8, 8)

    with pytest.raises(TargetError, match="placement 'attn'"):
        default_targets(FfnOnly(), BottleneckConfig(placement="attn"))


def test_reduction_factor_larger_than_the_width_is_refused(ids):
    model = build_llama()
    with pytest.raises(ConfigError, match="reduction_factor=32 exceeds the width 16"):
        paretune.adapt(model, "bottleneck", reduction_factor=32)
    assert _unchanged(model)
    torch.testing.assert_close(logits(model, ids), logits(build_llama(), ids), atol=0, rtol=0)


@pytest.mark.parametrize("options", [{"style": "serial"}, {"placement": "mlp"}, {"non_linearity": "swish"},
                                     {"reduction_factor": 0}, {"bottleneck": 0}, {"dropout": 1.0}])
def test_bad_options_are_config_errors(options):
    with pytest.raises(ConfigError):
        paretune.adapt(build_llama(), "bottleneck", **options)


def test_series_on_a_post_layernorm_block_names_the_dense_layer():
    model = build_bert()
    with pytest.raises(TargetError, match=r"layer\.0\.output\.dense"):
        paretune.adapt(model, "bottleneck", targets=r"bert\.encoder\.layer\.0\.output", reduction_factor=4)
    assert _unchanged(model)


def test_options_choose_the_default_sites():
    """Without targets, the placement and style options decide the hosts."""
    model = build_llama()
    paretune.adapt(model, "bottleneck", placement="attn", reduction_factor=4)
    assert all(t.endswith("self_attn.o_proj") for t in paretune.adapters(model)["default"].targets)
    model = build_llama()
    paretune.adapt(model, "bottleneck", placement="both", style="parallel", reduction_factor=4)
    assert sorted({t.rsplit(".", 1)[1] for t in paretune.adapters(model)["default"].targets}) == ["mlp", "self_attn"]


