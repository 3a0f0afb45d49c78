"""paretune.save / paretune.load: round trips, the folder's contents, base fingerprints, corrupt
and missing files, atomic writes."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

import paretune
from paretune import io as pio
from paretune.errors import AdapterFileError, ParetuneError


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def two(make_llama, perturb):
    return lambda: _two_adapters(make_llama, perturb)


def _two_adapters(make_llama, perturb):
    model = make_llama()
    paretune.adapt(model, "lora", name="a", targets=["q_proj", "v_proj"], r=2, alpha=4)
    perturb(model, seed=11)  # adapt() freezes earlier adapters: give each its values in turn
    paretune.adapt(model, "pissa", name="b", targets=["up_proj"], r=3)
    perturb(model, seed=12)
    return model


def test_round_trip_of_several_adapters(two, make_llama, ids, tmp_path):
    model = two()
    paretune.save(model, tmp_path / "a", name="a")
    paretune.save(model, tmp_path / "b", name="b")
    want = _logits(model, ids)
    fresh = make_llama()
    paretune.load(fresh, tmp_path / "a")  # name=None: the saved name
    paretune.load(fresh, tmp_path / "b", name="renamed")
    assert sorted(paretune.adapters(fresh)) == ["a", "renamed"] and paretune.active(fresh) == ["a", "renamed"]
    torch.testing.assert_close(_logits(fresh, ids), want, atol=1e-5, rtol=0)
    for name in ("a", "renamed"):  # one at a time too
        paretune.set_active(fresh, [name])
        paretune.set_active(model, ["a" if name == "a" else "b"])
        torch.testing.assert_close(_logits(fresh, ids), _logits(model, ids), atol=1e-5, rtol=0)


def test_loaded_adapter_is_frozen_unless_asked(two, make_llama, tmp_path):
    model = two()
    paretune.save(model, tmp_path / "a", name="a")
    base = make_llama()
    base.lm_head.weight.requires_grad_(False)
    frozen = paretune.load(base, tmp_path / "a")
    adapter = {n for n, _ in frozen.named_parameters() if ".deltas.a." in n}
    assert adapter and not any(p.requires_grad for n, p in frozen.named_parameters() if n in adapter)
    # the base's own trainability is left as it was
    assert all(p.requires_grad for n, p in frozen.named_parameters() if n not in adapter and "lm_head" not in n)
    assert not frozen.lm_head.weight.requires_grad
    live = make_llama().requires_grad_(False)
    paretune.load(live, tmp_path / "a", trainable=True)
    assert {n for n, p in live.named_parameters() if p.requires_grad} == adapter


def test_folder_contents(two, make_llama, tmp_path):
    model = two()
    out = paretune.save(model, tmp_path / "saved", name="a")
    assert sorted(os.listdir(out)) == ["adapter.safetensors", "paretune.json"]
    meta = json.loads((out / "paretune.json").read_text())
    assert meta["method"] == "lora" and meta["name"] == "a" and meta["library_version"] == paretune.__version__
    assert meta["config"]["r"] == 2 and meta["config"]["alpha"] == 4
    assert meta["targets"] == [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in ("q", "v")]
    fp = meta["fingerprint"]
    assert fp["modules"]["model.layers.0.self_attn.q_proj"] == {"kind": "linear", "shape": [16, 16]}
    assert len(fp["sha256"]) == 64
    tensors = load_file(str(out / "adapter.safetensors"))
    assert set(tensors) == {f"{t}.{x}" for t in meta["targets"] for x in ("A", "B")}
    assert paretune.count(model, "a")["stored_bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
    mask = os.umask(0)
    os.umask(mask)
    for f in out.iterdir():  # the modes a plain open() / mkdir() give, not mkstemp's 0600 / mkdtemp's 0700
        assert stat.S_IMODE(f.stat().st_mode) == 0o644 & ~mask
    assert stat.S_IMODE(out.stat().st_mode) == 0o755 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]  # no temporary leftovers


def test_saving_again_replaces_the_folder(two, make_llama, ids, tmp_path):
    model = two()
    paretune.save(model, tmp_path / "x", name="a")
    paretune.save(model, tmp_path / "x", name="b")
    assert pio.read_meta(tmp_path / "x")["method"] == "pissa"
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


def test_mismatched_base_is_refused(two, make_llama, make_bert, tmp_path):
    model = two()
    paretune.save(model, tmp_path / "a", name="a")
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(AdapterFileError, match="another base model") as e:
        paretune.load(wider, tmp_path / "a")
    assert "[16, 16]" in str(e.value) and "[32, 32]" in str(e.value)
    assert paretune.adapters(wider) == {}
    other = make_bert()
    with pytest.raises(AdapterFileError, match="no such module"):
        paretune.load(other, tmp_path / "a")
    assert paretune.adapters(other) == {}


def test_missing_and_corrupt_files(two, make_llama, tmp_path):
    model = two()
    good = paretune.save(model, tmp_path / "good", name="a")
    fresh = make_llama()
    before = {n: p.clone() for n, p in fresh.state_dict().items()}

    with pytest.raises(AdapterFileError, match="not an adapter folder"):
        paretune.load(fresh, tmp_path / "nowhere")

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "paretune.json").write_text((good / "paretune.json").read_text())
    with pytest.raises(AdapterFileError, match="no adapter.safetensors"):
        paretune.load(fresh, no_weights)

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "paretune.json").write_text((good / "paretune.json").read_text())
    data = (good / "adapter.safetensors").read_bytes()
    (truncated / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="corrupt or truncated"):
        paretune.load(fresh, truncated)

    bad_json = tmp_path / "bad-json"
    bad_json.mkdir()
    (bad_json / "paretune.json").write_text("{ not json")
    (bad_json / "adapter.safetensors").write_bytes(data)
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        paretune.load(fresh, bad_json)

    no_config = tmp_path / "no-config"
    no_config.mkdir()
    (no_config / "adapter.safetensors").write_bytes(data)
    with pytest.raises(AdapterFileError, match="no paretune.json"):
        paretune.load(fresh, no_config)

    assert paretune.adapters(fresh) == {}
    assert all(torch.equal(before[n], p) for n, p in fresh.state_dict().items())


def test_wrong_tensor_shapes_leave_the_model_unchanged(two, make_llama, tmp_path):
    model = make_llama()
    paretune.adapt(model, "lora", targets=["q_proj"], r=2)
    out = paretune.save(model, tmp_path / "a")
    meta = json.loads((out / "paretune.json").read_text())
    meta["config"]["r"] = 3  # the tensors say r=2
    (out / "paretune.json").write_text(json.dumps(meta))
    fresh = make_llama()
    with pytest.raises(AdapterFileError, match="options .config. were changed after the adapter was saved"):
        paretune.load(fresh, out)
    with pytest.raises(AdapterFileError, match="saved shape"):  # past the checksum, the shapes still refuse it
        paretune.load(fresh, out, verify=False)
    assert paretune.adapters(fresh) == {}
    assert isinstance(fresh.model.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_a_failed_save_writes_nothing(two, make_llama, tmp_path, monkeypatch):
    model = two()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pio, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        paretune.save(model, tmp_path / "out", name="a")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_save_keeps_the_old_folder(two, make_llama, tmp_path, monkeypatch):
    model = two()
    paretune.save(model, tmp_path / "out", name="a")
    old = (tmp_path / "out" / "adapter.safetensors").read_bytes()
    monkeypatch.setattr(pio, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        paretune.save(model, tmp_path / "out", name="b")
    assert (tmp_path / "out" / "adapter.safetensors").read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_save_refuses_merged_and_unknown(two, make_llama, tmp_path):
    model = two()
    with pytest.raises(ParetuneError, match="no adapter named 'zz'.*'a', 'b'"):
        paretune.save(model, tmp_path / "x", name="zz")
    paretune.merge(model, "a")
    with pytest.raises(ParetuneError, match="unmerge it before saving"):
        paretune.save(model, tmp_path / "x", name="a")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ParetuneError, match="not a folder"):
        paretune.save(model, tmp_path / "file", name="b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# -- task heads -------------------------------------------------------------------------------

def _trained_bert(make_bert, tmp_path):
    model = make_bert()
    paretune.adapt(model, "lora", targets=["query", "value"], r=2)
    model.classifier.requires_grad_(True)  # the head trains beside the adapter
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.config.id2label = {0: "Africa", 1: "Asia", 2: "Europe"}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    return model


def test_head_and_labels_round_trip(make_bert, ids, tmp_path):
    model = _trained_bert(make_bert, tmp_path)
    out = paretune.save(model, tmp_path / "a")
    meta = json.loads((out / "paretune.json").read_text())
    assert meta["heads"] == ["classifier"] and meta["id2label"] == {"0": "Africa", "1": "Asia", "2": "Europe"}
    assert set(load_file(str(out / "head.safetensors"))) == {"classifier.weight", "classifier.bias"}
    fresh = make_bert()
    assert not torch.equal(fresh.classifier.weight, model.classifier.weight)
    paretune.load(fresh, out)
    torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6, rtol=0)
    assert fresh.config.id2label == {0: "Africa", 1: "Asia", 2: "Europe"}
    assert fresh.config.label2id == {"Africa": 0, "Asia": 1, "Europe": 2}


def test_heads_none_and_frozen_head_write_no_head(make_bert, make_llama, tmp_path):
    model = _trained_bert(make_bert, tmp_path)
    out = paretune.save(model, tmp_path / "none", heads=None)
    assert sorted(os.listdir(out)) == ["adapter.safetensors", "paretune.json"]
    assert "heads" not in json.loads((out / "paretune.json").read_text())
    frozen = make_bert()
    paretune.adapt(frozen, "lora", targets=["query"], r=2)  # the head stays frozen: "auto" takes none
    assert "head.safetensors" not in os.listdir(paretune.save(frozen, tmp_path / "frozen"))
    explicit = paretune.save(frozen, tmp_path / "explicit", heads=["classifier"])
    assert json.loads((explicit / "paretune.json").read_text())["heads"] == ["classifier"]
    assert "id2label" not in json.loads((explicit / "paretune.json").read_text())  # LABEL_i placeholders
    with pytest.raises(ParetuneError, match="no module"):
        paretune.save(frozen, tmp_path / "bad", heads=["nope"])
    with pytest.raises(ParetuneError, match="is adapted"):
        paretune.save(frozen, tmp_path / "bad", heads=["bert.encoder.layer.0.attention.self.query"])


def test_head_shape_mismatch_is_a_clear_error(make_bert, tmp_path):
    from transformers import BertForSequenceClassification

    model = _trained_bert(make_bert, tmp_path)
    out = paretune.save(model, tmp_path / "a")
    cfg = make_bert().config
    cfg.num_labels = 5
    torch.manual_seed(0)
    five = BertForSequenceClassification(cfg).eval()
    with pytest.raises(AdapterFileError, match=r"head tensor 'classifier\.(weight|bias)' has shape \(3.*the model's has \(5.*num_labels"):
        paretune.load(five, out)
    assert "_paretune" not in five.__dict__  # nothing was added


# -- base weights hash ------------------------------------------------------------------------

def _other_weights(make_llama):
    return make_llama(seed=7)  # same shapes, other values


def test_weights_hash_is_saved_and_independent(make_llama, tmp_path):
    import hashlib

    from paretune.core.inject import base_tensors

    model = make_llama()
    paretune.adapt(model, "lora", targets=["q_proj"], r=2)
    meta = json.loads((paretune.save(model, tmp_path / "a") / "paretune.json").read_text())
    h = hashlib.sha256()  # recomputed here from the raw bytes, independently of the engine's streaming
    for t in meta["targets"]:
        inner = hashlib.sha256()
        for n, p in base_tensors(make_llama().get_submodule(t)):
            inner.update(f"{n}|{str(p.dtype)[6:]}|{list(p.shape)}|".encode())
            inner.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
        h.update(f"{t}:{inner.hexdigest()}\n".encode())
    assert meta["fingerprint"]["weights_sha256"] == h.hexdigest()


def test_lora_on_other_weights_warns_and_loads(make_llama, perturb, ids, tmp_path):
    model = make_llama()
    paretune.adapt(model, "lora", targets=["q_proj", "v_proj"], r=2)
    perturb(model)
    out = paretune.save(model, tmp_path / "a")
    other = _other_weights(make_llama)
    with pytest.warns(pio.BaseWeightsWarning, match="other base weights"):
        paretune.load(other, out)
    q = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(other.get_submodule(q).deltas["default"].delta_weight(),
                               model.get_submodule(q).deltas["default"].delta_weight())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paretune.load(_other_weights(make_llama), out, check_base=False)  # silenced
        paretune.load(make_llama(), out)  # the same weights: no warning


def test_pissa_on_other_weights_is_refused(make_llama, perturb, ids, tmp_path):
    model = make_llama()
    paretune.adapt(model, "pissa", targets=["q_proj", "v_proj"], r=2)
    perturb(model)
    out = paretune.save(model, tmp_path / "a")
    other = _other_weights(make_llama)
    before = other(input_ids=ids).logits
    with pytest.raises(AdapterFileError, match=r"pissa.*other base weights.*check_base=False"):
        paretune.load(other, out)
    assert "_paretune" not in other.__dict__
    torch.testing.assert_close(other(input_ids=ids).logits, before, atol=0, rtol=0)
    paretune.load(other, out, check_base=False)  # the override
    assert paretune.adapters(other)["default"].method == "pissa"
    same = paretune.load(make_llama(), out)  # PiSSA hashes the weights as they were before its residual
    torch.testing.assert_close(same(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_old_folder_without_hash_loads_silently(make_llama, perturb, tmp_path):
    import warnings

    model = make_llama()
    paretune.adapt(model, "pissa", targets=["q_proj"], r=2)
    out = paretune.save(model, tmp_path / "a")
    f = out / "paretune.json"
    meta = json.loads(f.read_text())
    del meta["fingerprint"]["weights_sha256"]
    f.write_text(json.dumps(meta))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paretune.load(_other_weights(make_llama), out)


def test_base_dependent_flags():
    from paretune.core import registry

    flags = {n: registry.get(n).depends_on_base_weights(registry.get(n).config_cls()) for n in
             ("lora", "vera", "pissa", "ia3", "hydra")}
    assert flags == {"lora": False, "vera": False, "pissa": True, "ia3": True, "hydra": True}


def test_changed_bytes_or_options_after_saving_are_refused(make_llama, tmp_path):
    """A flipped byte inside a tensor keeps the file readable and an edited alpha keeps the
    description valid; the checksums written by save refuse both (verify=False loads them)."""
    model = make_llama()
    paretune.adapt(model, "lora", targets=["q_proj"], r=2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    out = paretune.save(model, tmp_path / "a")
    data = bytearray((out / "adapter.safetensors").read_bytes())
    data[-3] ^= 0x01  # a low mantissa bit of the last tensor value: still a finite float
    (out / "adapter.safetensors").write_bytes(bytes(data))
    with pytest.raises(AdapterFileError, match="adapter.safetensors changed after it was saved"):
        paretune.load(make_llama(), out)
    paretune.load(make_llama(), out, verify=False)

    out2 = paretune.save(model, tmp_path / "b")
    meta = json.loads((out2 / "paretune.json").read_text())
    meta["config"]["alpha"] = 2 * meta["config"]["alpha"]
    (out2 / "paretune.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterFileError, match="config. were changed"):
        paretune.load(make_llama(), out2)
    loaded = paretune.load(make_llama(), out2, verify=False)
    assert paretune.adapters(loaded)["default"].config.alpha == meta["config"]["alpha"]


def test_a_hub_id_offline_is_a_clear_error_and_a_local_name_never_reaches_the_hub(make_llama, monkeypatch, tmp_path):
    """paretune.load takes a Hub id as transformers does; offline and not cached, the error names the
    id and HF_HUB_OFFLINE. A missing path that looks local is reported as such, without the Hub."""
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(AdapterFileError, match="someone/no-such-adapter.*HF_HUB_OFFLINE"):
        paretune.load(make_llama(), "someone/no-such-adapter")
    with pytest.raises(AdapterFileError, match="not an adapter folder"):
        paretune.load(make_llama(), str(tmp_path / "nowhere"))


def test_a_hub_id_is_read_from_the_downloaded_snapshot(make_llama, monkeypatch, tmp_path):
    """What snapshot_download returns is loaded like a local folder (the download itself is
    huggingface_hub's; no network here, so it is replaced by a copy into the cache)."""
    import huggingface_hub

    model = make_llama()
    paretune.adapt(model, "lora", targets=["q_proj"], r=2)
    saved = paretune.save(model, tmp_path / "a")
    asked = {}

    def fake_snapshot(repo_id, allow_patterns=None, **_):
        asked.update(repo_id=repo_id, patterns=allow_patterns)
        return str(saved)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    fresh = paretune.load(make_llama(), "someone/adapter")
    assert asked == {"repo_id": "someone/adapter", "patterns": ["paretune.json", "adapter.safetensors", "head.safetensors"]}
    assert list(paretune.adapters(fresh)) == ["default"]
