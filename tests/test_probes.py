"""Reliability cases: broken adapter folders, bad options, bad data, interrupted and repeated
runs. Each case asserts the right behaviour: a ParetuneError with a message naming the problem
(on the command line: ``error: ...``, exit status 2, no traceback), or a correct result.

API cases use a tiny Llama (hidden 32, 2 layers); command-line cases run ``paretune.cli.main``
in this process on a tiny BERT (hidden 32, 2 layers) saved with MiniLM's tokenizer to a
temporary folder, so no case loads a real model."""

from __future__ import annotations

import json
import math
import pickle
import struct
import warnings
from pathlib import Path

import pytest
import torch

import paretune
from paretune.errors import AdapterFileError, ConfigError, ParetuneError
from tiny_models import bert_cls, llama, save_tiny_bert_classifier

# -- tiny models and helpers -----------------------------------------------------------------------


def trained(method: str = "lora", seed: int = 0, **options):
    """A tiny Llama with ``method`` adapted and every adapter parameter randomised (as if trained)."""
    net = llama(seed)
    paretune.adapt(net, method, **options)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net


def saved(tmp_path: Path, method: str = "lora", **options) -> Path:
    path = tmp_path / f"ad-{method}"
    paretune.save(trained(method, **options), path)
    return path


IDS = torch.tensor([[3, 5, 7, 9, 11, 13]])


def logits(net) -> torch.Tensor:
    with torch.no_grad():
        return net(input_ids=IDS).logits


def meta_of(path: Path) -> dict:
    return json.loads((path / "paretune.json").read_text())


def write_meta(path: Path, meta) -> None:
    (path / "paretune.json").write_text(json.dumps(meta))


def refuses(fn, error=ParetuneError, match: str | None = None) -> ParetuneError:
    with pytest.raises(error, match=match) as e:
        fn()
    assert str(e.value).strip(), "the error has no message"
    return e.value


# -- command-line fixtures -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny BERT classifier with MiniLM's tokenizer, saved as a local model folder."""
    return save_tiny_bert_classifier(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("data")
    words = ["red apple", "green leaf", "blue sky", "yellow sun", "dark night", "white snow", "hot fire", "cold ice"]
    rows = [(w + f" {i}", "warm" if w.split()[0] in ("red", "yellow", "hot") else "cool")
            for i in range(6) for w in words]
    train, test = d / "train.csv", d / "eval.csv"
    train.write_text("text,label\n" + "".join(f"{t},{l}\n" for t, l in rows[:40]), encoding="utf-8")
    test.write_text("text,label\n" + "".join(f"{t},{l}\n" for t, l in rows[40:]), encoding="utf-8")
    return train, test


def cli(capsys, *args) -> tuple[int, str]:
    """``paretune ARGS`` in this process: (exit status, stdout + stderr)."""
    from paretune.cli import main

    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return code, out.out + out.err


def assert_clear(code: int, text: str, *needles: str) -> None:
    assert code == 2, text
    assert "error:" in text and "Traceback" not in text, text
    for n in needles:
        assert n in text, text


def train_cmd(model: Path, data: tuple[Path, Path], out: Path, *extra) -> list:
    return ["train", "--model", model, "--data", data[0], "--eval-data", data[1], "--batch-size", 8, "--steps", 2,
            "--out", out, *extra]


# -- 1-3: adapters on other models ---------------------------------------------------------------

@pytest.mark.parametrize("method", ["lora", "vera"])
def test_01_an_adapter_on_a_same_shape_model_with_other_weights_gives_the_same_delta(tmp_path, method):
    src = trained(method)
    path = tmp_path / "a"
    paretune.save(src, path)
    dst = llama(seed=1)
    paretune.load(dst, path)
    for net in (src, dst):
        paretune.merge(net)
    w = "model.layers.0.self_attn.q_proj.weight"
    delta_src = paretune.unload(src).state_dict()[w] - llama(0).state_dict()[w]
    delta_dst = paretune.unload(dst).state_dict()[w] - llama(1).state_dict()[w]
    assert delta_src.abs().max() > 0 and torch.allclose(delta_src, delta_dst, atol=1e-6)


@pytest.mark.parametrize("method,options", [("pissa", {}), ("lamda", {"init": "svd"})])
def test_02_a_base_dependent_adapter_on_other_weights_is_refused(tmp_path, method, options):
    # LaMDA's default (reference) init draws A from the seed, so its saved tensors determine ΔW on any
    # base; its SVD init takes A from W and is base-dependent
    path = tmp_path / "a"
    paretune.save(trained(method, r=2, **options), path)
    refuses(lambda: paretune.load(llama(seed=1), path), AdapterFileError)


def test_03_an_adapter_on_a_wider_model_or_bert_names_the_modules(tmp_path):
    path = saved(tmp_path)
    refuses(lambda: paretune.load(llama(hidden=64), path), AdapterFileError)
    refuses(lambda: paretune.load(bert_cls(), path), AdapterFileError)


# -- 4-9: damaged folders ------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "header zeroed", "empty"])
def test_04_a_damaged_safetensors_file_is_refused(tmp_path, damage):
    path = saved(tmp_path)
    f = path / "adapter.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) // 2], "header zeroed": b"\0" * 8 + data[8:], "empty": b""}[damage])
    refuses(lambda: paretune.load(llama(), path), AdapterFileError)


def test_05_flipped_tensor_bytes_are_detected(tmp_path):
    path = saved(tmp_path)
    f = path / "adapter.safetensors"
    data = bytearray(f.read_bytes())
    header = 8 + struct.unpack("<Q", bytes(data[:8]))[0]
    for i in range(header + 16, min(len(data), header + 80)):
        data[i] ^= 0x5A
    f.write_bytes(bytes(data))
    refuses(lambda: paretune.load(llama(), path), AdapterFileError)


def test_05_nan_in_a_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    path = saved(tmp_path)
    f = path / "adapter.safetensors"
    tensors = load_file(str(f))
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(f))
    refuses(lambda: paretune.load(llama(), path), AdapterFileError)


