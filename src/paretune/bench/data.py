"""The bench's data splits: the user's own files (``--data`` / ``--eval-data``) and the validation
split that ``--tune`` chooses on.

Rules (stated in docs/bench.md):

* **Kind**: as ``paretune train``: columns ``text,label`` are classification, ``prompt,completion``
  generation (CSV, TSV or JSONL; :func:`paretune.data.load_data`). ``--eval-data`` must have the
  same kind.
* **Test split**: ``--eval-data`` when given; else the rows of ``--data`` whose input (``text`` /
  ``prompt``) hashes below ``TEST_FRACTION`` (about 20%): ``u(x) = int(sha1("paretune-test|" + x)[:8], 16) / 0xFFFFFFFF``.
  A row's place depends on its input alone, so the split is stable across runs, reorderings and
  added rows, and two rows with one input are always on the same side.
* **Validation split**: always carved from the training part (never from the test split): the rows
  whose input hashes (salt ``paretune-val``) below ``VAL_FRACTION`` (about 10%). Used only for
  choices (``--tune``): search runs train on the training part minus validation and are scored on
  validation. Final runs train on the whole training part (validation included), as runs without
  ``--tune`` do, and are scored on the test split.
* **Identity**: ``data_id`` is the sha256 of the data files' bytes and of the split rule; it is part
  of every run key, so editing a data file makes new runs (old ones stay in the store under the
  old id). The split files are written once to ``OUT/data/<data_id[:12]>/`` (JSONL).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..core.atomic import atomic_write_text
from ..core.digest import file_sha256
from ..data.examples import COLUMNS, Dataset, load_data
from ..errors import ParetuneError

TEST_FRACTION = 0.2
VAL_FRACTION = 0.1
SPLIT_RULE = f"sha1-input test<{TEST_FRACTION} (salt paretune-test), val<{VAL_FRACTION} (salt paretune-val) v1"
METRIC = {"classification": "accuracy", "generation": "exact_match"}


def unit_hash(salt: str, text: str) -> float:
    """A stable number in [0, 1] from ``text`` (the split's coin)."""
    return int(hashlib.sha1(f"{salt}|{text}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def _input(kind: str, row: dict[str, str]) -> str:
    return row[COLUMNS[kind][0]]


def carve(ds: Dataset, salt: str, fraction: float) -> tuple[Dataset, Dataset]:
    """(rows hashing at or above ``fraction``, rows below it), each in file order."""
    keep, out = [], []
    for row in ds.rows:
        (out if unit_hash(salt, _input(ds.kind, row)) < fraction else keep).append(row)
    return Dataset(ds.kind, keep, ds.source), Dataset(ds.kind, out, ds.source)


@dataclasses.dataclass(frozen=True)
class Splits:
    """Where a bench's runs read their data. ``train``/``test``: the final runs' files (None for a
    built-in task, whose runs use ``--task``); ``search_train``/``val``: the ``--tune`` runs' files."""

    kind: str
    metric: str
    name: str  # the task label in the store: a built-in task's name, or "<file name>#<data_id[:8]>"
    data_id: str | None  # None: a built-in task's own split
    train: Path | None
    test: Path | None
    search_train: Path
    val: Path
    counts: dict[str, int]

    def describe(self) -> str:
        c = self.counts
        return (f"{self.name}: {self.kind}, {c['train']:,} training rows ({c['val']:,} of them held out for "
                f"choices), {c['test']:,} test rows")


def _write_jsonl(path: Path, ds: Dataset) -> None:
    if not path.is_file():  # content-addressed folder: an existing file is the same
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ds.rows))


def _check_split(name: str, ds: Dataset, what: str, hint: str) -> None:
    if len(ds) == 0:
        raise ParetuneError(f"{name}: the {what} split is empty; {hint}")


def _read(path: str | os.PathLike, kind: str | None = None, flag: str = "--data") -> Dataset:
    p = Path(path)
    if not p.is_file():
        raise ParetuneError(f"{flag} {p} does not exist.")
    if p.stat().st_size == 0:
        raise ParetuneError(f"{flag} {p} is empty; give a CSV/TSV with a header row text,label (classification) or "
                            "prompt,completion (generation), or a JSONL file of such objects.")
    try:
        return load_data(p, kind=kind)
    except ParetuneError as e:
        raise ParetuneError(f"{flag}: {e}") from None


def prepare_user_data(data: str | os.PathLike, eval_data: str | os.PathLike | None, out: str | os.PathLike) -> Splits:
    """Read, check and split the user's files; write the split files under ``OUT/data/``."""
    train_all = _read(data)
    kind = train_all.kind
    test = None
    if eval_data is not None:
        try:
            test = _read(eval_data, kind=kind, flag="--eval-data")
        except ParetuneError as e:
            raise ParetuneError(f"{e} (--data {data} is {kind} data, so --eval-data needs the same columns: "
                                f"{', '.join(COLUMNS[kind])}).") from None
    h = hashlib.sha256()
    h.update(SPLIT_RULE.encode())
    h.update(kind.encode())
    h.update(file_sha256(data).encode())
    h.update(file_sha256(eval_data).encode() if eval_data is not None else b"carved")
    data_id = h.hexdigest()
    if test is None:
        train_all, test = carve(train_all, "paretune-test", TEST_FRACTION)
        _check_split(str(data), test, "test", f"with {len(train_all)} row(s) no row fell in the ~20% test share; "
                     "give more rows or a separate --eval-data file.")
    _check_split(str(data), train_all, "training", "give more rows.")
    search_train, val = carve(train_all, "paretune-val", VAL_FRACTION)
    if kind == "classification" and len(train_all.labels()) < 2:
        raise ParetuneError(f"--data {data}: every training row has the label {train_all.labels()[0]!r}; a "
                            "classifier needs at least two labels.")
    folder = Path(out) / "data" / data_id[:12]
    folder.mkdir(parents=True, exist_ok=True)
    files = {"train": folder / "train.jsonl", "test": folder / "test.jsonl",
             "search_train": folder / "search-train.jsonl", "val": folder / "val.jsonl"}
    for k, ds in (("train", train_all), ("test", test), ("search_train", search_train), ("val", val)):
        _write_jsonl(files[k], ds)
    name = f"{Path(data).name}#{data_id[:8]}"
    counts = {"train": len(train_all), "test": len(test), "search_train": len(search_train), "val": len(val)}
    return Splits(kind, METRIC[kind], name, data_id, files["train"], files["test"], files["search_train"],
                  files["val"], counts)


def prepare_task_search(task: str, out: str | os.PathLike) -> Splits:
    """A built-in task's validation split (carved from its training split) for ``--tune``; its
    final runs keep using ``--task`` (their keys are those of runs without ``--tune``)."""
    from ..data.tasks import get_task

    t = get_task(task)
    train, test = t.splits()
    search_train, val = carve(train, "paretune-val", VAL_FRACTION)
    h = hashlib.sha256(f"{SPLIT_RULE}|task:{task}".encode())
    for ds in (search_train, val):
        h.update(json.dumps(ds.rows, sort_keys=True).encode())
    data_id = h.hexdigest()
    folder = Path(out) / "data" / data_id[:12]
    folder.mkdir(parents=True, exist_ok=True)
    files = folder / "search-train.jsonl", folder / "val.jsonl"
    _write_jsonl(files[0], search_train)
    _write_jsonl(files[1], val)
    counts = {"train": len(train), "test": len(test), "search_train": len(search_train), "val": len(val)}
    return Splits(t.kind, t.metric, task, data_id, None, None, files[0], files[1], counts)


def check_model_kind(model: str, kind: str) -> None:
    """A clear error, before any run, when ``model`` cannot do ``kind``. Supported: classification
    on encoder models (BERT-like, e.g. minilm-l6) and on causal LMs (a sequence-classification head,
    e.g. smollm2-135m); generation on causal LMs only (config architectures ``*ForCausalLM`` /
    ``*LMHeadModel``). A Hub id is checked when it loads."""
    from .. import models

    need = "causal-lm" if kind == "generation" else "classification"
    if model in models.BUNDLED:
        b = models.BUNDLED[model]
        if need not in b.tasks:
            raise ParetuneError(f"{model} cannot do {kind}: it is a {b.default_task} model ({', '.join(b.tasks)}); "
                                + ("generation data (prompt,completion) needs a causal LM such as smollm2-135m."
                                   if kind == "generation" else "classification needs an encoder or causal LM."))
        return
    cfg = Path(os.path.expanduser(model)) / "config.json"
    if kind == "generation" and cfg.is_file():
        try:
            archs: Any = json.loads(cfg.read_text()).get("architectures")
        except (OSError, ValueError):
            return
        if archs and not models._is_causal(archs):
            raise ParetuneError(f"{model} cannot do generation: its architectures are {', '.join(archs)}, not a "
                                "causal LM (…ForCausalLM). Generation data (prompt,completion) needs a causal LM such "
                                "as smollm2-135m; an encoder-only model takes classification data (text,label).")
