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


# -- file encodings, long fields, label types ---------------------------------------------------

def test_a_utf8_csv_with_a_bom_is_read(tmp_path):
    f = tmp_path / "bom.csv"
    f.write_bytes("\ufefftext,label\nhello,a\nworld,b\n".encode("utf-8"))
    d = load_data(f)
    assert d.kind == "classification" and d.rows == [{"text": "hello", "label": "a"}, {"text": "world", "label": "b"}]
    j = tmp_path / "bom.jsonl"
    j.write_bytes(("\ufeff" + json.dumps({"text": "x", "label": "a"}) + "\n").encode("utf-8"))
    assert load_data(j).rows == [{"text": "x", "label": "a"}]


def test_a_field_over_the_csv_default_limit_is_read_and_one_over_our_cap_is_a_clear_error(tmp_path, monkeypatch):
    import csv

    from paretune.data import examples

    f = tmp_path / "long.csv"
    long_text = "word " * 60_000  # 300,000 characters: over csv's default 131,072
    f.write_text(f'text,label\n"{long_text}",a\nshort,b\n', encoding="utf-8")
    before = csv.field_size_limit()
    d = load_data(f)
    assert d.rows[0]["text"] == long_text and d.rows[1] == {"text": "short", "label": "b"}
    assert csv.field_size_limit() == before  # the process-wide limit is restored
    monkeypatch.setattr(examples, "CSV_FIELD_LIMIT", 200_000)
    with pytest.raises(ParetuneError, match=r"long.csv:\d+: a field is longer than 200,000 characters"):
        load_data(f)


def test_a_malformed_csv_is_a_clear_error(tmp_path):
    f = tmp_path / "nul.csv"
    f.write_bytes(b"text,label\n\"a\x00b\",x\n")
    try:
        d = load_data(f)  # newer Python reads NUL bytes; older ones raise csv.Error
        assert d.rows[0]["label"] == "x"
    except ParetuneError as e:
        assert "nul.csv" in str(e)


@pytest.mark.parametrize("labels,types", [
    ([1, "1", 1.0, True], ["integer", "string", "number", "boolean"]),
    (["a", 2], ["string", "integer"]),
    ([1, 1.0], ["integer", "number"]),
])
def test_mixed_label_types_are_refused_naming_the_types_and_rows(tmp_path, labels, types):
    f = tmp_path / "mixed.jsonl"
    f.write_text("".join(json.dumps({"text": f"t{i}", "label": v}) + "\n" for i, v in enumerate(labels)))
    with pytest.raises(ParetuneError, match="labels of mixed types") as e:
        load_data(f)
    for i, t in enumerate(types, 1):
        assert f"{t} (row {i}" in str(e.value)


def test_labels_of_one_type_are_kept():
    assert load_data([{"text": "a", "label": 1}, {"text": "b", "label": 0}]).labels() == ["0", "1"]
    assert load_data([{"text": "a", "label": True}, {"text": "b", "label": False}]).labels() == ["False", "True"]
    assert load_data([{"text": "a", "label": "x"}, {"text": "b", "label": "1"}]).labels() == ["1", "x"]


@pytest.mark.parametrize("line,what", [
    ('{"text": "b", "label": NaN}', "nan as 'label'"),
    ('{"text": "b", "label": Infinity}', "inf as 'label'"),
    ('{"text": "b", "label": null}', "lacks 'label'"),
    ('{"text": "b", "label": [1, 2]}', "list as 'label'"),
    ('{"text": "b", "label": {"x": 1}}', "dict as 'label'"),
    ('{"text": {"x": 1}, "label": "a"}', "dict as 'text'"),
])
def test_nan_null_list_and_dict_values_are_refused_naming_the_row(tmp_path, line, what):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "a", "label": "a"}\n' + line + "\n")
    with pytest.raises(ParetuneError, match=f"row 2 (has a |has |){what}"):
        load_data(f)