def _meta_edits():
    return {
        "unknown method": lambda d: d.update(method="no-such-method"),
        "method changed": lambda d: d.update(method="vera"),
        "config missing": lambda d: d.pop("config"),
        "format missing": lambda d: d.pop("format"),
        "version 99": lambda d: d.update(format_version=99),
        "r as string": lambda d: d["config"].update(r="8"),
        "r not matching tensors": lambda d: d["config"].update(r=7),
        "unknown key": lambda d: d["config"].update(no_such_option=1),
        "targets string": lambda d: d.update(targets="q_proj"),
        "targets subset": lambda d: d.update(targets=d["targets"][:1]),
        "targets empty": lambda d: d.update(targets=[]),
        "name a.b": lambda d: d.update(name="a.b"),
    }


@pytest.mark.parametrize("case", list(_meta_edits()))
def test_06_a_bad_paretune_json_field_names_the_problem(tmp_path, case):
    path = saved(tmp_path)
    meta = meta_of(path)
    _meta_edits()[case](meta)
    write_meta(path, meta)
    refuses(lambda: paretune.load(llama(), path), ParetuneError)


@pytest.mark.parametrize("content", [b"[1, 2]", b"{not json", b"\x00\xff\xfe binary"])
def test_06_a_paretune_json_that_is_no_object_is_refused(tmp_path, content):
    path = saved(tmp_path)
    (path / "paretune.json").write_bytes(content)
    refuses(lambda: paretune.load(llama(), path), AdapterFileError)


@pytest.mark.parametrize("case", ["format_version str", "config list", "fingerprint empty", "modules list",
                                  "module entry null"])
def test_07_wrongly_typed_paretune_json_fields_are_errors_not_tracebacks(tmp_path, case):
    path = saved(tmp_path)
    meta = meta_of(path)
    if case == "format_version str":
        meta["format_version"] = "1"
    elif case == "config list":
        meta["config"] = [1, 2]
    elif case == "fingerprint empty":
        meta["fingerprint"] = {}
    elif case == "modules list":
        meta.setdefault("fingerprint", {})["modules"] = [1, 2]
    else:
        fp = meta.setdefault("fingerprint", {}).setdefault("modules", {})
        if isinstance(fp, dict) and fp:
            fp[next(iter(fp))] = None
        else:
            meta["fingerprint"]["modules"] = {"model.layers.0.self_attn.q_proj": None}
    write_meta(path, meta)
    refuses(lambda: paretune.load(llama(), path), ParetuneError)


def test_08_paretune_info_on_a_bad_folder_exits_2(tmp_path, capsys):
    path = saved(tmp_path)
    meta = meta_of(path)
    meta["format_version"] = "1"
    write_meta(path, meta)
    code, text = cli(capsys, "info", path)
    assert_clear(code, text)


def test_09_an_edited_alpha_is_detected(tmp_path):
    path = saved(tmp_path)
    meta = meta_of(path)
    meta["config"]["alpha"] = 1000
    write_meta(path, meta)
    refuses(lambda: paretune.load(llama(), path), AdapterFileError)


# -- 11: pickles never run -------------------------------------------------------------------------

