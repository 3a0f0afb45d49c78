"""`paretune train` end to end on the real bundled MiniLM (small: a few steps, few examples)."""

import json

import pytest
from typer.testing import CliRunner

from paretune.errors import ParetuneError
from paretune.training.cli import parse_options, run_training


def test_parse_options():
    assert parse_options(["r=8", "alpha=16.5", "init=gaussian", "rslora=true"]) == {
        "r": 8, "alpha": 16.5, "init": "gaussian", "rslora": True}
    with pytest.raises(ParetuneError, match="key=value"):
        parse_options(["r8"])


@pytest.mark.parametrize("method", ["lora", "head"])
def test_train_writes_adapter_and_metrics(tmp_path, method):
    out = tmp_path / method
    m = run_training(model="minilm-l6", task="city-continent", data=None, eval_data=None, method=method,
                     options={"r": 2} if method == "lora" else {}, targets=None, steps=2, lr=1e-3, batch_size=8,
                     seed=0, out=out, max_train=256, max_eval=16, progress=False)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(m))
    for key in ("method", "trainable", "stored_bytes", "train_seconds", "peak_memory_bytes", "accuracy"):
        assert key in saved
    # the head goes with the adapter (adapter/head.safetensors); a separate head/ only for --method head
    assert (out / "head" / "head.safetensors").is_file() == (method == "head")
    assert (out / "adapter" / "paretune.json").is_file() == (method == "lora")
    assert (out / "adapter" / "head.safetensors").is_file() == (method == "lora")
    if method == "head":
        assert saved["num_labels"] == 6  # a hash-ordered prefix of 256 cities covers every continent
        assert saved["trainable"] == 384 * 6 + 6 and saved["stored_bytes"] == 4 * saved["trainable"]


def test_cli_bad_inputs_write_nothing(tmp_path):
    from paretune.cli import app

    runner = CliRunner()
    data = tmp_path / "d.csv"
    data.write_text("text\nhello\n", encoding="utf-8")
    cases = [
        ["--task", "no-such-task"],
        ["--model", "minilm-l6", "--data", str(data)],
        ["--model", str(tmp_path / "no-model"), "--task", "city-continent"],
        ["--task", "city-continent", "--method", "no-such-method"],
        ["--model", "minilm-l6", "--data", str(tmp_path / "missing.csv")],
    ]
    for args in cases:
        out = tmp_path / "out"
        res = runner.invoke(app, ["train", *args, "--steps", "1", "--out", str(out)])
        assert res.exit_code != 0, args
        assert "Traceback" not in (res.output or "")
        assert not out.exists(), args
