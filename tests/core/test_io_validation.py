"""paretune.load / read_meta on malformed adapter folders: every bad field of paretune.json, and
NaN / inf in the tensors, is an AdapterFileError naming it (and `paretune info` prints `error:`)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import paretune
from paretune import io as pio
from paretune.errors import AdapterFileError

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def saved(make_llama, tmp_path):
    model = make_llama()
    paretune.adapt(model, "lora", targets=["q_proj"], r=2)
    return paretune.save(model, tmp_path / "a")


def _edit(folder, change):
    f = folder / "paretune.json"
    meta = json.loads(f.read_text())
    change(meta)
    f.write_text(json.dumps(meta))


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


def _set_fp(key, value):
    return lambda m: m["fingerprint"].__setitem__(key, value)


MALFORMED = {
    "format_version string": (_set("format_version", "1"), "format_version"),
    "config list": (_set("config", [1, 2]), "config"),
    "fingerprint empty": (_set("fingerprint", {}), "fingerprint"),
    "modules list": (_set_fp("modules", [Q]), "fingerprint.modules"),
    "module entry null": (lambda m: m["fingerprint"]["modules"].__setitem__(Q, None), "fingerprint.modules"),
    "module shape string": (lambda m: m["fingerprint"]["modules"][Q].__setitem__("shape", "16x16"),
                            "fingerprint.modules"),
    "targets string": (_set("targets", Q), "targets"),
    "targets of ints": (_set("targets", [1, 2]), "targets"),
    "targets empty": (_set("targets", []), "targets"),
    "method number": (_set("method", 3), "method"),
    "name list": (_set("name", ["a"]), "name"),
    "bits string": (_set("bits", "4"), "bits"),
    "weights hash not hex": (_set_fp("weights_sha256", "abc"), "weights_sha256"),
    "heads string": (_set("heads", "classifier"), "heads"),
    "heads of ints": (_set("heads", [1]), "heads"),
    "id2label list": (_set("id2label", ["a", "b"]), "id2label"),
    "id2label bad key": (_set("id2label", {"x": "a"}), "id2label"),
    "id2label gap": (_set("id2label", {"0": "a", "2": "b"}), "id2label"),
    "config r string": (lambda m: m["config"].__setitem__("r", "two"), "config"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_field_is_a_clear_error(case, saved, make_llama):
    change, field = MALFORMED[case]
    _edit(saved, change)
    model = make_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFileError, match=field.split(".")[0]):
        paretune.load(model, saved)
    assert not hasattr(model, "_paretune") or "_paretune" not in model.__dict__  # nothing changed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensor_is_refused_naming_it(bad, saved, make_llama):
    f = saved / "adapter.safetensors"
    tensors = load_file(str(f))
    tensors[f"{Q}.A"][0, 0] = bad
    save_file(tensors, str(f))
    with pytest.raises(AdapterFileError, match=rf"{Q}\.A.*NaN or infinite"):
        paretune.load(make_llama(), saved)


def test_info_prints_error_for_malformed_field(saved):
    from paretune.cli import app

    _edit(saved, _set("format_version", "1"))
    result = CliRunner().invoke(app, ["info", str(saved)])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "format_version" in result.output


def test_read_meta_points_to_a_runs_adapter_subfolder(saved, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    saved.rename(run / "adapter")
    with pytest.raises(AdapterFileError, match="give that folder"):
        pio.read_meta(run)