class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path(_Boom.marker),))


@pytest.mark.parametrize("case", ["pickle as adapter.safetensors", "bin/pt only", "peft adapter_model.bin",
                                  "peft safetensors pickle"])
def test_11_a_pickle_is_refused_and_never_runs(tmp_path, case):
    marker = tmp_path / "PWNED"
    _Boom.marker = str(marker)
    payload = pickle.dumps({"w": _Boom()})
    path = tmp_path / "ad"
    if case == "pickle as adapter.safetensors":
        path = saved(tmp_path)
        (path / "adapter.safetensors").write_bytes(payload)
        fn = lambda: paretune.load(llama(), path)  # noqa: E731
    elif case == "bin/pt only":
        path = saved(tmp_path)
        (path / "adapter.safetensors").unlink()
        (path / "adapter.bin").write_bytes(payload)
        (path / "adapter.pt").write_bytes(payload)
        fn = lambda: paretune.load(llama(), path)  # noqa: E731
    else:
        path.mkdir()
        (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                              "target_modules": ["q_proj"]}))
        name = "adapter_model.bin" if case == "peft adapter_model.bin" else "adapter_model.safetensors"
        (path / name).write_bytes(payload)
        fn = lambda: paretune.import_peft(llama(), path)  # noqa: E731
    refuses(fn, ParetuneError)
    assert not marker.exists(), "the pickle ran"


# -- 14, 16: PEFT imports --------------------------------------------------------------------------

def _peft_folder(tmp_path: Path, **lora) -> Path:
    from peft import LoraConfig, get_peft_model

    net = get_peft_model(llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], **lora))
    path = tmp_path / "peft"
    net.save_pretrained(path)
    return path


@pytest.mark.parametrize("lora", [{"use_dora": True}, {"bias": "all"}, {"bias": "lora_only"}, {"lora_bias": True}])
def test_14_unsupported_peft_variants_say_so(tmp_path, lora):
    path = _peft_folder(tmp_path, **lora)
    refuses(lambda: paretune.import_peft(llama(), path), ParetuneError, "support")


@pytest.mark.parametrize("edit", ["list", "alpha word"])
def test_16_a_bad_peft_config_is_an_error_not_a_traceback(tmp_path, edit):
    path = _peft_folder(tmp_path)
    cfg_file = path / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text("[]" if edit == "list" else json.dumps({**cfg, "lora_alpha": "sixteen"}))
    refuses(lambda: paretune.import_peft(llama(), path), ParetuneError)


# -- 18-21: method options -------------------------------------------------------------------------

@pytest.mark.parametrize("options", [
    {"r": 0}, {"r": -1}, {"r": "abc"}, {"r": 2.0}, {"r": True}, {"no_such_option": 1}, {"dropout": 1},
    {"init": "no-such-init"}, {"alpha": -1}, {"alpha": float("nan")},
])
def test_18_bad_lora_options_are_config_errors(options):
    refuses(lambda: paretune.adapt(llama(), "lora", **options), ConfigError)


def test_18_cli_bad_option_exits_2(tmp_path, capsys, tiny_bert_dir, data_files):
    code, text = cli(capsys, *train_cmd(tiny_bert_dir, data_files, tmp_path / "o", "-o", "r=abc"))
    assert_clear(code, text, "r")


@pytest.mark.parametrize("method", ["lora", "pissa", "hydra", "lamda", "adalora"])
def test_19_a_rank_larger_than_the_layer_is_refused(method):
    refuses(lambda: paretune.adapt(llama(), method, r=1000), ConfigError)


def test_19_vera_rank_may_exceed_the_layer():
    """VeRA's r counts random rank-1 directions b_i·a_iᵀ combined by its trained vector d: more of
    them than the layer's width still adds directions (like NOLA's bases), so r > width is allowed."""
    net = llama()
    paretune.adapt(net, "vera", r=1000)
    assert paretune.count(net)["trainable"] > 0


def test_19_cli_rank_larger_than_the_layer_exits_2(tmp_path, capsys, tiny_bert_dir, data_files):
    code, text = cli(capsys, *train_cmd(tiny_bert_dir, data_files, tmp_path / "o", "-o", "r=999"))
    assert_clear(code, text)


def test_20_alpha_zero_is_flagged():
    with pytest.warns(UserWarning):
        paretune.adapt(llama(), "lora", alpha=0)


def test_20_cli_alpha_zero_is_flagged(tmp_path, capsys, tiny_bert_dir, data_files):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, text = cli(capsys, *train_cmd(tiny_bert_dir, data_files, tmp_path / "o", "-o", "alpha=0"))
    assert code == 2 or "alpha" in text or any("alpha" in str(w.message) for w in caught), text


