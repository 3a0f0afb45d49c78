"""`paretune bench --data/--eval-data`: the user's own files, split by hash, checked before any run."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from paretune.bench import sweep
from paretune.bench.data import (TEST_FRACTION, VAL_FRACTION, carve, check_model_kind, prepare_user_data,
                                 unit_hash)
from paretune.data.examples import Dataset
from paretune.errors import ParetuneError

def arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def options_of(argv: list[str]) -> dict:
    return {a.partition("=")[0]: json.loads(a.partition("=")[2]) for prev, a in zip(argv, argv[1:]) if prev == "-o"}


cli = CliRunner()
WORDS = [f"city{i:03d}" for i in range(200)]


def write_csv(path: Path, rows, header=("text", "label")) -> Path:
    path.write_text(",".join(header) + "\n" + "".join(",".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cls_rows(n=200, flip=False):
    return [(w, ("b" if i % 2 else "a") if not flip else ("a" if i % 2 else "b")) for i, w in enumerate(WORDS[:n])]


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_carved_splits_are_stable_disjoint_and_hash_based(tmp_path):
    data = write_csv(tmp_path / "train.csv", cls_rows())
    s = prepare_user_data(data, None, tmp_path / "out")
    assert s.kind == "classification" and s.metric == "accuracy" and s.name.startswith("train.csv#")
    train, test = read_jsonl(s.train), read_jsonl(s.test)
    val, search = read_jsonl(s.val), read_jsonl(s.search_train)
    texts = lambda rows: {r["text"] for r in rows}  # noqa: E731
    assert texts(train) | texts(test) == set(WORDS) and not texts(train) & texts(test)
    assert texts(val) | texts(search) == texts(train) and not texts(val) & texts(search)
    assert texts(test) == {w for w in WORDS if unit_hash("paretune-test", w) < TEST_FRACTION}
    assert texts(val) == {w for w in texts(train) if unit_hash("paretune-val", w) < VAL_FRACTION}
    assert 20 <= len(test) <= 60 and 5 <= len(val) <= 35
    # the same file again: the same id and files; reordered rows: the same split, another id (content hash)
    assert prepare_user_data(data, None, tmp_path / "out") == s
    write_csv(tmp_path / "shuffled.csv", list(reversed(cls_rows())))
    s2 = prepare_user_data(tmp_path / "shuffled.csv", None, tmp_path / "out")
    assert s2.data_id != s.data_id and texts(read_jsonl(s2.test)) == texts(test)


def test_eval_data_is_the_test_split(tmp_path):
    data = write_csv(tmp_path / "train.csv", cls_rows(150))
    ev = write_csv(tmp_path / "test.csv", [(w, "a") for w in WORDS[150:]])
    s = prepare_user_data(data, ev, tmp_path / "out")
    assert len(read_jsonl(s.test)) == 50 and s.counts["train"] == 150
    assert s.data_id != prepare_user_data(data, None, tmp_path / "out").data_id
    write_csv(ev, [(w, "b") for w in WORDS[150:]])  # a changed test file changes every key
    assert prepare_user_data(data, ev, tmp_path / "out").data_id != s.data_id


def test_carve():
    ds = Dataset("generation", [{"prompt": w, "completion": " x"} for w in WORDS])
    keep, out = carve(ds, "salt", 0.5)
    assert len(keep) + len(out) == 200 and 70 < len(out) < 130


@pytest.mark.parametrize("content, name, message", [
    ("text,answer\nParis,Europe\n", "t.csv", "columns ['answer', 'text'] fit no task kind; classification needs "
                                             "'text' and 'label'"),
    ("", "t.csv", "is empty"),
    ("text,label\n", "t.csv", "holds no examples"),
    ('{"prompt": "a"}\n', "t.jsonl", "fit no task kind"),
    ("text,label\n" + "".join(f"c{i},Europe\n" for i in range(50)), "t.csv",
     "every training row has the label 'Europe'"),
    ("text,label\nParis,Europe\n", "t.csv", "the test split is empty; with 1 row"),
])
def test_bad_data(tmp_path, content, name, message):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(ParetuneError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        prepare_user_data(p, None, tmp_path / "out")


def test_eval_data_of_another_kind(tmp_path):
    data = write_csv(tmp_path / "train.csv", cls_rows())
    ev = jsonl(tmp_path / "test.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(ParetuneError, match="--eval-data.*lacks 'text', 'label'.*same columns: text, label"):
        prepare_user_data(data, ev, tmp_path / "out")
    with pytest.raises(ParetuneError, match="does not exist"):
        prepare_user_data(tmp_path / "nope.csv", None, tmp_path / "out")


def test_model_kind_checks(tmp_path):
    with pytest.raises(ParetuneError, match="minilm-l6 cannot do generation.*causal LM such as smollm2-135m"):
        check_model_kind("minilm-l6", "generation")
    check_model_kind("minilm-l6", "classification")
    check_model_kind("smollm2-135m", "generation")
    check_model_kind("smollm2-135m", "classification")
    enc = tmp_path / "enc"
    enc.mkdir()
    (enc / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ParetuneError, match="architectures are BertModel, not a causal LM"):
        check_model_kind(str(enc), "generation")
    check_model_kind(str(enc), "classification")


# -- through the CLI, with the fake runner ---------------------------------------------------

@pytest.fixture
def fake(monkeypatch, make_bert, fake_runner, route_runs):
    runner = route_runs(fake_runner())
    monkeypatch.setattr(sweep, "load_model_for", lambda model, kind: make_bert())
    return runner


def test_bench_on_user_data(app, fake, tmp_path):
    data = write_csv(tmp_path / "train.csv", cls_rows())
    out = tmp_path / "o"
    args = ["--model", "tiny", "--data", str(data), "--methods", "lora", "--budget", "960", "--baselines", "head",
            "--steps", "3", "--out", str(out)]
    res = cli.invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "data: train.csv#" in res.stdout and "training rows" in res.stdout
    assert len(fake.calls) == 2
    for c in fake.calls:
        assert "--task" not in c and arg(c, "--data").endswith("train.jsonl") and arg(c, "--eval-data").endswith("test.jsonl")
    conn = sqlite3.connect(out / "runs.sqlite")
    tasks = {r[0] for r in conn.execute("SELECT task FROM runs")}
    assert len(tasks) == 1 and next(iter(tasks)).startswith("train.csv#")
    conn.close()
    # the same command: nothing reruns; an edited file: new runs (the key holds the content hash)
    cli.invoke(app, args, catch_exceptions=False)
    assert len(fake.calls) == 2
    write_csv(data, cls_rows()[:-1])
    assert cli.invoke(app, args, catch_exceptions=False).exit_code == 0 and len(fake.calls) == 4
    # bad input later on the same folder: a clear error before any run, finished runs kept
    bad = write_csv(tmp_path / "bad.csv", [("x", "y")], header=("sentence", "category"))
    res = cli.invoke(app, args[:2] + ["--data", str(bad)] + args[4:])
    assert res.exit_code == 2 and "columns ['category', 'sentence'] fit no task kind" in res.stderr
    assert len(fake.calls) == 4
    conn = sqlite3.connect(out / "runs.sqlite")
    assert conn.execute("SELECT COUNT(*) FROM runs WHERE status = 'finished'").fetchone()[0] == 4
    conn.close()


@pytest.mark.parametrize("args, message", [
    (["--data", "X"], "--data needs --model"),
    (["--model", "m", "--eval-data", "X"], "--eval-data needs --data"),
    (["--model", "m", "--task", "city-continent", "--data", "X"], "not both"),
])
def test_bad_options(app, fake, tmp_path, args, message):
    res = cli.invoke(app, [a.replace("X", str(tmp_path / "d.csv")) for a in args] + ["--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and message in res.stderr, res.output
    assert fake.calls == []


def test_generation_data_through_table_plot_and_report(app, monkeypatch, make_bert, fake_runner, route_runs,
                                                       tmp_path):
    runner = route_runs(fake_runner(metric="exact_match"))
    monkeypatch.setattr(sweep, "load_model_for", lambda model, kind: make_bert())
    data = jsonl(tmp_path / "capitals.jsonl", [{"prompt": f"Country: {w}\nCapital:", "completion": f" {w}ville"}
                                                for w in WORDS])
    out = tmp_path / "o"
    res = cli.invoke(app, ["--model", "tiny-lm", "--data", str(data), "--methods", "lora", "--budget", "960",
                           "--seeds", "0,1", "--steps", "2", "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "exact_match (95% CI)" in res.stdout and "recommendation:" in res.stdout
    page = (out / "report.html").read_text()
    assert "exact_match" in page and "Recommendation" in page and (out / "pareto.png").is_file()
    assert all("--head-lr" not in c for c in runner.calls)  # generation: no classification head


def test_encoder_model_with_generation_data_fails_before_any_run(app, monkeypatch, fake_runner, route_runs,
                                                                tmp_path):
    runner = route_runs(fake_runner())
    data = jsonl(tmp_path / "g.jsonl", [{"prompt": w, "completion": " x"} for w in WORDS])
    res = cli.invoke(app, ["--model", "minilm-l6", "--data", str(data), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "minilm-l6 cannot do generation" in res.stderr and runner.calls == []


@pytest.mark.slow
def test_tiny_causal_lm_end_to_end(tmp_path):
    """A real `paretune train` per run: a tiny random Llama on a small prompt,completion JSONL."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    import torch

    torch.manual_seed(0)
    folder = tmp_path / "tiny-llama"
    vocab = {c: i for i, c in enumerate(["<unk>", "<s>", "</s>"] + list("abcdefghijklmnopqrstuvwxyz0123456789:\n ,"))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    data = jsonl(tmp_path / "g.jsonl", [{"prompt": f"{w[-3:]}:", "completion": f" {w[-2:]}"} for w in WORDS[:120]])
    from paretune.bench.cli import run_bench

    result, files = run_bench(model=str(folder), data=data, methods=["lora"], budgets=[400], seeds=[0],
                              steps=2, batch_size=4, baselines=[], out=tmp_path / "o", progress=False,
                              echo=lambda s: None)
    assert result.finished == 1 and not result.failed
    assert files.summary.metric == "exact_match" and files.summary.rows
    assert "eval_loss" in files.summary.runs[0]["metrics"]
