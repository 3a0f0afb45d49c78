"""Merging whole models: stream every tensor of a base and N fine-tuned checkpoints through a
merging method and write a new transformers folder.

    from paretune.merging import merge_models
    merge_models("smol-base", ["smol-math", "smol-code"], method="ties", out="smol-merged",
                 parameters={"density": 0.2}, lam=1.0)

For every tensor name ``θ_merged = θ_base + lam · METHOD([θ_1 − θ_base, ..., θ_n − θ_base])``
(task vectors, Ilharco et al. 2023, "Editing Models with Task Arithmetic"; the methods are in
:mod:`paretune.merging.methods`).

Memory. Tensors are read one at a time with positioned reads (``os.pread``-style ``readinto``
into a freshly allocated tensor), not through a memory map: pages of a memory-mapped file count
in the resident set size once touched and stay there while the map is open, so a memory-mapped
reader's RSS grows towards the size of every file it reads. The output is planned in advance
(every tensor's name, shape and dtype are known from the base's headers), so each shard's
safetensors header is written first and every merged tensor is written to disk as soon as it is
computed: nothing accumulates in memory. Every float tensor is merged in row blocks of at most
``chunk_bytes`` per input (one block for a tensor that fits): ``task_arithmetic`` and
``weighted_average`` act entry by entry and are called on each block; ``ties``, ``dare_*`` and
``pcb`` go through their block-wise forms (:data:`paretune.merging.methods.BLOCK_METHODS`), which
compute the whole-tensor statistics they need (top-k cut-offs, clip bounds, minima and maxima) in
passes over the blocks, reading the inputs again for each pass, and then merge block by block.
Peak memory is therefore a few blocks whatever the tensor's size, and the results are identical
to the whole-tensor methods'.

Atomicity. The output folder is written in a temporary folder beside it (``.<name>.tmp-XXXXXX``
in the output's parent folder, see :func:`paretune.core.atomic.atomic_dir`) and renamed at the
end, so an interrupted merge (even ``kill -9``) never leaves a partial output folder. A merge
killed with SIGKILL cannot remove its temporary folder; the next merge to the same output path
removes such leftovers (it recognises them by the id of a process that is no longer running,
stored in the folder's ``.paretune-merge-pid`` file), and they never make a merge fail.

Choices the papers leave open: the arithmetic is done in float32 whatever the checkpoint's dtype
(task vectors of bfloat16 models lose little when computed in float32, much in bfloat16), and the
result is cast to ``dtype`` (default: the base tensor's dtype); non-float tensors and tensors that
``include`` / ``exclude`` leave out are copied from the base (cast to ``dtype`` when they are
float); DARE's random drop of tensor NAME uses a ``torch.Generator`` seeded with
:func:`tensor_seed` ``(seed, NAME)``, so a merge is reproducible and independent of the order of
tensors, of sharding and of ``chunk_bytes``: the masks are those :func:`~paretune.merging.methods.dare`
draws on the whole tensor (see :func:`~paretune.merging.methods.dare_blocks`), so
:func:`merge_state_dicts` gives the same result.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import inspect
import json
import math
import os
import re
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from ..errors import ConfigError, ParetuneError
from ..core.atomic import pid_alive

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PROVENANCE_FILE = "paretune_merge.json"
PID_FILE = ".paretune-merge-pid"
DEFAULT_SHARD_BYTES = 2**30  # 1 GiB per output shard
DEFAULT_CHUNK_BYTES = 2**22  # 4 MiB per input per row block (larger blocks: glibc keeps freed ones)
# methods whose result at an entry depends only on the inputs at that entry (deterministically): called
# on each row block; the methods in methods.BLOCK_METHODS stream through their block-wise forms
ENTRYWISE = frozenset({"task_arithmetic", "weighted_average"})
# per-input options (a list with one value per input is passed to the method)
PER_INPUT = ("weight", "density")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "chat_template.jinja",
    "chat_template.json",
)
CONFIG_FILES = (CONFIG_FILE, "generation_config.json")

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
_CODES = {v: k for k, v in _DTYPES.items()}
_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float64": torch.float64}


# -- reading --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int


class SafetensorsReader:
    """One ``.safetensors`` file: its header parsed, tensors read on demand with positioned
    reads (no memory map). Rejects truncated or malformed files with an :class:`AdapterFileError`-
    style :class:`ParetuneError` naming the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._f = open(self.path, "rb")
        except OSError as e:
            raise ParetuneError(f"cannot open {self.path} ({e.strerror}); check the model folder.") from None
        size = os.fstat(self._f.fileno()).st_size
        head = self._f.read(8)
        bad = f"{self.path} is not a valid safetensors file"
        if len(head) < 8:
            self.close()
            raise ParetuneError(f"{bad} (shorter than 8 bytes); save the model again with save_pretrained.")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 2**20):
            self.close()
            raise ParetuneError(f"{bad} (header of {n} bytes in a {size}-byte file: truncated?); "
                                "save the model again with save_pretrained.")
        try:
            header = json.loads(self._f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            self.close()
            raise ParetuneError(f"{bad} (header is not JSON: {e}).") from None
        if not isinstance(header, dict):
            self.close()
            raise ParetuneError(f"{bad} (header is not a JSON object).")
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, _Entry] = {}
        base = 8 + n
        for name, info in header.items():
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                a, b = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                self.close()
                raise ParetuneError(f"{bad}: tensor {name!r} has an unreadable or unsupported entry {info!r}.") from None
            numel = math.prod(shape)
            if b - a != numel * _itemsize(dtype) or base + b > size or a < 0:
                self.close()
                raise ParetuneError(f"{bad}: tensor {name!r} ({info['dtype']} {list(shape)}) does not fit the "
                                    "file (truncated?); save the model again with save_pretrained.")
            self.entries[name] = _Entry(dtype, shape, base + a, b - a)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor ``name`` (a fresh, writable tensor), or only rows ``rows[0]:rows[1]`` of
        its first dimension."""
        e = self.entries[name]
        shape, start, nbytes = e.shape, e.start, e.nbytes
        if rows is not None:
            row = nbytes // shape[0] if shape and shape[0] else 0
            shape = (rows[1] - rows[0],) + shape[1:]
            start, nbytes = start + rows[0] * row, (rows[1] - rows[0]) * row
        t = torch.empty(shape, dtype=e.dtype)
        if nbytes:
            view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            done = 0
            while done < nbytes:
                got = os.preadv(self._f.fileno(), [view[done:]], start + done)
                if got <= 0:
                    raise ParetuneError(f"{self.path} ended early while reading {name!r}; the file is truncated.")
                done += got
        return t

    def close(self) -> None:
        self._f.close()


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _load_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ParetuneError(f"{folder} has no {CONFIG_FILE}; give a transformers model folder "
                            "(written by save_pretrained).")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ParetuneError(f"{path} cannot be read as JSON ({e}).") from None
    if not isinstance(cfg, dict):
        raise ParetuneError(f"{path} is not a JSON object.")
    return cfg


class Checkpoint:
    """A transformers model folder: ``config.json`` and ``model.safetensors`` or shards listed in
    ``model.safetensors.index.json``."""

    def __init__(self, folder: str | os.PathLike, role: str = "model"):
        self.folder = Path(folder)
        self.role = role
        if not self.folder.is_dir():
            raise ParetuneError(f"{role} folder {self.folder} does not exist (or is not a folder); "
                                "give a model folder written by save_pretrained.")
        self.config = _load_config(self.folder)
        index = self.folder / INDEX_FILE
        files: dict[str, list[str]] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                assert isinstance(weight_map, dict)
            except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
                raise ParetuneError(f"{index} is not a valid shard index ({e}).") from None
            for name, fname in weight_map.items():
                files.setdefault(fname, []).append(name)
        elif (self.folder / SINGLE_FILE).is_file():
            files[SINGLE_FILE] = []
        else:
            other = sorted(p.name for p in self.folder.glob("*.bin")) + sorted(p.name for p in self.folder.glob("*.pt"))
            hint = (f" (found {', '.join(other)}: pickle files are not read; save the model with "
                    "save_pretrained(..., safe_serialization=True))") if other else ""
            raise ParetuneError(f"{role} folder {self.folder} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}.")
        self.readers: dict[str, SafetensorsReader] = {}
        self.where: dict[str, SafetensorsReader] = {}
        try:
            for fname, names in files.items():
                path = self.folder / fname
                if not path.is_file():
                    raise ParetuneError(f"{index} lists {fname}, which is missing from {self.folder}.")
                r = self.readers[fname] = SafetensorsReader(path)
                for name in names or r.entries:
                    if name not in r.entries:
                        raise ParetuneError(f"{index} places tensor {name!r} in {fname}, which lacks it.")
                    self.where[name] = r
        except BaseException:
            self.close()
            raise

    def entry(self, name: str) -> _Entry:
        return self.where[name].entries[name]

    def file_of(self, name: str) -> Path:
        return self.where[name].path

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self.where[name].read(name, rows)

    def close(self) -> None:
        for r in self.readers.values():
            r.close()


# -- writing --------------------------------------------------------------------------------------

@dataclass
class _Shard:
    fname: str
    names: list[str] = field(default_factory=list)
    nbytes: int = 0


class ShardedWriter:
    """Writes tensors, in a fixed planned order, straight to safetensors shards: each shard's
    header is written when the shard is opened, each tensor's bytes as they come."""

    def __init__(self, folder: Path, plan: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], shard_bytes: int):
        self.folder = folder
        self.plan = list(plan)
        shards: list[_Shard] = []
        for name, dtype, shape in self.plan:
            nb = math.prod(shape) * _itemsize(dtype)
            if not shards or (shards[-1].names and shards[-1].nbytes + nb > shard_bytes):
                shards.append(_Shard(""))
            shards[-1].names.append(name)
            shards[-1].nbytes += nb
        if len(shards) == 1:
            shards[0].fname = SINGLE_FILE
        for i, s in enumerate(shards):
            if len(shards) > 1:
                s.fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        self.shards = shards
        self.total = sum(s.nbytes for s in shards)
        self._spec = {name: (dtype, shape) for name, dtype, shape in self.plan}
        self._shard_of = {n: i for i, s in enumerate(shards) for n in s.names}
        self._next = 0  # index in plan of the tensor being written
        self._left = 0  # bytes of that tensor still to come
        self._file = None
        self._open_shard = -1

    def _open(self, i: int) -> None:
        if self._file is not None:
            self._file.close()
        s = self.shards[i]
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        off = 0
        for n in s.names:
            dtype, shape = self._spec[n]
            nb = math.prod(shape) * _itemsize(dtype)
            header[n] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(self.folder / s.fname, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._open_shard = i

    def write(self, name: str, part: torch.Tensor, last: bool = True) -> None:
        """Write ``part`` (the whole tensor ``name``, or its next row block with ``last`` False
        until the final block)."""
        pname, dtype, shape = self.plan[self._next]
        if name != pname or part.dtype != dtype:
            raise RuntimeError(f"writer expected {pname} ({dtype}), got {name} ({part.dtype})")
        if self._left == 0:
            self._left = math.prod(shape) * _itemsize(dtype)
            shard = self._shard_of[name]
            if shard != self._open_shard:
                self._open(shard)
        data = part.contiguous().reshape(-1).view(torch.uint8).numpy() if part.numel() else b""
        self._file.write(data)  # type: ignore[union-attr]
        self._left -= part.numel() * part.element_size()
        if last:
            if self._left != 0:
                raise RuntimeError(f"tensor {name}: {self._left} bytes missing")
            self._next += 1

    def finish(self) -> None:
        if self._next != len(self.plan):
            raise RuntimeError("writer finished early")
        if self._file is not None:
            self._file.close()
            self._file = None
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {n: s.fname for s in self.shards for n in s.names}}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# -- options --------------------------------------------------------------------------------------