@pytest.mark.parametrize("method,options", [("lora", {"alpha": float("inf")}), ("hydra", {"scale": float("nan")})])
def test_21_non_finite_scales_are_refused(method, options):
    refuses(lambda: paretune.adapt(llama(), method, **options), ConfigError)


def test_21_cli_alpha_infinity_exits_2(tmp_path, capsys, tiny_bert_dir, data_files):
    code, text = cli(capsys, *train_cmd(tiny_bert_dir, data_files, tmp_path / "o", "-o", "alpha=Infinity"))
    assert_clear(code, text)


# -- 25-29: data files -----------------------------------------------------------------------------

def _data_case(tmp_path: Path, case: str) -> Path:
    f = tmp_path / {"txt": "d.txt", "jsonl broken": "d.jsonl", "folder": "dir.csv"}.get(case, "d.csv")
    text = {
        "missing columns": "sentence,label\na,b\n", "empty": "", "header only": "text,label\n",
        "ragged": "text,label\na,b,c,d\n\"unclosed,x\n", "jsonl broken": '{"text": "a", "label": "b"}\n{oops\n',
        "txt": "text,label\na,b\n", "kind mismatch": "prompt,completion\na,b\n",
    }
    if case == "latin-1":
        f.write_bytes("text,label\ncaf\xe9,b\n".encode("latin-1"))
    elif case == "missing":
        pass
    elif case == "folder":
        f.mkdir()
    else:
        f.write_text(text[case], encoding="utf-8")
    return f


@pytest.mark.parametrize("case", ["missing columns", "empty", "header only", "latin-1", "ragged", "jsonl broken",
                                  "txt", "missing", "folder", "kind mismatch"])
def test_25_bad_data_files_are_clear_errors(tmp_path, case):
    from paretune.data import load_data

    f = _data_case(tmp_path, case)
    kind = "classification" if case == "kind mismatch" else None
    try:
        load_data(f, kind=kind)
    except ParetuneError as e:
        assert str(e).strip()
    else:
        assert case == "ragged"  # extra cells are ignored by csv.DictReader; a real row still reads


def test_25_cli_unseen_eval_label_and_bad_files_exit_2(tmp_path, capsys, tiny_bert_dir, data_files):
    bad_eval = tmp_path / "eval.csv"
    bad_eval.write_text("text,label\nsomething,never-seen\n", encoding="utf-8")
    code, text = cli(capsys, *train_cmd(tiny_bert_dir, (data_files[0], bad_eval), tmp_path / "o"))
    assert_clear(code, text)
    code, text = cli(capsys, *train_cmd(tiny_bert_dir, (tmp_path / "nope.csv", data_files[1]), tmp_path / "o"))
    assert_clear(code, text, "nope.csv")


def test_26_a_csv_with_a_bom_is_read(tmp_path):
    from paretune.data import load_data

    f = tmp_path / "bom.csv"
    f.write_bytes(b"\xef\xbb\xbftext,label\nhello,a\n")
    assert load_data(f).rows == [{"text": "hello", "label": "a"}]


def test_27_a_10_mb_line_is_read_or_a_clear_error(tmp_path):
    from paretune.data import load_data

    f = tmp_path / "big.csv"
    f.write_text("text,label\n\"" + "x" * 10_000_000 + "\",a\nshort,b\n", encoding="utf-8")
    try:
        d = load_data(f)
    except ParetuneError as e:
        assert "big.csv" in str(e)
    else:
        assert len(d.rows[0]["text"]) == 10_000_000


@pytest.mark.parametrize("labels", [[1, "1", 1.0, True], [float("nan"), "a"], [[1], "a"], [{"x": 1}, "a"]])
def test_29_jsonl_labels_of_mixed_or_bad_types_are_refused(tmp_path, labels):
    from paretune.data import load_data

    f = tmp_path / "l.jsonl"
    f.write_text("".join(json.dumps({"text": f"t{i}", "label": v}) + "\n" for i, v in enumerate(labels)))
    e = refuses(lambda: load_data(f), ParetuneError)
    assert "row" in str(e)


# -- 30-31: interrupted saves ----------------------------------------------------------------------

def test_30_leftovers_of_a_killed_save_are_removed_by_the_next_save(tmp_path):
    path = saved(tmp_path)
    dead = 2 ** 22 + 7  # no such process
    (tmp_path / f".{path.name}.tmp-{dead}-abcd").mkdir()
    (tmp_path / f".{path.name}.tmp-{dead}-abcd" / "adapter.safetensors").write_bytes(b"partial")
    paretune.save(trained(), path)
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    paretune.load(llama(), path)


