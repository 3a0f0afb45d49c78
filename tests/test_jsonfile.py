"""read_json: the parsed file, or one clear error naming the file when it is missing or corrupt."""

import pytest

from paretune.core.jsonfile import read_json
from paretune.errors import AdapterFileError, ParetuneError


def test_reads_utf8_json(tmp_path):
    f = tmp_path / "a.json"
    f.write_text('{"name": "é", "n": [1, 2]}', encoding="utf-8")
    assert read_json(f, what="test file") == {"name": "é", "n": [1, 2]}


@pytest.mark.parametrize("content", [None, "{not json", b"\xff\xfe{}"])
def test_missing_or_corrupt_is_one_clear_error(tmp_path, content):
    f = tmp_path / "a.json"
    if isinstance(content, str):
        f.write_text(content)
    elif content is not None:
        f.write_bytes(content)
    with pytest.raises(AdapterFileError) as e:
        read_json(f, what="adapter description", error=AdapterFileError, hint="Save the adapter again.")
    message = str(e.value)
    assert message.startswith(f"adapter description {f} ")
    assert ("is missing" if content is None else "is corrupt (not valid JSON: ") in message
    assert message.endswith(". Save the adapter again.")


def test_default_error_and_no_hint(tmp_path):
    with pytest.raises(ParetuneError, match=r"is missing\.$"):
        read_json(tmp_path / "nope.json", what="config")
    with pytest.raises(ParetuneError, match="is not a file"):
        read_json(tmp_path, what="config")