def tensor_seed(seed: int, name: str) -> int:
    """The seed of the random draw (DARE's drop mask) of tensor ``name``: ``(seed + crc32(name))
    mod 2**63``."""
    return (int(seed) + zlib.crc32(name.encode("utf-8"))) % 2**63


def resolve_dtype(dtype: Any) -> torch.dtype | None:
    """``None`` / ``"auto"`` (keep each tensor's dtype), a torch float dtype or its name."""
    if dtype is None or (isinstance(dtype, str) and dtype.lower() in ("auto", "")):
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ConfigError(f"dtype {dtype} is not a float dtype; use float32, bfloat16 or float16.")
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.lower().removeprefix("torch.")]
    raise ConfigError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16 (or auto).")


def _methods() -> dict[str, Callable]:
    from .methods import METHODS

    return METHODS


def _block_methods() -> dict[str, Callable]:
    from .blockwise import BLOCK_METHODS

    return BLOCK_METHODS


def method_function(method: str) -> Callable:
    """The merging function called ``method`` (ConfigError listing the known ones otherwise)."""
    methods = _methods()
    if not isinstance(method, str) or method not in methods:
        close = difflib.get_close_matches(str(method), list(methods), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown merging method {method!r}; {hint}known methods: {', '.join(methods)}.")
    return methods[method]


def _accepted(fn: Callable) -> set[str] | None:
    """Keyword options ``fn`` takes (None: any, it has **kwargs)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    names = set()
    for i, p in enumerate(sig.parameters.values()):
        if p.kind is p.VAR_KEYWORD:
            return None
        if i == 0 and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            continue  # the task vectors
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.add(p.name)
    return names


def check_parameters(method: str, parameters: dict | None, per_input: Iterable[str] = ()) -> None:
    """ConfigError naming an option ``method`` does not take (with the closest known one)."""
    fn = method_function(method)
    accepted = _accepted(fn)
    if accepted is None:
        return
    accepted = accepted - {"weights", "generator"}
    for key in list(parameters or {}) + [k for k in per_input if k != "weight"]:
        if key in ("weights", "generator"):
            raise ConfigError(f"option {key!r} cannot be given in parameters; give per-input 'weight' values "
                              "(and 'seed' for a random method) instead.")
        if key not in accepted:
            close = difflib.get_close_matches(key, sorted(accepted), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"method {method!r} has no option {key!r}; {hint}its options: "
                              f"{', '.join(sorted(accepted)) or 'none'}.")


def _compile_patterns(patterns: Any, what: str) -> list[Callable[[str], bool]]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"{what} must be a list of glob patterns (or 're:REGEX'), got {patterns!r}.")
    out = []
    for p in patterns:
        if p.startswith("re:"):
            try:
                rx = re.compile(p[3:])
            except re.error as e:
                raise ConfigError(f"{what} pattern {p!r} is not a valid regular expression ({e}).") from None
            out.append(lambda n, rx=rx: rx.search(n) is not None)
        else:
            out.append(lambda n, p=p: fnmatch.fnmatchcase(n, p))
    return out


def name_filter(include: Any = None, exclude: Any = None) -> Callable[[str], bool]:
    """``name -> merged?``: a tensor is merged when it matches some ``include`` pattern (or
    ``include`` is empty) and no ``exclude`` pattern. A pattern is a glob on the whole name
    (``*.mlp.*``, fnmatch rules, case-sensitive) or, prefixed with ``re:``, a regular expression
    searched anywhere in the name (``re:layers\\.(0|1)\\.``)."""
    inc = _compile_patterns(include, "include")
    exc = _compile_patterns(exclude, "exclude")

    def selected(name: str) -> bool:
        return (not inc or any(m(name) for m in inc)) and not any(m(name) for m in exc)

    return selected


def _normalise_inputs(inputs: Sequence[Any]) -> list[dict]:
    if isinstance(inputs, (str, os.PathLike)) or not isinstance(inputs, Sequence) or not inputs:
        raise ConfigError("inputs must be a non-empty list of model folders (or of {'model': PATH, 'weight': ...} "
                          "entries).")
    out = []
    for i, item in enumerate(inputs):
        if isinstance(item, (str, os.PathLike)):
            out.append({"model": Path(item)})
        elif isinstance(item, dict):
            if "model" not in item:
                raise ConfigError(f"input {i} has no 'model' (the path of its model folder): {item!r}.")
            unknown = [k for k in item if k != "model" and k not in PER_INPUT]
            if unknown:
                close = difflib.get_close_matches(unknown[0], ["model", *PER_INPUT], n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ConfigError(f"input {i} has an unknown key {unknown[0]!r}; {hint}an input takes "
                                  f"model, {', '.join(PER_INPUT)}.")
            out.append({**item, "model": Path(item["model"])})
        else:
            raise ConfigError(f"input {i} must be a path or a mapping with 'model', got {type(item).__name__}.")
    return out


def _method_options(inputs: list[dict], parameters: dict) -> tuple[list[float] | None, dict]:
    """``weights`` and the method's keyword options, per-input values turned into lists."""
    params = dict(parameters)
    weights = None
    if any("weight" in d for d in inputs):
        default = params.get("weight")
        weights = []
        for i, d in enumerate(inputs):
            w = d.get("weight", default)
            if w is None:
                raise ConfigError(f"input {i} ({d['model']}) has no weight while others do; give every input a "
                                  "weight (or none).")
            weights.append(float(w))
    params.pop("weight", None)
    for key in PER_INPUT:
        if key == "weight" or not any(key in d for d in inputs):
            continue
        values = []
        for i, d in enumerate(inputs):
            v = d.get(key, params.get(key))
            if v is None:
                raise ConfigError(f"input {i} ({d['model']}) has no {key} while others do; give every input a "
                                  f"{key}, or a default in parameters.")
            values.append(v)
        params[key] = values[0] if all(v == values[0] for v in values) else values
    return weights, params


def _check_compatible(base: Checkpoint, others: list[Checkpoint]) -> None:
    bt, ba = base.config.get("model_type"), base.config.get("architectures")
    for c in others:
        t, a = c.config.get("model_type"), c.config.get("architectures")
        if t != bt or (a and ba and a != ba):
            raise ParetuneError(f"{c.folder} is a {t} model ({a}) but the base {base.folder} is a {bt} model ({ba}); "
                                "merge only fine-tunes of the same base architecture.")
        missing = sorted(set(base.where) - set(c.where))
        if missing:
            raise ParetuneError(f"tensor {missing[0]!r} of the base is missing from {c.folder}"
                                f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; the inputs must "
                                "be fine-tunes of the base with the same tensors.")
        extra = sorted(set(c.where) - set(base.where))
        if extra:
            raise ParetuneError(f"tensor {extra[0]!r} of {c.file_of(extra[0])} is not in the base {base.folder}"
                                f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}; the inputs must be "
                                "fine-tunes of the base with the same tensors.")
        for name, r in base.where.items():
            e, f = r.entries[name], c.entry(name)
            if e.shape != f.shape:
                raise ParetuneError(f"tensor {name!r} has shape {list(f.shape)} in {c.file_of(name)} but "
                                    f"{list(e.shape)} in the base ({base.file_of(name)}); the models do not share "
                                    "an architecture.")


