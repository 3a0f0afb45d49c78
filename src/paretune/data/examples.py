"""Examples for training: classification (``text``, ``label``) or generation (``prompt``,
``completion``), read from CSV / JSONL files, lists of dicts, or a ``datasets.Dataset``.

Reading choices:

* Files are read as UTF-8; a leading byte-order mark (as spreadsheet programs write) is dropped
  (``utf-8-sig``), so the first column is still ``text``, not ``\ufefftext``.
* One CSV field may hold up to :data:`CSV_FIELD_LIMIT` characters (64 Mi; the ``csv`` module's
  own default is 128 Ki). A longer field, or a malformed CSV, is a ParetuneError naming the file
  and line, never a traceback.
* Values of the needed columns must be text or numbers: a list, an object, or a NaN / infinite
  number is refused, naming the row (its text form would silently become a class of its own).
* Classification labels in one source must all be of one JSON type. ``1``, ``"1"``, ``1.0`` and
  ``true`` would otherwise become four classes ``'1'``, ``'1'``, ``'1.0'``, ``'True'``; a mix of
  types is refused, naming the types and an example row of each.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from ..errors import ParetuneError

CSV_FIELD_LIMIT = 64 * 1024 * 1024  # characters in one CSV field (the csv module's default is 131,072)

COLUMNS = {"classification": ("text", "label"), "generation": ("prompt", "completion")}


@dataclasses.dataclass
class Dataset:
    """A list of examples of one kind (``classification`` or ``generation``)."""

    kind: str
    rows: list[dict[str, str]]
    source: str = "<memory>"

    def __len__(self) -> int:
        return len(self.rows)

    def labels(self) -> list[str]:
        """Sorted distinct labels (classification)."""
        return sorted({r["label"] for r in self.rows})

    def head(self, n: int | None) -> "Dataset":
        """The first ``n`` examples (all with None)."""
        return self if n is None else Dataset(self.kind, self.rows[:n], self.source)


def _read_file(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            rows = []
            with path.open(encoding="utf-8-sig") as f:
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise ParetuneError(f"{path}:{i} is not valid JSON ({e.msg}).") from None
                        if not isinstance(row, dict):
                            raise ParetuneError(f"{path}:{i} is not a JSON object with named fields.")
                        rows.append(row)
            return rows
        if suffix in (".csv", ".tsv"):
            return _read_csv(path, "\t" if suffix == ".tsv" else ",")
    except UnicodeDecodeError:
        raise ParetuneError(f"{path} is not UTF-8 text.") from None
    raise ParetuneError(f"{path}: unsupported data file type {suffix!r}; use .csv, .tsv or .jsonl.")


def _read_csv(path: Path, delimiter: str) -> list[dict[str, Any]]:
    """Rows of a CSV/TSV file (a BOM dropped; fields up to CSV_FIELD_LIMIT characters)."""
    old = csv.field_size_limit()
    csv.field_size_limit(max(old, CSV_FIELD_LIMIT))
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            try:
                return list(reader)
            except csv.Error as e:
                if "field larger than field limit" in str(e):
                    raise ParetuneError(
                        f"{path}:{reader.line_num}: a field is longer than {CSV_FIELD_LIMIT:,} characters; "
                        "split that example or shorten it (examples are truncated to the model's length anyway)."
                    ) from None
                raise ParetuneError(f"{path}:{reader.line_num} is not valid CSV ({e}); check the quoting "
                                    "of that line.") from None
    finally:
        csv.field_size_limit(old)


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(type(value), type(value).__name__)


def _check_values(rows: list[dict[str, Any]], need: tuple[str, ...], kind: str, where: str) -> None:
    """Refuse values whose text form would be wrong (lists, objects, NaN) and, for classification,
    labels of mixed types."""
    for i, row in enumerate(rows, 1):
        for c in need:
            v = row.get(c)
            if isinstance(v, (list, tuple, dict, set)):
                raise ParetuneError(f"{where}: row {i} has a {type(v).__name__} as {c!r} ({str(v)[:60]}); "
                                    f"{c!r} must be text{' or a number' if c == 'label' else ''}.")
            if isinstance(v, float) and not math.isfinite(v):
                raise ParetuneError(f"{where}: row {i} has {v} as {c!r}; give a real value or drop the row.")
    if kind != "classification":
        return
    first: dict[str, int] = {}
    for i, row in enumerate(rows, 1):
        v = row.get("label")
        if v is not None:
            first.setdefault(_type_name(v), i)
    if len(first) > 1:
        examples = ", ".join(f"{t} (row {i}: {rows[i - 1]['label']!r})" for t, i in first.items())
        raise ParetuneError(
            f"{where}: labels of mixed types: {examples}. Values such as 1, \"1\", 1.0 and true would become "
            "different classes; write every label the same way (e.g. all as strings)."
        )


def _rows_of(source: Any) -> tuple[list[dict[str, Any]], str]:
    if isinstance(source, Dataset):
        return source.rows, source.source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ParetuneError(f"data file {path} does not exist.")
        return _read_file(path), str(path)
    if hasattr(source, "column_names") and hasattr(source, "__iter__"):  # a datasets.Dataset
        return [dict(r) for r in source], type(source).__name__
    if isinstance(source, Iterable):
        rows = list(source)
        if not all(isinstance(r, dict) for r in rows):
            raise ParetuneError("in-memory data must be a list of dicts such as {'text': ..., 'label': ...}.")
        return rows, "<memory>"
    raise ParetuneError(f"cannot read data from a {type(source).__name__}; give a CSV/JSONL path, a list of dicts "
                        "or a datasets.Dataset.")


def load_data(source: Any, kind: str | None = None) -> Dataset:
    """Read examples and check them: the columns of ``kind`` (inferred when None) must be present
    and non-empty in every row; values must be text or finite numbers, and classification labels of
    one type (see the module's docstring). Errors name the file, the row and the column."""
    rows, where = _rows_of(source)
    if not rows:
        raise ParetuneError(f"{where} holds no examples; give at least one row.")
    if kind is None:
        cols = set(rows[0])
        kind = next((k for k, need in COLUMNS.items() if set(need) <= cols), None)
        if kind is None:
            raise ParetuneError(
                f"{where}: columns {sorted(cols)} fit no task kind; classification needs 'text' and 'label', "
                "generation needs 'prompt' and 'completion'."
            )
    if kind not in COLUMNS:
        raise ParetuneError(f"unknown data kind {kind!r}; use 'classification' or 'generation'.")
    need = COLUMNS[kind]
    _check_values(rows, need, kind, where)
    clean = []
    for i, row in enumerate(rows, 1):
        # an empty prompt is allowed: the whole completion is then trained (plain language modelling)
        missing = [c for c in need if c not in row or row[c] is None
                   or (str(row[c]) == "" and (kind, c) != ("generation", "prompt"))]
        if missing:
            raise ParetuneError(f"{where}: row {i} lacks {', '.join(map(repr, missing))} (a {kind} row needs "
                                f"{' and '.join(map(repr, need))}).")
        clean.append({c: str(row[c]) for c in need})
    return Dataset(kind, clean, where)