def test_31_a_save_killed_between_the_renames_is_recovered(tmp_path):
    path = saved(tmp_path)
    before = logits(paretune.load(llama(), path))
    dead = 2 ** 22 + 7
    path.rename(tmp_path / f".{path.name}.old-{dead}-abcd")  # the state a kill between the renames leaves
    after = logits(paretune.load(llama(), path))
    assert torch.equal(before, after) and path.is_dir()


# -- 33-35, 40, 44: training runs ------------------------------------------------------------------

@pytest.fixture
def checkpointed(tmp_path, capsys, tiny_bert_dir, data_files) -> Path:
    out = tmp_path / "run"
    code, text = cli(capsys, *train_cmd(tiny_bert_dir, data_files, out, "-o", "r=2", "--checkpoint-every", 1))
    assert code == 0, text
    return out


@pytest.mark.parametrize("change", [("-o", "r=4"), ("--method", "vera")])
def test_33_resume_with_other_options_exits_2(checkpointed, capsys, tiny_bert_dir, data_files, change):
    code, text = cli(capsys, *train_cmd(tiny_bert_dir, data_files, checkpointed, "--resume", "--checkpoint-every", 1,
                                        *change))
    assert_clear(code, text)


def test_33_resume_from_a_truncated_state_exits_2(checkpointed, capsys, tiny_bert_dir, data_files):
    for f in (checkpointed / "checkpoint").rglob("*"):
        if f.is_file() and f.suffix in (".pt", ".safetensors"):
            f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 3)])
    code, text = cli(capsys, *train_cmd(tiny_bert_dir, data_files, checkpointed, "--resume", "-o", "r=2"))
    assert_clear(code, text)


def test_34_resume_with_fewer_steps_than_done_says_so(checkpointed, capsys, tiny_bert_dir, data_files):
    args = train_cmd(tiny_bert_dir, data_files, checkpointed, "--resume", "-o", "r=2")
    args[args.index("--steps") + 1] = 1
    code, text = cli(capsys, *args)
    assert code == 2 or "step" in text.lower(), text
    assert "Traceback" not in text


def test_35_the_same_seed_twice_gives_the_same_adapter(tmp_path, capsys, tiny_bert_dir, data_files):
    from safetensors.torch import load_file

    outs = []
    for i in range(2):
        out = tmp_path / f"r{i}"
        code, text = cli(capsys, *train_cmd(tiny_bert_dir, data_files, out, "-o", "r=2", "--seed", 0))
        assert code == 0, text
        outs.append(load_file(str(out / "adapter" / "adapter.safetensors")))
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


@pytest.mark.parametrize("extra", [("--lr", "1e9"), ("--lr", "inf"), ("--method", "full", "--lr", "1e9")])
def test_40_a_diverging_training_exits_2_and_saves_nothing(tmp_path, capsys, tiny_bert_dir, data_files, extra):
    out = tmp_path / "o"
    args = train_cmd(tiny_bert_dir, data_files, out, *extra)
    args[args.index("--steps") + 1] = 10
    code, text = cli(capsys, *args)
    assert_clear(code, text)
    assert not (out / "adapter").exists() and not (out / "model").exists()
    if (out / "metrics.json").exists():
        json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))


def test_41_a_diverged_bench_run_is_failed_and_off_the_front():
    from paretune.bench.sweep import check_finite

    refuses(lambda: check_finite({"metric": "accuracy", "accuracy": 0.1275, "train_loss": math.nan}), ParetuneError,
            "diverged")


def test_44_a_pickled_checkpoint_never_runs(checkpointed, capsys, tiny_bert_dir, data_files):
    marker = checkpointed / "PWNED"
    _Boom.marker = str(marker)
    ck = checkpointed / "checkpoint"
    targets = [f for f in ck.rglob("*") if f.is_file() and f.suffix in (".pt", ".safetensors")] or [ck / "state.pt"]
    for f in targets:
        torch.save({"x": _Boom()}, f)
    code, text = cli(capsys, *train_cmd(tiny_bert_dir, data_files, checkpointed, "--resume", "-o", "r=2"))
    assert not marker.exists(), "the pickle ran"
    assert_clear(code, text)


# -- 37, 38: the bench (see tests/bench/test_bench_reliability.py for the full cases) -------------

def test_38_two_benches_on_one_folder(tmp_path):
    from paretune.bench.store import BenchLocked, bench_lock

    with bench_lock(tmp_path):
        refuses(lambda: bench_lock(tmp_path).__enter__(), BenchLocked, "another bench is running")