# -- leftovers of killed merges ---------------------------------------------------------------------

def remove_stale_temp(out: Path) -> list[Path]:
    """Remove temporary folders (``.<name>.tmp-*`` beside ``out``) left by merges to ``out``
    whose process no longer runs (killed with SIGKILL, or the machine stopped). Returns them."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        marker = p / PID_FILE
        try:
            pid = int(marker.read_text().strip())
        except (OSError, ValueError):
            continue  # not ours, or still being created
        if pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# -- the merge ------------------------------------------------------------------------------------

def merge_models(
    base: str | os.PathLike,
    inputs: Sequence[str | os.PathLike | dict],
    *,
    method: str,
    out: str | os.PathLike,
    parameters: dict | None = None,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    lam: float = 1.0,
    dtype: Any = None,
    tokenizer_from: str | os.PathLike = "base",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Merge the fine-tuned models ``inputs`` into ``base`` with ``method`` and write a
    transformers folder at ``out`` (loadable with ``AutoModelForCausalLM.from_pretrained(out)``).

    ``base`` / ``inputs``: transformers folders (``config.json`` and ``model.safetensors`` or a
    sharded ``model-0000i-of-0000n.safetensors`` set with its index), all of the same
    architecture and tensor shapes. An input is a path or ``{"model": path, "weight": w,
    "density": d}``: per-input ``weight`` goes to the method as ``weights=[...]``, per-input
    ``density`` as one value when all are equal, else as a list (for methods that accept one).
    ``method``: a name in :data:`paretune.merging.methods.METHODS`; ``parameters``: its options
    (``density``, ``majority_sign``, ``ratio``, ``clip``, ``combine``, ``seed``...).
    ``θ_merged = θ_base + lam · METHOD(task vectors)`` for every float tensor that
    ``include`` / ``exclude`` select (see :func:`name_filter`); the others are copied from the
    base. ``dtype``: output dtype of float tensors (default: each base tensor's). Config files
    (``config.json``, ``generation_config.json``) come from the base; tokenizer files from
    ``tokenizer_from`` (``"base"`` or a model folder). ``shard_bytes``: output shard size limit
    (one shard holds at least one tensor). ``out`` must not exist unless ``overwrite``; it is
    written atomically. Returns ``out``.
    """
    out = Path(out)
    fn = method_function(method)
    parameters = dict(parameters or {})
    items = _normalise_inputs(inputs)
    check_parameters(method, parameters, [k for d in items for k in d if k != "model"])
    weights, params = _method_options(items, parameters)
    seed = params.pop("seed", None)
    takes = _accepted(fn)
    random = takes is None or "generator" in takes
    if seed is not None and not random:
        raise ConfigError(f"method {method!r} is not random; remove 'seed'.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"seed must be an integer, got {seed!r}.")
    seed = 0 if seed is None else seed
    try:
        lam = float(lam)
    except (TypeError, ValueError):
        raise ConfigError(f"lam must be a number, got {lam!r}.") from None
    if not math.isfinite(lam):
        raise ConfigError(f"lam must be finite, got {lam}.")
    out_dtype = resolve_dtype(dtype)
    selected = name_filter(include, exclude)
    if not isinstance(shard_bytes, int) or shard_bytes < 1:
        raise ConfigError(f"shard_bytes must be a positive integer, got {shard_bytes!r}.")
    if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ConfigError(f"chunk_bytes must be a positive integer, got {chunk_bytes!r}.")
    # the options are checked on a tiny example first, so a bad value fails before any file is written
    probe = [torch.linspace(-1.0, 1.0, 16) * (i + 1) for i in range(len(items))]
    kwargs = dict(params)
    if random:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    try:
        fn(probe, weights=weights, **kwargs)
    except (ConfigError, TypeError) as e:
        lists = [k for k, v in params.items() if isinstance(v, list)]
        if lists:
            raise ConfigError(f"method {method!r} takes one {lists[0]} for all inputs, but the inputs give "
                              f"different values {params[lists[0]]}; give one value in parameters ({e}).") from None
        if isinstance(e, TypeError):
            raise ConfigError(f"method {method!r} rejected the options {sorted(params)}: {e}.") from None
        raise

    sources = [Path(base)] + [d["model"] for d in items]
    for s in sources:
        if out.exists() and s.exists() and out.resolve() == s.resolve():
            raise ParetuneError(f"out {out} is one of the models being merged; choose another output folder.")
    if out.exists() and not overwrite:
        raise ParetuneError(f"{out} already exists; choose another output folder or pass overwrite=True "
                            "(--overwrite).")
    if out.exists() and not out.is_dir():
        raise ParetuneError(f"{out} exists and is not a folder; choose another output path.")
    tok = Path(base) if str(tokenizer_from) == "base" else Path(tokenizer_from)
    if not tok.is_dir():
        raise ParetuneError(f"tokenizer_from folder {tok} does not exist; give 'base' or a model folder.")

    with contextlib.ExitStack() as stack:
        b = Checkpoint(base, "base")
        stack.callback(b.close)
        models: list[Checkpoint] = []
        for i, d in enumerate(items):
            c = Checkpoint(d["model"], f"input {i}")
            stack.callback(c.close)
            models.append(c)
        _check_compatible(b, models)

        names = sorted(b.where)
        plan = []
        for name in names:
            e = b.entry(name)
            dt = out_dtype if (out_dtype is not None and e.dtype.is_floating_point) else e.dtype
            plan.append((name, dt, e.shape))
        remove_stale_temp(out)
        from ..core.atomic import atomic_dir

        with atomic_dir(out) as tmp:
            (tmp / PID_FILE).write_text(str(os.getpid()))
            writer = ShardedWriter(tmp, plan, shard_bytes)
            bar = _bar(len(names), progress, method)
            try:
                for (name, dt, shape) in plan:
                    if not (b.entry(name).dtype.is_floating_point and selected(name)):
                        writer.write(name, b.read(name).to(dt))
                    else:
                        _merge_one(name, dt, b, models, method, fn, weights, params, lam,
                                   seed if random else None, chunk_bytes=chunk_bytes, writer=writer)
                    bar.update(1)
                writer.finish()
            finally:
                bar.close()
                writer.close()
            _copy_side_files(Path(base), tok, tmp, out_dtype)
            provenance = {
                "method": method, "lam": lam, "parameters": parameters, "base": str(base),
                "inputs": [{**d, "model": str(d["model"])} for d in items],
                "include": include, "exclude": exclude, "dtype": str(out_dtype).removeprefix("torch.") if out_dtype else None,
                "tokenizer_from": str(tokenizer_from),
            }
            (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, default=str) + "\n", encoding="utf-8")
            (tmp / PID_FILE).unlink()
    return out


