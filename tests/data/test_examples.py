import json

import pytest

from paretune.data import load_data
from paretune.errors import ParetuneError


def test_csv_and_jsonl(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\nhello world,a\n\"x, y\",b\n", encoding="utf-8")
    d = load_data(csv)
    assert d.kind == "classification" and d.rows[1] == {"text": "x, y", "label": "b"} and d.labels() == ["a", "b"]
    jl = tmp_path / "g.jsonl"
    jl.write_text("\n".join(json.dumps({"prompt": p, "completion": c, "extra": 1}) for p, c in [("a", "b"), ("c", "d")]))
    g = load_data(jl)
    assert g.kind == "generation" and g.rows == [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]


def test_datasets_like_object():
    class FakeDataset:
        column_names = ["text", "label"]

        def __iter__(self):
            return iter([{"text": "t", "label": 1}])

    assert load_data(FakeDataset()).rows == [{"text": "t", "label": "1"}]


def test_missing_column_names_row_and_column(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("text,label\nok,a\nbad,\n", encoding="utf-8")
    with pytest.raises(ParetuneError, match=r"row 2 lacks 'label'"):
        load_data(f)
    f.write_text("sentence,label\nok,a\n", encoding="utf-8")
    with pytest.raises(ParetuneError, match="fit no task kind"):
        load_data(f)


def test_empty_missing_and_bad_files(tmp_path):
    f = tmp_path / "e.csv"
    f.write_text("text,label\n", encoding="utf-8")
    with pytest.raises(ParetuneError, match="no examples"):
        load_data(f)
    with pytest.raises(ParetuneError, match="does not exist"):
        load_data(tmp_path / "nope.csv")
    (tmp_path / "x.parquet").write_text("?")
    with pytest.raises(ParetuneError, match="unsupported"):
        load_data(tmp_path / "x.parquet")
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "a", "label": "b"}\n{oops\n')
    with pytest.raises(ParetuneError, match=r"b.jsonl:2"):
        load_data(bad)


def test_an_empty_prompt_trains_the_whole_text_and_an_empty_completion_is_refused():
    from paretune.training.batching import collate, encode

    g = load_data([{"prompt": "", "completion": "plain text to model"}])
    assert g.kind == "generation" and g.rows == [{"prompt": "", "completion": "plain text to model"}]

    class Tok:  # one id per word; eos 1
        eos_token_id, bos_token_id = 1, None

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[10 + len(w) for w in t.split()] for t in texts]}

    enc = encode(g, Tok())
    batch = collate(enc, [0], pad_id=0, device=__import__("torch").device("cpu"))
    assert batch["labels"].tolist() == [[15, 14, 12, 15, 1]]  # every token of the text is a target
    with pytest.raises(ParetuneError, match="lacks 'completion'"):
        load_data([{"prompt": "q", "completion": ""}])
