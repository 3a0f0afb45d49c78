"""Examples for training: classification (``text``, ``label``) or generation (``prompt``,
``completion``), read from CSV / JSONL files, lists of dicts, or a ``datasets.Dataset``."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable

from ..errors import ParetuneError

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
            with path.open(encoding="utf-8") as f:
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
            with path.open(encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    except UnicodeDecodeError:
        raise ParetuneError(f"{path} is not UTF-8 text.") from None
    raise ParetuneError(f"{path}: unsupported data file type {suffix!r}; use .csv, .tsv or .jsonl.")


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
    and non-empty in every row. Errors name the file, the row and the missing column."""
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
