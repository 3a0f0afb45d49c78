"""RTN k-bit quantisation of the base: the per-entry bound, packing, QuantizedLinear's forward,
quantize()'s refusals, save / load of a compressed folder."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from paretune.compress import (QuantizedLinear, dequantize, is_compressed, is_quantized, linear_bytes, load_compressed,
                               pack, quantize, quantized_modules, rtn, save_compressed, unpack)
from paretune.compress.quantize import expected_bytes
from paretune.compress.quantized import packed_bytes, relative_error
from paretune.compress.storage import META_FILE, WEIGHTS_FILE, info
from paretune.errors import AdapterFileError, ConfigError, ParetuneError, TargetError

VOCAB = 50


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).float().eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


IDS = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def group_scales(scales: torch.Tensor, g: int, axis: str) -> torch.Tensor:
    """Each entry's scale in the (out, in) layout (independent of the packing code)."""
    s = scales.float().repeat_interleave(g, dim=1)
    return s if axis == "out" else s.T


def reference_rtn(w: torch.Tensor, bits: int, g: int, axis: str) -> torch.Tensor:
    """Plain min/max RTN without the float16 storage of s and z, written from the formula."""
    m = w if axis == "out" else w.T
    out = torch.empty_like(m)
    levels = 2**bits - 1
    for r in range(m.shape[0]):
        for j in range(0, m.shape[1], g):
            x = m[r, j:j + g]
            lo, hi = x.min(), x.max()
            s = (hi - lo) / levels
            q = torch.round((x - lo) / s).clamp(0, levels) if s > 0 else torch.zeros_like(x)
            out[r, j:j + g] = q * s + lo
    return out if axis == "out" else out.T


