"""Compressed folders of pruned, quantised and pruned+quantised models: packed masks, round trips,
transformers reading the float copy, exact zeros at pruned positions, version 1 folders, info."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from compress_models import char_tokenizer, tiny_llama
from typer.testing import CliRunner

import paretune
from paretune.compress import apply_masks, load_compressed, prune, quantize, save_compressed, sparsity_report
from paretune.compress.pruning import MASK, masks
from paretune.compress.quantized import QuantizedLinear, dequantize, rtn
from paretune.compress.storage import (FLOAT_FILE, META_FILE, WEIGHTS_FILE, info, install_mask, pack_bits,
                                       prune_quantized, read_meta, unpack_bits)
from paretune.errors import AdapterFileError, ParetuneError

VOCAB = 128
IDS = torch.tensor([[5, 9, 3, 17, 40, 8, 2], [1, 30, 31, 32, 6, 7, 11]])


def _model():
    return tiny_llama(vocab=VOCAB)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _effective(module) -> torch.Tensor:
    module = getattr(module, "base", module)  # a merged adapter's host: its base layer
    return module.dequantized_weight() if isinstance(module, QuantizedLinear) else module.weight.detach()


def _assert_pruned_zero(model, expected_masks=None):
    found = masks(model)
    assert found, "no prune mask on the model"
    for name, mask in found.items():
        w = _effective(model.get_submodule(name))
        assert torch.all(w[~mask] == 0), name
        if expected_masks is not None:
            assert torch.equal(mask, expected_masks[name]), name
    return found


# -- packed bits ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 5), (8, 16), (1,), (7, 3, 2)])
def test_pack_bits_is_numpy_packbits_little(shape):
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(shape, generator=g) > 0.4
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy().reshape(-1), bitorder="little"))
    assert torch.equal(unpack_bits(packed, shape), mask)
    with pytest.raises(AdapterFileError, match="does not hold a mask"):
        unpack_bits(packed, (100, 100))


# -- pruned only ----------------------------------------------------------------------------------
def test_pruned_round_trip_and_transformers_reads_the_float_file(tmp_path):
    model = _model()
    prune(model, 0.5, progress=False)
    want = _logits(model)
    out = save_compressed(model, tmp_path / "p", char_tokenizer())
    meta = json.loads((out / META_FILE).read_text())
    assert meta["format_version"] == 2 and meta["modules"] == {} and meta["weights_file"] == FLOAT_FILE
    entry = meta["pruned"]["model.layers.0.mlp.up_proj"]
    assert entry["shape"] == [32, 16] and entry["pruned"] == 256 and entry["sparsity"] == 0.5
    from safetensors.torch import load_file

    stored = load_file(str(out / WEIGHTS_FILE))  # the masks only, 1 bit per weight
    assert set(stored) == {f"{n}.prune_mask_packed" for n in masks(model)}
    assert stored["model.layers.0.mlp.up_proj.prune_mask_packed"].numel() == 32 * 16 // 8
    floats = load_file(str(out / FLOAT_FILE))
    w = floats["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(w == 0, ~masks(model)["model.layers.0.mlp.up_proj"])  # pruned weights stored as zeros

    loaded, tok = load_compressed(out)
    assert tok is not None
    assert torch.equal(_logits(loaded), want)
    _assert_pruned_zero(loaded, masks(model))
    # the hook is back: a write into the weight does not bring pruned weights back into use
    up = loaded.model.layers[0].mlp.up_proj
    with torch.no_grad():
        up.weight.add_(1.0)
    _logits(loaded)
    assert torch.all(up.weight[~up.prune_mask] == 0)

    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert torch.equal(_logits(plain), want)
    loaded2, _ = paretune.models.load(str(out))  # the paretune loader gives the masks back
    assert set(masks(loaded2)) == set(masks(model))


def test_gpt2_conv1d_masks_keep_their_layout(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16)).eval()
    prune(model, 0.5, progress=False)
    before = {n: m.clone() for n, m in masks(model).items()}
    quantize(model, bits=4, group_size=8, progress=False)
    fc = model.transformer.h[0].mlp.c_fc
    assert isinstance(fc, QuantizedLinear) and torch.equal(fc.prune_mask, before["transformer.h.0.mlp.c_fc"].T)
    want = _logits(model)
    out = save_compressed(model, tmp_path / "g")
    loaded, _ = load_compressed(out)
    assert torch.equal(_logits(loaded), want)
    _assert_pruned_zero(loaded, {n: m.T for n, m in before.items()})


# -- pruned and quantised -------------------------------------------------------------------------
def test_prune_then_quantize_gives_exact_zeros_and_the_rtn_of_the_pruned_weight(tmp_path):
    model = _model()
    prune(model, 0.5, progress=False)
    pruned_w = model.model.layers[1].self_attn.o_proj.weight.detach().clone()
    mask = model.model.layers[1].self_attn.o_proj.prune_mask.clone()
    quantize(model, bits=3, group_size=8, axis="in", progress=False)
    found = _assert_pruned_zero(model)
    assert len(found) == 14
    # independent: RTN of the pruned float weight, then zero where pruned
    codes, s, z = rtn(pruned_w, 3, 8, "in")
    expected = dequantize(codes, s, z, "in").masked_fill(~mask, 0)
    assert torch.equal(model.model.layers[1].self_attn.o_proj.dequantized_weight(), expected)
    want = _logits(model)
    out = save_compressed(model, tmp_path / "pq", dequantized=True)
    loaded, _ = load_compressed(out)
    assert torch.equal(_logits(loaded), want)
    _assert_pruned_zero(loaded, found)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert torch.allclose(_logits(plain), want, atol=1e-5)
    assert torch.all(plain.model.layers[1].self_attn.o_proj.weight[~mask] == 0)


def test_quantize_then_prune_scores_the_dequantised_weight(tmp_path):
    model = quantize(_model(), bits=4, group_size=8, progress=False)
    q = model.model.layers[0].mlp.down_proj
    w_hat = q.dequantized_weight().clone()
    report = prune_quantized(model, 0.25, progress=False)
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantizedLinear)  # put back, codes unchanged
    assert report["sparsity"] == 0.25 and len(report["layers"]) == 14
    mask = q.prune_mask
    # independent: per-layer magnitude pruning of Ŵ removes floor(0.25·n) of the smallest |Ŵ|
    k = int(0.25 * w_hat.numel())
    assert int((~mask).sum()) == k
    assert float(w_hat.abs()[~mask].max()) <= float(w_hat.abs()[mask].min())
    assert torch.equal(q.dequantized_weight(), w_hat.masked_fill(~mask, 0))
    # pruning again (through paretune.compress.prune, which hands a quantised model to prune_quantized)
    # keeps the old zeros; the mask helpers read a quantised layer's mask
    prune(model, 0.5, progress=False)
    assert torch.all(~q.prune_mask[~mask])
    assert sparsity_report(model)["sparsity"] == 0.5 and apply_masks(model) == 14
    found = _assert_pruned_zero(model)
    want = _logits(model)
    out = save_compressed(model, tmp_path / "qp")
    assert not (out / FLOAT_FILE).exists()
    loaded, _ = load_compressed(out)
    assert torch.equal(_logits(loaded), want)
    _assert_pruned_zero(loaded, found)


def test_merging_a_lora_into_a_pruned_quantised_layer_keeps_the_zeros(tmp_path):
    import warnings

    model = _model()
    prune(model, 0.5, progress=False)
    quantize(model, bits=8, group_size=8, progress=False)
    out = save_compressed(model, tmp_path / "m")
    loaded, _ = load_compressed(out)
    paretune.adapt(loaded, "lora", r=2, targets=["q_proj"])
    for p in loaded.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paretune.merge(loaded)
    _assert_pruned_zero(loaded)


def test_wanda_on_a_quantised_model_uses_calibration():
    model = quantize(_model(), bits=4, group_size=8, progress=False)
    report = prune_quantized(model, 0.5, "wanda", calibration=[IDS[:1], IDS[1:]], progress=False)
    assert report["method"] == "wanda"
    _assert_pruned_zero(model)
    with pytest.raises(ParetuneError, match="calibration"):
        prune_quantized(quantize(_model(), bits=4, group_size=8, progress=False), 0.5, "wanda", progress=False)


def test_install_mask_checks():
    q = QuantizedLinear.from_weight(torch.randn(4, 8), bits=4, group_size=8)
    with pytest.raises(ParetuneError, match="boolean"):
        install_mask(q, torch.ones(4, 8))
    with pytest.raises(ParetuneError, match="shape"):
        install_mask(q, torch.ones(8, 4, dtype=torch.bool))
    m1 = torch.rand(4, 8) > 0.5
    m2 = torch.rand(4, 8) > 0.5
    install_mask(q, m1)
    install_mask(q, m2)
    assert torch.equal(q.prune_mask, m1 & m2)
    assert MASK not in q.state_dict()  # not persistent: the packed file stores it packed


# -- folders: old versions, damage, info ----------------------------------------------------------
def test_version_1_folders_are_read_and_unknown_versions_refused(tmp_path):
    model = quantize(_model(), bits=4, group_size=8, progress=False)
    out = save_compressed(model, tmp_path / "v1")
    meta = json.loads((out / META_FILE).read_text())
    meta["format_version"] = 1
    del meta["pruned"], meta["weights_file"]
    (out / META_FILE).write_text(json.dumps(meta))
    loaded, _ = load_compressed(out)
    assert torch.equal(_logits(loaded), _logits(model))
    assert read_meta(out)["pruned"] == {} and info(out)["pruned_modules"] == 0
    meta["format_version"] = 99
    (out / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(AdapterFileError, match="format_version 99"):
        load_compressed(out)


def test_refusals_and_damaged_masks(tmp_path):
    with pytest.raises(ParetuneError, match="no quantised layer and no pruned layer"):
        save_compressed(_model(), tmp_path / "none")
    assert not (tmp_path / "none").exists()
    model = _model()
    prune(model, 0.5, progress=False)
    out = save_compressed(model, tmp_path / "p")
    meta = json.loads((out / META_FILE).read_text())
    meta["pruned"]["model.layers.0.mlp.up_proj"]["shape"] = [16, 32]
    (out / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(AdapterFileError, match="shape"):
        load_compressed(out)
    meta["pruned"]["model.layers.0.mlp.nope"] = {"shape": [2, 2], "weights": 4, "pruned": 2}
    meta["pruned"]["model.layers.0.mlp.up_proj"]["shape"] = [32, 16]
    (out / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(AdapterFileError, match="no mask"):
        load_compressed(out)
    meta["pruned"]["model.layers.0.mlp.nope"] = {"shape": "x"}
    (out / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(AdapterFileError, match="not a valid mask"):
        load_compressed(out)


def test_info_and_paretune_info_show_bits_and_sparsity(tmp_path):
    from paretune.cli import app

    model = _model()
    prune(model, 0.5, progress=False)
    quantize(model, bits=4, group_size=8, progress=False)
    out = save_compressed(model, tmp_path / "pq")
    i = info(out)
    assert i["quantized_modules"] == 14 and i["pruned_modules"] == 14
    assert i["pruned_layer_weights"] == 2 * (16 * 16 * 2 + 8 * 16 * 2 + 32 * 16 * 3)
    assert i["pruned_weights"] == i["pruned_layer_weights"] // 2 and i["sparsity"] == 0.5
    assert i["storage"] == "dense" and i["file_bytes"] == (out / WEIGHTS_FILE).stat().st_size
    text = CliRunner().invoke(app, ["info", str(out)]).output
    assert "14 modules: 4-bit, group 8, axis out" in text
    assert "sparsity 50.0%" in text and f"dense storage; {i['pruned_weights']:,} zeros" in text
    j = json.loads(CliRunner().invoke(app, ["info", str(out), "--json"]).output)
    assert j["sparsity"] == 0.5
    p = _model()
    prune(p, 0.25, progress=False)
    text = CliRunner().invoke(app, ["info", str(save_compressed(p, tmp_path / "p"))]).output
    assert "quantised:   none" in text and "sparsity 25.0%" in text and "transformers reads it" in text
