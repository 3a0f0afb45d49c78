"""Reading a JSON file with one clear error when it is missing or corrupt."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import ParetuneError


def read_json(path: str | os.PathLike, *, what: str, error: type[Exception] = ParetuneError, hint: str = "") -> Any:
    """The parsed content of the UTF-8 JSON file ``path``.

    ``what`` names the file for the reader (e.g. ``"PEFT adapter config"``); a missing file, or a
    file that is not valid UTF-8 JSON, raises ``error`` with a message naming ``what`` and the
    path, followed by ``hint`` (a sentence saying what to do) when given."""
    path = Path(path)
    tail = f" {hint}" if hint else ""
    if not path.is_file():
        state = "is not a file" if path.exists() else "is missing"
        raise error(f"{what} {path} {state}.{tail}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{what} {path} is corrupt (not valid JSON: {e}).{tail}") from None