# -- the scheme ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", ["out", "in"])
def test_error_within_half_a_scale_per_entry(bits, axis):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(48, 64, generator=g) * 0.05
    w[3, 5] = 1.5  # an outlier
    codes, scales, zeros = rtn(w, bits, 16, axis)
    assert scales.dtype == zeros.dtype == torch.float16 and codes.dtype == torch.uint8
    rows = 48 if axis == "out" else 64
    assert tuple(scales.shape) == (rows, (64 if axis == "out" else 48) // 16)
    assert int(codes.max()) <= 2**bits - 1
    w_hat = dequantize(codes, scales, zeros, axis)
    bound = group_scales(scales, 16, axis) / 2 + 1e-6
    assert bool(((w - w_hat).abs() <= bound).all())
    # the same grid as plain min/max RTN up to the float16 storage of s and z
    ref = reference_rtn(w, bits, 16, axis)
    assert (w_hat - ref).abs().max() <= group_scales(scales, 16, axis).max() * 1.01


def test_axis_in_groups_run_down_input_columns():
    """With axis="in" an outlier only widens the groups of its input column; with "out" those of its row."""
    w = torch.randn(32, 32, generator=torch.Generator().manual_seed(0)) * 0.01
    w[:, 7] *= 100  # an outlier input channel (AdaDim's case)
    rest = [c for c in range(32) if c != 7]  # the ordinary channels
    err_in = relative_error(dequantize(*rtn(w, 3, 8, "in"), axis="in")[:, rest], w[:, rest])
    err_out = relative_error(dequantize(*rtn(w, 3, 8, "out"), axis="out")[:, rest], w[:, rest])
    assert err_in < err_out / 3


def test_constant_group_and_float16_exact_values():
    w = torch.full((4, 8), 0.5)
    codes, scales, zeros = rtn(w, 4, 8, "out")
    assert torch.equal(dequantize(codes, scales, zeros), w)
    w = torch.full((4, 8), 0.1)  # not a float16: the bound still holds
    codes, scales, zeros = rtn(w, 2, 8, "out")
    assert bool(((dequantize(codes, scales, zeros) - w).abs() <= scales.float().max() / 2 + 1e-7).all())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip_and_byte_count(bits):
    g = torch.Generator().manual_seed(bits)
    for n in (8, 24, 13, 1):
        codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
        packed = pack(codes, bits)
        assert packed.dtype == torch.uint8
        assert packed.numel() == {2: math.ceil(n / 4), 3: 3 * math.ceil(n / 8), 4: math.ceil(n / 2), 8: n}[bits]
        assert torch.equal(unpack(packed, bits, n), codes)
    # n a multiple of 8: exactly n·k/8 bytes
    assert packed_bytes(4096, bits) == 4096 * bits // 8


def test_three_bit_layout():
    """Code i of a group of 8 sits at bits 3i..3i+2 of a little-endian 24-bit word."""
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    word = sum(int(c) << (3 * i) for i, c in enumerate(codes))
    assert pack(codes, 3).tolist() == [word & 255, (word >> 8) & 255, (word >> 16) & 255]
    assert pack(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [1 | (2 << 4)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", ["out", "in"])
def test_layer_bytes_equal_the_formula(bits, axis):
    lin = nn.Linear(64, 32, bias=False)
    q = QuantizedLinear.from_module(lin, bits=bits, group_size=16, axis=axis)
    rows, groups = (32, 4) if axis == "out" else (64, 2)
    assert q.stored_bytes() == 64 * 32 * bits // 8 + 2 * 2 * rows * groups == expected_bytes(32, 64, bits, 16, axis)
    assert q.packed.numel() == 64 * 32 * bits // 8


def test_quantized_linear_forward_is_linear_with_the_dequantized_weight():
    lin = nn.Linear(32, 24)
    q = QuantizedLinear.from_module(lin, bits=4, group_size=8, axis="in")
    x = torch.randn(3, 5, 32)
    w_hat = q.dequantized_weight()
    assert torch.equal(q(x), F.linear(x, w_hat, lin.bias))
    assert torch.equal(q.bias, lin.bias) and not q.bias.requires_grad


def test_tiny_llama_outputs_equal_float_model_with_dequantized_weights():
    model, ref = tiny_llama(), tiny_llama()
    quantize(model, bits=4, group_size=8, axis="out", progress=False)
    names = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(names) == 14 and "lm_head" not in names  # 7 per layer; the tied head is skipped
    with torch.no_grad():
        for n in names:
            ref.get_submodule(n).weight.copy_(model.get_submodule(n).dequantized_weight())
        assert torch.allclose(model(IDS).logits, ref(IDS).logits, atol=1e-6, rtol=0)
        assert not torch.equal(model(IDS).logits, tiny_llama()(IDS).logits)


def test_gpt2_conv1d_is_quantized_transposed():
    model, ref = tiny_gpt2(), tiny_gpt2()
    quantize(model, bits=8, group_size=16, targets=["c_attn", "c_fc"], progress=False)
    q = model.transformer.h[0].attn.c_attn
    assert isinstance(q, QuantizedLinear) and (q.out_features, q.in_features) == (48, 16)
    w = ref.transformer.h[0].attn.c_attn.weight.T
    scales = group_scales(q.scales, 16, "out")
    assert bool(((q.dequantized_weight() - w).abs() <= scales / 2 + 1e-6).all())
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, ref(IDS).logits, atol=0.05)


def test_targets_regex_and_skip():
    model = tiny_llama()
    quantize(model, bits=3, group_size=8, targets=r".*\.mlp\..*", skip=["down_proj"], progress=False)
    names = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert names == {f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj")}


# -- refusals leave the model untouched ---------------------------------------------------------------
def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kwargs, error, words", [
    ({"bits": 5}, ConfigError, "bits=5"),
    ({"bits": True}, ConfigError, "bits=True"),
    ({"axis": "rows"}, ConfigError, "axis"),
    ({"group_size": 0}, ConfigError, "group_size"),
    ({"group_size": 12}, ConfigError, "does not divide"),
    ({"targets": ["nothing_here"]}, TargetError, "matched no"),
    ({"targets": "[bad"}, TargetError, "regular expression"),
    ({"targets": ["lm_head"], "skip": []}, ConfigError, "tied"),
])
def test_bad_input_is_refused_and_the_model_is_untouched(kwargs, error, words):
    model = tiny_llama()
    before = state(model)
    with pytest.raises(error, match=words):
        quantize(model, **{"group_size": 8, "progress": False, **kwargs})
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_refuses_a_quantized_model_and_non_finite_weights():
    model = quantize(tiny_llama(), bits=4, group_size=8, progress=False)
    with pytest.raises(ParetuneError, match="already quantised.*paretune.models.load"):
        quantize(model, bits=4, group_size=8, progress=False)
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    before = state(model)
    with pytest.raises(ParetuneError, match="down_proj.*non-finite"):
        quantize(model, bits=4, group_size=8, progress=False)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_linear_bytes():
    model = tiny_llama()
    before = linear_bytes(model)
    quantize(model, bits=4, group_size=8, progress=False)
    after = linear_bytes(model)
    assert after["float"] == before["float"] == before["stored"]
    weights = 2 * (16 * 16 * 2 + 8 * 16 * 2 + 32 * 16 * 3)  # q, o; k, v; gate, up, down
    groups = weights // 8
    head = VOCAB * 16 * 4  # lm_head stays float32
    assert after["stored"] == weights // 2 + 4 * groups + head


# -- compressed folders ---------------------------------------------------------------------------
@pytest.mark.parametrize("bits, axis", [(4, "out"), (3, "in")])
def test_save_load_gives_identical_outputs(tmp_path, bits, axis):
    model = quantize(tiny_llama(), bits=bits, group_size=8, axis=axis, progress=False)
    out = save_compressed(model, tmp_path / "q", dequantized=True)
    assert is_compressed(out)
    meta = json.loads((out / META_FILE).read_text())
    assert meta["modules"]["model.layers.0.self_attn.q_proj"]["bits"] == bits
    loaded, tokenizer = load_compressed(out)
    assert tokenizer is None and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    # transformers reads the dequantised copy as a plain model with the same outputs
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert torch.allclose(plain(IDS).logits, model(IDS).logits, atol=1e-5)
    i = info(out)
    assert i["quantized_modules"] == 14 and i["dequantized_copy"]
    assert i["quantized_weight_bytes"] < i["float_weight_bytes"]


def test_models_load_count_and_info_of_a_compressed_folder(tmp_path):
    import paretune
    import paretune.models
    from typer.testing import CliRunner

    from paretune.cli import app

    float_model = tiny_llama()
    before = paretune.count(float_model)
    model = quantize(tiny_llama(), bits=4, group_size=8, progress=False)
    out = save_compressed(model, tmp_path / "q")
    loaded, _ = paretune.models.load(str(out))  # the quantised model, not a float one
    assert is_quantized(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    cost = paretune.count(loaded)
    assert cost["base"] == before["base"]  # every weight still counted once, as its in·out numbers
    packed = sum(m.stored_bytes() for m in quantized_modules(loaded).values())
    float_linear = sum(m.in_features * m.out_features * 4 for m in quantized_modules(loaded).values())
    assert cost["base_bytes"] == before["base_bytes"] - float_linear + packed
    text = CliRunner().invoke(app, ["info", str(out)]).output
    assert "14 modules: 4-bit, group 8, axis out" in text and "packed" in text


def test_save_refusals_and_damaged_folders(tmp_path):
    with pytest.raises(ParetuneError, match="no quantised layer"):
        save_compressed(tiny_llama(), tmp_path / "a")
    assert not (tmp_path / "a").exists()
    model = quantize(tiny_llama(), bits=4, group_size=8, progress=False)
    out = save_compressed(model, tmp_path / "b")
    assert not (out / "model.safetensors").exists()
    (out / WEIGHTS_FILE).unlink()
    with pytest.raises(AdapterFileError, match="incomplete"):
        load_compressed(out)
    (out / META_FILE).write_text("{not json")
    with pytest.raises(AdapterFileError, match="corrupt"):
        load_compressed(out)
