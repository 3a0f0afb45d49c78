"""Safe checkpoints (nothing unpickles; clear errors for old, corrupt or mismatched ones),
divergence (nothing non-finite is saved), finite options, and same seed -> same files.

CLI cases run `paretune train` on a tiny BERT classifier saved to a folder (MiniLM's tokenizer),
so each takes a few seconds."""

from __future__ import annotations

import csv
import json
import math
import pickle

import pytest
import torch
from safetensors.torch import load_file

import paretune
from paretune.errors import ConfigError, DivergedError, ParetuneError
from paretune.training import train
from paretune.training.checkpoint import has_checkpoint, read_checkpoint
from paretune.training.cli import run_training


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, minilm_tokenizer):
    """A saved 1-layer BERT classifier (3 labels) with MiniLM's tokenizer, and train/eval CSVs."""
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    net = BertForSequenceClassification(BertConfig(
        vocab_size=minilm_tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    net.save_pretrained(root / "model")
    minilm_tokenizer.save_pretrained(root / "model")
    words = ["red", "green", "blue", "cyan", "pink", "gold", "grey", "teal"]
    rows = [{"text": f"{a} {b}", "label": str((i + j) % 3)} for i, a in enumerate(words) for j, b in enumerate(words)]
    for name, part in (("train.csv", rows), ("eval.csv", rows[:16])):
        with open(root / name, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["text", "label"])
            w.writeheader()
            w.writerows(part)
    return root


def _cli(tiny_dir, out, *args):
    from typer.testing import CliRunner

    from paretune.cli import app

    argv = ["train", "--model", str(tiny_dir / "model"), "--data", str(tiny_dir / "train.csv"), "--eval-data",
            str(tiny_dir / "eval.csv"), "--batch-size", "8", "--out", str(out), *args]
    return CliRunner().invoke(app, argv)


def _run(tiny_dir, out, **kw):
    args = dict(model=str(tiny_dir / "model"), task=None, data=str(tiny_dir / "train.csv"),
                eval_data=str(tiny_dir / "eval.csv"), method="lora", options={"r": 2}, targets=None, steps=3,
                lr=1e-2, batch_size=8, seed=0, out=out, progress=False)
    return run_training(**{**args, **kw})


# -- checkpoints ---------------------------------------------------------------------------------

class _Payload:
    """Unpickling this would create a file: the test checks it never happens."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_old_pickle_checkpoint_is_refused_unopened(tiny_dir, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint").mkdir(parents=True)
    marker = tmp_path / "pwned"
    with open(out / "checkpoint" / "state.pt", "wb") as f:
        pickle.dump({"step": 1, "x": _Payload(marker)}, f)
    res = _cli(tiny_dir, out, "--steps", "2", "--resume")
    assert res.exit_code == 2, res.output
    assert "older paretune" in res.output and "delete" in res.output and "start again" in res.output
    assert "Traceback" not in res.output
    assert not marker.exists()
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()


@pytest.fixture
def checkpointed(tiny_bert, minilm_tokenizer, colour_data, tmp_path):
    """A checkpoint at step 2 of a 4-step LoRA run, and the run's keyword arguments."""
    kw = dict(tokenizer=minilm_tokenizer, method="lora", options={"r": 2}, steps=4, lr=1e-2, batch_size=8,
              progress=False, seed=1)
    ck = tmp_path / "ck"
    train(tiny_bert(minilm_tokenizer.vocab_size), colour_data, checkpoint_dir=str(ck), checkpoint_every=2, **kw)
    assert has_checkpoint(ck)
    return ck, kw


def _resume(tiny_bert, minilm_tokenizer, colour_data, ck, kw):
    return train(tiny_bert(minilm_tokenizer.vocab_size), colour_data, checkpoint_dir=str(ck), resume=True, **kw)


def test_checkpoint_holds_no_pickle(checkpointed):
    ck, _ = checkpointed
    assert sorted(p.name for p in ck.iterdir()) == ["state.json", "state.safetensors"]
    meta, tensors = read_checkpoint(ck)
    assert meta["step"] == 2 and len(meta["history"]) == 2
    assert meta["run"]["method"] == "lora" and meta["run"]["options"] == {"r": 2} and meta["run"]["lr"] == 0.01
    assert tensors["rng/torch"].dtype == torch.uint8
    assert any(k.startswith("optim/") and k.endswith("/exp_avg") for k in tensors)


@pytest.mark.parametrize("change, named", [
    ({"options": {"r": 4}}, "options"),
    ({"method": "vera", "options": {"r": 2}}, "method"),
    ({"lr": 5e-3}, "lr"),
    ({"batch_size": 16}, "batch_size"),
])
def test_resume_with_other_options_names_them(checkpointed, tiny_bert, minilm_tokenizer, colour_data, change, named):
    ck, kw = checkpointed
    with pytest.raises(ParetuneError, match=rf"other options \({named}: checkpoint"):
        _resume(tiny_bert, minilm_tokenizer, colour_data, ck, {**kw, **change})


def test_resume_with_fewer_steps_than_the_checkpoint(checkpointed, tiny_bert, minilm_tokenizer, colour_data):
    ck, kw = checkpointed
    with pytest.raises(ParetuneError, match=r"at step 2, beyond --steps 1; give --steps >= 2"):
        _resume(tiny_bert, minilm_tokenizer, colour_data, ck, {**kw, "steps": 1})
    got = _resume(tiny_bert, minilm_tokenizer, colour_data, ck, {**kw, "steps": 5})  # more steps: allowed
    assert len(got.history) == 5


@pytest.mark.parametrize("damage", ["truncate", "json", "missing"])
def test_corrupt_checkpoint_is_a_clear_error(checkpointed, tiny_bert, minilm_tokenizer, colour_data, damage):
    ck, kw = checkpointed
    if damage == "truncate":
        data = (ck / "state.safetensors").read_bytes()
        (ck / "state.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "json":
        (ck / "state.json").write_text('{"format": 2, "step"')
    else:
        (ck / "state.safetensors").unlink()
    with pytest.raises(ParetuneError, match="corrupt or incomplete"):
        _resume(tiny_bert, minilm_tokenizer, colour_data, ck, kw)


# -- divergence ----------------------------------------------------------------------------------

def test_nan_loss_stops_and_nothing_nonfinite_is_checkpointed(tiny_bert, minilm_tokenizer, colour_data, tmp_path):
    """A hook poisons the adapter after step 2: the checkpoint of step 2 refuses the NaN tensors,
    and the step-1 checkpoint stays as it was."""
    def poison(step, model, opt):
        if step == 2:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if n.endswith(".A")).fill_(float("nan"))

    ck = tmp_path / "ck"
    with pytest.raises(DivergedError, match=r"step 2: .* non-finite .* lower --lr"):
        train(tiny_bert(minilm_tokenizer.vocab_size), colour_data, tokenizer=minilm_tokenizer, method="lora",
              options={"r": 2}, steps=4, batch_size=8, progress=False, checkpoint_dir=str(ck), checkpoint_every=1,
              on_step=poison)
    meta, tensors = read_checkpoint(ck)
    assert meta["step"] == 1
    assert all(bool(torch.isfinite(t.float()).all()) for t in tensors.values())
    with pytest.raises(DivergedError, match=r"step 3: the loss is nan"):  # without checkpoints: the loss
        train(tiny_bert(minilm_tokenizer.vocab_size), colour_data, tokenizer=minilm_tokenizer, method="lora",
              options={"r": 2}, steps=4, batch_size=8, progress=False, on_step=poison)


def test_nonfinite_gradient_norm_stops(tiny_bert, minilm_tokenizer, colour_data, monkeypatch):
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", lambda self, params, max_norm: torch.tensor(math.inf))
    with pytest.raises(DivergedError, match=r"step 1: the gradient norm is inf"):
        train(tiny_bert(minilm_tokenizer.vocab_size), colour_data, tokenizer=minilm_tokenizer, method="lora",
              options={"r": 2}, steps=2, batch_size=8, progress=False)


def test_huge_lr_diverges_and_writes_nothing(tiny_dir, tmp_path):
    out = tmp_path / "out"
    res = _cli(tiny_dir, out, "--steps", "20", "--lr", "1e9", "-o", "r=2")
    assert res.exit_code == 2, res.output
    assert "diverged" in res.output or "non-finite" in res.output
    assert "lower" in res.output and "Traceback" not in res.output
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("args, named", [
    (["--lr", "inf"], "lr=inf"),
    (["--lr", "nan"], "lr=nan"),
    (["-o", "alpha=Infinity"], "alpha=inf"),
    (["-o", "dropout=NaN"], "dropout=nan"),
    (["--method", "hydra", "-o", "scale=NaN"], "scale=nan"),
    (["--weight-decay", "inf"], "weight_decay=inf"),
    (["--warmup", "-1"], "warmup=-1"),
    (["--scheduler", "step"], "schedule 'step'"),
    (["--eval-every", "-1"], "eval_every=-1"),
])
def test_non_finite_or_bad_run_options_refused(tiny_dir, tmp_path, args, named):
    out = tmp_path / "out"
    res = _cli(tiny_dir, out, "--steps", "1", *args)
    assert res.exit_code == 2, res.output
    assert named in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_configs_refuse_inf_and_nan(tiny_bert):
    model = tiny_bert(100)
    for method, opts in [("lora", {"alpha": math.inf}), ("lora", {"alpha": math.nan}), ("hydra", {"scale": math.nan}),
                         ("hydra", {"scale": math.inf}), ("lora", {"dropout": math.nan})]:
        with pytest.raises(ConfigError, match="finite|in \\[0, 1\\)"):
            paretune.adapt(model, method, targets=["query"], **opts)
    paretune.adapt(model, "hydra", targets=["query"], scale=-0.5)  # any finite scale is fine


def test_every_registered_config_refuses_non_finite_floats():
    """The base class refuses inf / NaN in any float option, whatever the method's validate does."""
    import dataclasses

    from paretune.core.registry import _METHODS

    checked = 0
    for name, spec in sorted(_METHODS.items()):
        for f in dataclasses.fields(spec.config_cls):
            if f.default is dataclasses.MISSING or not isinstance(f.default, float):
                continue
            for bad in (math.inf, -math.inf, math.nan):
                with pytest.raises(ConfigError):
                    spec.config_cls.from_dict({f.name: bad})
            checked += 1
    assert checked >= 10


# -- same seed, outputs, CLI --------------------------------------------------------------------

def test_same_seed_gives_identical_files_and_head_travels_with_adapter(tiny_dir, tmp_path):
    a = _run(tiny_dir, tmp_path / "a", eval_every=2)
    b = _run(tiny_dir, tmp_path / "b", eval_every=2)
    for f in ("adapter.safetensors", "head.safetensors"):
        ta, tb = load_file(tmp_path / "a" / "adapter" / f), load_file(tmp_path / "b" / "adapter" / f)
        assert ta.keys() == tb.keys() and ta
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (f, k)
    assert {k: v for k, v in a.items() if k not in ("train_seconds", "peak_memory_bytes")} == \
        {k: v for k, v in b.items() if k not in ("train_seconds", "peak_memory_bytes")}
    assert not (tmp_path / "a" / "head").exists()  # the head is in adapter/, with its label names
    meta = json.loads((tmp_path / "a" / "adapter" / "paretune.json").read_text())
    assert meta["heads"] == ["classifier"] and meta["id2label"] == {"0": "0", "1": "1", "2": "2"}
    hist = a["eval_history"]
    assert [h["step"] for h in hist] == [2, 3] and hist[-1]["accuracy"] == a["accuracy"]
    c = _run(tiny_dir, tmp_path / "c", seed=1)
    tc = load_file(tmp_path / "c" / "adapter" / "adapter.safetensors")
    ta = load_file(tmp_path / "a" / "adapter" / "adapter.safetensors")
    assert any(not torch.equal(ta[k], tc[k]) for k in ta)  # and another seed differs


def test_cli_summary_says_where_and_how_to_load(tiny_dir, tmp_path):
    out = tmp_path / "out"
    res = _cli(tiny_dir, out, "--steps", "2", "-o", "r=2", "--targets", "query,value", "--scheduler", "cosine",
               "--warmup", "0.5", "--weight-decay", "0.01", "--eval-every", "1")
    assert res.exit_code == 0, res.output
    for text in ("accuracy=", "eval_loss=", "train_loss=", "step 1:", str(out / "adapter"),
                 "paretune.models.load(", "num_labels=3", f"paretune.load(model, {json.dumps(str(out / 'adapter'))})"):
        assert text in res.output, text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["schedule"] == "cosine" and metrics["weight_decay"] == 0.01
    assert [h["step"] for h in metrics["eval_history"]] == [1, 2]
    meta = json.loads((out / "adapter" / "paretune.json").read_text())
    assert sorted({t.rsplit(".", 1)[-1] for t in meta["targets"]}) == ["query", "value"]
    # the snippet it printed works
    import paretune.models

    model, _ = paretune.models.load(str(tiny_dir / "model"), task="classification", num_labels=3)
    paretune.load(model, out / "adapter")
    assert model.config.id2label == {0: "0", 1: "1", 2: "2"}


def test_head_method_writes_head_json(tiny_dir, tmp_path):
    out = tmp_path / "out"
    m = _run(tiny_dir, out, method="head", options={}, steps=2)
    assert m["method"] == "head"
    info = json.loads((out / "head" / "head.json").read_text())
    assert info == {"heads": ["classifier"], "id2label": {"0": "0", "1": "1", "2": "2"}}
    assert set(load_file(out / "head" / "head.safetensors")) == {"classifier.weight", "classifier.bias"}


def test_defaults_match_python_train():
    import inspect

    from paretune.training.cli import run_training, train_command

    sig = inspect.signature(train)
    cli = inspect.signature(train_command)
    py = inspect.signature(run_training)
    assert sig.parameters["steps"].default == py.parameters["steps"].default == cli.parameters["steps"].default.default
    assert sig.parameters["batch_size"].default == py.parameters["batch_size"].default == \
        cli.parameters["batch_size"].default.default == 16
    assert sig.parameters["schedule"].default == cli.parameters["scheduler"].default.default
    assert sig.parameters["warmup"].default == cli.parameters["warmup"].default.default