def _bar(total: int, progress: bool, method: str):
    from ..progress import bar as progress_bar

    return progress_bar(total=total, unit="tensor", desc=f"merge {method}", enabled=progress)


def _row_blocks(shape: tuple[int, ...], chunk_bytes: int) -> list[tuple[int, int] | None]:
    """Row ranges of at most ``chunk_bytes`` of float32 each (at least one row), or [None] for the
    whole tensor (a scalar, a single row, or a tensor that fits in one block)."""
    if len(shape) >= 1 and shape[0] > 1:
        row = max(1, math.prod(shape[1:])) * 4
        step = max(1, chunk_bytes // row)
    else:
        step = shape[0] if shape else 1
    if not shape or step >= shape[0]:
        return [None]
    return [(a, min(a + step, shape[0])) for a in range(0, shape[0], step)]


def _merge_one(name: str, dt: torch.dtype, base: Checkpoint, models: list[Checkpoint], method: str, fn: Callable,
               weights: list[float] | None, params: dict, lam: float, seed: int | None, *,
               chunk_bytes: int, writer: ShardedWriter) -> None:
    shape = base.entry(name).shape
    block_fn = _block_methods().get(method)
    blocks = _row_blocks(shape, chunk_bytes) if (block_fn is not None or method in ENTRYWISE) else [None]

    def source():
        for rows in blocks:
            b = base.read(name, rows).float()
            taus = []
            for c in models:
                x = c.read(name, rows)
                taus.append(x.sub_(b) if x.dtype == torch.float32 else x.float().sub_(b))
            del b  # read again when the merged block is added: the method's temporaries need one copy less
            yield taus
            del taus

    kwargs = dict(params)
    if seed is not None:
        kwargs["generator"] = torch.Generator().manual_seed(tensor_seed(seed, name))
    if block_fn is not None:
        merged_blocks = block_fn(source, numel=math.prod(shape), weights=weights, **kwargs)
    else:  # entry-wise methods block by block; any other on the whole tensor (one block)
        merged_blocks = (fn(taus, weights=weights, **kwargs) for taus in source())
    k = 0
    try:
        for rows, merged in zip(blocks, merged_blocks):
            merged = merged.float()  # a float32 result is used (and changed) in place
            if lam != 1.0:
                merged.mul_(lam)
            merged.add_(base.read(name, rows).float())
            writer.write(name, merged.to(dt), last=k == len(blocks) - 1)
            del merged
            k += 1
    except ConfigError as e:
        raise ConfigError(f"tensor {name!r}: {e}") from None
    if k != len(blocks):
        raise RuntimeError(f"tensor {name}: the method yielded {k} of {len(blocks)} blocks")


def _copy_side_files(base: Path, tok: Path, dest: Path, out_dtype: torch.dtype | None) -> None:
    for fname in CONFIG_FILES:
        src = base / fname
        if src.is_file():
            shutil.copyfile(src, dest / fname)
    if out_dtype is not None:
        cfg = json.loads((dest / CONFIG_FILE).read_text(encoding="utf-8"))
        keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]
        for k in keys:
            cfg[k] = str(out_dtype).removeprefix("torch.")
        (dest / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    for fname in TOKENIZER_FILES:
        src = tok / fname
        if src.is_file():
            shutil.copyfile(src, dest / fname)


def merge_state_dicts(base: dict[str, torch.Tensor], inputs: Sequence[dict[str, torch.Tensor]], *, method: str,
                      weights: Sequence[float] | None = None, lam: float = 1.0, seed: int | None = None,
                      include: Any = None, exclude: Any = None, **params: Any) -> dict[str, torch.Tensor]:
    """The same merge on state dicts in memory (every tensor at once; for small models and for
    checking :func:`merge_models`): float tensors selected by ``include`` / ``exclude`` become
    ``base + lam · METHOD(τ)`` computed in float32 and cast back to the base tensor's dtype."""
    fn = method_function(method)
    takes = _accepted(fn)
    random = takes is None or "generator" in takes
    selected = name_filter(include, exclude)
    out = {}
    for name, b in base.items():
        if not (b.dtype.is_floating_point and selected(name)):
            out[name] = b.clone()
            continue
        for sd in inputs:
            if name not in sd or sd[name].shape != b.shape:
                raise ParetuneError(f"tensor {name!r} is missing from an input or has another shape.")
        taus = [sd[name].float() - b.float() for sd in inputs]
        kw = dict(params)
        if random:
            kw["generator"] = torch.Generator().manual_seed(tensor_seed(0 if seed is None else seed, name))
        out[name] = (b.float() + lam * fn(taus, weights=None if weights is None else list(weights), **kw).float()).to(b.dtype)
    return out


__all__ = ["merge_models", "merge_state_dicts", "name_filter", "tensor_seed", "remove_stale_temp", "Checkpoint",
           "SafetensorsReader", "ShardedWriter", "method_function", "check_parameters", "resolve_dtype"]
