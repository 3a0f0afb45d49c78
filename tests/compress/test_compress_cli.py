"""`paretune compress`: end to end on a tiny saved model, the calibration sources, every refusal
(exit 2, one error line, --out untouched), and once on the bundled SmolLM2 (slow)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from compress_models import char_tokenizer, tiny_llama
from typer.testing import CliRunner

import paretune.models
from paretune.cli import app
from paretune.compress import is_quantized, masks, prune, quantize
from paretune.compress.cli import calibration_texts
from paretune.compress.storage import FLOAT_FILE, info
from paretune.errors import ConfigError

runner = CliRunner()
IDS = torch.tensor([[5, 9, 3, 17, 40, 8, 2]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "base"
    tiny_llama(vocab=128).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def _run(*args):
    return runner.invoke(app, ["compress", *map(str, args)])


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_prune_and_quantize_equals_the_python_calls(base, tmp_path):
    out = tmp_path / "pq"
    res = _run("--model", base, "--quantize", 4, "--group-size", 8, "--prune", 0.5, "--out", out)
    assert res.exit_code == 0, res.output
    assert "sparsity 50.0%" in res.output and "dense storage;" in res.output
    assert "paretune.models.load(" in res.output and "before" in res.output and "time:" in res.output
    loaded, tok = paretune.models.load(str(out))
    assert tok is not None and is_quantized(loaded) and len(masks(loaded)) == 14
    ref, _ = paretune.models.load(str(base))
    prune(ref, 0.5, progress=False)
    quantize(ref, bits=4, group_size=8, progress=False)
    assert torch.equal(_logits(loaded), _logits(ref))
    i = info(out)
    assert i["settings"] == [{"bits": 4, "group_size": 8, "axis": "out"}] and i["sparsity"] == 0.5
    assert not (out / FLOAT_FILE).exists()


def test_prune_only_writes_a_folder_transformers_reads(base, tmp_path):
    out = tmp_path / "p"
    res = _run("--model", base, "--prune", 0.25, "--prune-method", "magnitude-global", "--targets", "q_proj",
               "--targets", "v_proj", "--out", out, "--quiet")
    assert res.exit_code == 0 and res.output == ""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    loaded, _ = paretune.models.load(str(out))
    assert torch.equal(_logits(plain), _logits(loaded))
    assert sorted({n.split(".")[-1] for n in masks(loaded)}) == ["q_proj", "v_proj"]


def test_wanda_with_calibration_files(base, tmp_path):
    lines = ["The capital of France is Paris.", "", "Berlin is in Germany.", "Rome, Italy."]
    (tmp_path / "c.txt").write_text("\n".join(lines))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in lines if t))
    (tmp_path / "c.csv").write_text("prompt,completion\nCountry: France,Paris\nCountry: Italy,Rome\n")
    assert calibration_texts(str(tmp_path / "c.txt"), 2) == [lines[0], lines[2]]
    assert calibration_texts(str(tmp_path / "c.jsonl"), 10) == [t for t in lines if t]
    assert calibration_texts(str(tmp_path / "c.csv"), 10) == ["Country: FranceParis", "Country: ItalyRome"]
    task = calibration_texts("country-capital", 3)
    assert len(task) == 3 and all(t.startswith("Country: ") and "\nCapital: " in t for t in task)
    with pytest.raises(ConfigError, match="neither a built-in task"):
        calibration_texts(str(tmp_path / "missing.txt"), 3)
    out = tmp_path / "w"
    res = _run("--model", base, "--prune", 0.5, "--prune-method", "wanda", "--calibration", tmp_path / "c.jsonl",
               "--calibration-size", 2, "--out", out)
    assert res.exit_code == 0, res.output
    loaded, _ = paretune.models.load(str(out))
    ref, tok = paretune.models.load(str(base))
    batches = [tok(t, return_tensors="pt")["input_ids"] for t in lines[:1] + lines[2:3]]
    prune(ref, 0.5, "wanda", calibration=batches, progress=False)
    for name, mask in masks(ref).items():
        assert torch.equal(masks(loaded)[name], mask), name


def test_overwrite(base, tmp_path):
    out = tmp_path / "o"
    out.mkdir()  # an empty folder is fine
    assert _run("--model", base, "--quantize", 8, "--group-size", 0, "--out", out, "--quiet").exit_code == 0
    res = _run("--model", base, "--quantize", 4, "--group-size", 8, "--out", out, "--quiet", "--overwrite")
    assert res.exit_code == 0 and info(out)["settings"][0]["bits"] == 4


@pytest.mark.parametrize("args, message", [
    ([], "nothing to do"),
    (["--quantize", "5"], "bits=5"),
    (["--prune", "1.0"], "[0, 1)"),
    (["--prune", "-0.1"], "[0, 1)"),
    (["--prune", "0.5", "--prune-method", "random"], "unknown"),
    (["--prune", "0.5", "--prune-method", "wanda"], "needs --calibration"),
    (["--prune", "0.5", "--calibration", "country-capital"], "only used by"),
    (["--prune", "0.5", "--prune-method", "wanda", "--calibration", "nowhere.txt"], "neither a built-in task"),
    (["--quantize", "4", "--group-size", "12"], "--group-size 16 divides"),
    (["--quantize", "4", "--group-size", "8", "--axis", "sideways"], "axis"),
    (["--prune", "0.5", "--targets", "nothing_here"], "nothing_here"),
    (["--quantize", "4", "--group-size", "8", "--targets", "re:x.*"], "matched no"),
])
def test_bad_input_exits_2_with_one_line_and_no_output(base, tmp_path, args, message):
    out = tmp_path / "bad"
    res = _run("--model", base, *args, "--out", out)
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], res.output
    assert "Traceback" not in res.output and not out.exists()


def test_refuses_a_compressed_model_and_a_non_empty_out(base, tmp_path):
    done = tmp_path / "done"
    assert _run("--model", base, "--prune", 0.5, "--out", done, "--quiet").exit_code == 0
    res = _run("--model", done, "--quantize", 4, "--group-size", 8, "--out", tmp_path / "again")
    assert res.exit_code == 2 and "already a compressed folder (pruned)" in res.output
    assert not (tmp_path / "again").exists()
    before = {p.name: p.read_bytes() for p in done.iterdir()}
    res = _run("--model", base, "--quantize", 4, "--group-size", 8, "--out", done)
    assert res.exit_code == 2 and "not empty" in res.output and "--overwrite" in res.output
    assert {p.name: p.read_bytes() for p in done.iterdir()} == before  # untouched
    res = _run("--model", base, "--quantize", 4, "--group-size", 8, "--out", base, "--overwrite")
    assert res.exit_code == 2 and "is the model being compressed" in res.output


@pytest.mark.slow
def test_smollm2_4bit_half_magnitude(tmp_path):
    out = tmp_path / "smol"
    t0 = time.perf_counter()
    res = _run("--model", "smollm2-135m", "--quantize", 4, "--group-size", 64, "--prune", 0.5, "--out", out)
    seconds = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    print(res.output, f"\nwall: {seconds:.1f} s")
    i = info(out)
    assert i["quantized_modules"] == 210 and i["pruned_modules"] == 210 and i["sparsity"] == 0.5
    loaded, tok = paretune.models.load(str(out))
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(loaded(ids).logits).all()
