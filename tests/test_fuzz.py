"""A seeded fuzz of what users hand paretune: damaged adapter folders, broken data files and bad
method options. Every case must end in a ParetuneError subclass with a message (on the command
line: exit status 2, ``error: ...``, no traceback), and leave the model's weights and the files
it read unchanged (sha256 before and after).

The seed is fixed (SEED) so a failure reproduces; each case's id names what was done."""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch

import paretune
from paretune.errors import ParetuneError
from tiny_models import llama, save_tiny_bert_classifier

SEED = 20261128


def state_hash(net) -> str:
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        h.update(str(f.relative_to(folder)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    net = llama()
    paretune.adapt(net, "lora", r=2, targets=["q_proj", "v_proj"])
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.05)
    path = tmp_path_factory.mktemp("fuzz") / "adapter"
    paretune.save(net, path)
    return path


@pytest.fixture(scope="module")
def base_hash() -> str:
    return state_hash(llama())


@pytest.fixture
def victim(base_hash):
    """A fresh model (the same seeded weights each time) for the case to load into: a failed load
    must leave it as it was."""
    return llama(), base_hash


def _check_refused(net, before: str, folder: Path, fn) -> None:
    files = tree_hash(folder)
    with pytest.raises(ParetuneError) as e:
        fn()
    assert str(e.value).strip()
    assert not paretune.adapters(net), "a failed load left an adapter on the model"
    assert state_hash(net) == before, "a failed load changed the model's weights"
    assert tree_hash(folder) == files, "a failed load changed the files"


# -- adapter folders -------------------------------------------------------------------------------

def _header_len(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def _st_cases(n: int):
    rng = random.Random(SEED)
    cases = []
    for i in range(n):
        kind = rng.choice(["truncate", "corrupt-header", "pickle", "garbage", "zero-length-header"])
        cases.append((f"{kind}-{i}", kind, rng.random(), rng.randrange(256)))
    return cases


@pytest.mark.parametrize("case,kind,where,byte", _st_cases(120), ids=[c[0] for c in _st_cases(120)])
def test_damaged_safetensors(adapter, victim, tmp_path, case, kind, where, byte):
    net, before = victim
    folder = tmp_path / "a"
    shutil.copytree(adapter, folder)
    f = folder / "adapter.safetensors"
    data = f.read_bytes()
    hl = _header_len(data)
    if kind == "truncate":
        data = data[: int(where * (len(data) - 1))]
    elif kind == "corrupt-header":  # a byte of the JSON header (or its length) replaced by a non-JSON one
        pos = int(where * (hl - 1))
        bad = byte if byte not in data[pos:pos + 1] else (byte + 1) % 256
        data = data[:pos] + bytes([bad if pos < 8 else (bad | 0x80)]) + data[pos + 1:]
    elif kind == "pickle":
        data = pickle.dumps({"weight": torch.zeros(2)})
    elif kind == "garbage":
        data = random.Random(byte).randbytes(1 + int(where * 200))
    else:
        data = b"\0" * 8 + data[8:]
    f.write_bytes(data)
    _check_refused(net, before, folder, lambda: paretune.load(net, folder))


def _meta_cases(n: int):
    rng = random.Random(SEED + 1)
    values = [None, "", "x", -1, 0, 2 ** 70, 1.5, float("nan"), [], {}, [1, "a"], {"a": None}, True]
    fields = ["format", "format_version", "name", "method", "config", "targets", "fingerprint", "base_model",
              "config.r", "config.alpha", "config.dropout", "fingerprint.modules", "drop:method", "drop:config",
              "drop:targets", "drop:format", "method=vera", "method=no-such", "wrong-base"]
    cases = []
    for i in range(n):
        field = rng.choice(fields)
        cases.append((f"{field}-{i}", field, rng.randrange(len(values))))
    return cases, values


_META, _VALUES = _meta_cases(120)


def _edit(meta: dict, field: str, value) -> bool:
    """Apply one edit; False when it would leave a valid file (the case is then skipped)."""
    if field.startswith("drop:"):
        meta.pop(field[5:], None)
        return True
    if field == "method=vera":
        meta["method"] = "vera"
        return True
    if field == "method=no-such":
        meta["method"] = "no-such-method"
        return True
    if field == "wrong-base":
        return False  # handled by test_wrong_base
    if "." in field:
        top, sub = field.split(".")
        if not isinstance(meta.get(top), dict):
            return False
        if sub == "alpha" and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and \
                value == value and value < 2 ** 60:
            return False  # another positive alpha is a valid (if edited) file: see the probes
        if sub == "dropout" and isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1:
            return False
        meta[top][sub] = value
        return True
    if meta.get(field) == value or (field == "base_model" and isinstance(value, str)):
        return False  # base_model is a note for people: any string is valid
    meta[field] = value
    return True


@pytest.mark.parametrize("case,field,vi", _META, ids=[c[0] for c in _META])
def test_bad_paretune_json(adapter, victim, tmp_path, case, field, vi):
    net, before = victim
    folder = tmp_path / "a"
    shutil.copytree(adapter, folder)
    meta = json.loads((folder / "paretune.json").read_text())
    if not _edit(meta, field, _VALUES[vi]):
        pytest.skip("the edit leaves a valid file")
    (folder / "paretune.json").write_text(json.dumps(meta))
    _check_refused(net, before, folder, lambda: paretune.load(net, folder))


def test_wrong_base_and_wrong_width(adapter, tmp_path):
    wide = llama(hidden=64)
    _check_refused(wide, state_hash(wide), adapter, lambda: paretune.load(wide, adapter))


# -- data files ------------------------------------------------------------------------------------

def _data_cases(n: int):
    rng = random.Random(SEED + 2)
    kinds = ["missing-column", "empty", "header-only", "non-utf8", "broken-jsonl", "mixed-labels", "nan-label",
             "list-label", "unsupported-suffix", "huge-field", "blank-label", "not-object-jsonl"]
    return [(f"{k}-{i}", k, rng.randrange(1, 50)) for i, k in enumerate(rng.choice(kinds) for _ in range(n))]


_DATA = _data_cases(80)


@pytest.mark.parametrize("case,kind,n", _DATA, ids=[c[0] for c in _DATA])
def test_bad_data_files(tmp_path, monkeypatch, case, kind, n):
    from paretune.data import examples, load_data

    rng = random.Random(n)
    rows = [{"text": f"t{i} " + "w" * rng.randrange(1, 9), "label": rng.choice("ab")} for i in range(n)]
    k = rng.randrange(n)
    suffix = ".jsonl" if kind in ("broken-jsonl", "mixed-labels", "nan-label", "list-label", "not-object-jsonl") \
        else ".csv"
    f = tmp_path / f"d{suffix}"
    if kind == "unsupported-suffix":
        f = tmp_path / "d.parquet"
        f.write_text("text,label\na,b\n")
    elif suffix == ".jsonl":
        lines = [json.dumps(r) for r in rows]
        if kind == "broken-jsonl":
            lines[k] = lines[k][: rng.randrange(1, len(lines[k]))]
        elif kind == "mixed-labels":
            lines.append(json.dumps({"text": "z", "label": rng.choice([1, 1.0, True])}))
        elif kind == "nan-label":
            lines[k] = '{"text": "x", "label": NaN}'
        elif kind == "list-label":
            lines[k] = json.dumps({"text": "x", "label": [1, 2]})
        else:
            lines[k] = json.dumps([1, 2])
        f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        body = "".join(f"{r['text']},{r['label']}\n" for r in rows)
        if kind == "missing-column":
            f.write_text("text,category\n" + body)
        elif kind == "empty":
            f.write_text("")
        elif kind == "header-only":
            f.write_text("text,label\n")
        elif kind == "non-utf8":
            f.write_bytes(("text,label\n" + body).encode() + "caf\xe9,a\n".encode("latin-1"))
        elif kind == "blank-label":
            lines = body.splitlines(True)
            lines[k] = "something,\n"
            f.write_text("text,label\n" + "".join(lines))
        else:  # huge-field over a lowered cap
            monkeypatch.setattr(examples, "CSV_FIELD_LIMIT", 200_000)
            f.write_text("text,label\n\"" + "x" * 300_000 + "\",a\n" + body)
    before = f.read_bytes()
    with pytest.raises(ParetuneError) as e:
        load_data(f)
    assert str(e.value).strip()
    assert f.read_bytes() == before


# -- method options (API and `-o key=value`) ------------------------------------------------------

_OPTS = [["r=abc"], ["r=0"], ["r=-3"], ["r=1000"], ["r=2.5"], ["alpha=nan"], ["alpha=-1"], ["dropout=1"],
         ["dropout=-0.1"], ["no_such=1"], ["r"], ["=3"], ["r=1e309"], ["alpha=Infinity"]]


@pytest.mark.parametrize("pairs", _OPTS, ids=[p[0] for p in _OPTS])
def test_bad_options(victim, pairs):
    from paretune.training.cli import parse_options

    net, before = victim
    with pytest.raises(ParetuneError) as e:
        paretune.adapt(net, "lora", **parse_options(pairs))
    assert str(e.value).strip()
    assert not paretune.adapters(net) and state_hash(net) == before


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    save_tiny_bert_classifier(d / "model")
    (d / "train.csv").write_text("text,label\n" + "".join(f"w{i},{'ab'[i % 2]}\n" for i in range(16)))
    return d


@pytest.mark.parametrize("pair", ["r=abc", "r=0", "r=-1", "r=999", "alpha=Infinity"])
def test_bad_options_on_the_command_line(cli_setup, tmp_path, capsys, pair):
    from paretune.cli import main

    model = cli_setup / "model"
    files = tree_hash(model)
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", str(model), "--data", str(cli_setup / "train.csv"), "--steps", "1",
              "--batch-size", "4", "-o", pair, "--out", str(tmp_path / "o")])
    text = "".join(capsys.readouterr())
    assert e.value.code == 2 and "error:" in text and "Traceback" not in text, text
    assert tree_hash(model) == files
    assert not (tmp_path / "o" / "adapter").exists()
