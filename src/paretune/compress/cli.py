"""`paretune compress`: prune and/or quantise a model and write it as a compressed folder.

    paretune compress --model smollm2-135m --quantize 4 --group-size 64 --out smollm2-4bit
    paretune compress --model smollm2-135m --prune 0.5 --out smollm2-sparse
    paretune compress --model smollm2-135m --prune 0.5 --prune-method wanda \\
        --calibration country-capital --quantize 4 --group-size 64 --out smollm2-wanda-4bit

Order: pruning first (:func:`paretune.compress.prune`), then quantisation
(:func:`paretune.compress.quantize`, which keeps each mask on the quantised layer,
so the pruned weights stay exactly zero). The folder is written by
:func:`paretune.compress.save_compressed` (atomically) with the tokenizer.

Wanda's calibration (``--calibration``): a built-in task's name (its training split: a
generation example's prompt followed by its completion, a classification example's text) or a
file: ``.jsonl`` (one JSON object a line: its ``"text"``, else ``"prompt"`` + ``"completion"``),
``.csv`` (a header; the same columns), anything else plain text with one example a non-empty line.
The first ``--calibration-size`` examples (default 128, the paper's number of sequences) are
tokenised one by one, unpadded (every position counts in Wanda's norms), each cut to 2,048 tokens
(the paper's sequence length), and run through the model one sequence a batch.

Bad input prints one ``error: ...`` line and exits with status 2; every check on the arguments,
the calibration source and the output folder runs before the model is loaded, and nothing is
written unless the whole run succeeds.
"""

from __future__ import annotations

import contextlib
import csv
import json
import time
from pathlib import Path
from typing import Any, Iterator, List, Optional

import typer

from ..errors import ConfigError, ParetuneError
from ..cli_options import parse_targets

MAX_TOKENS = 2048
DEFAULT_GROUP = 128


def _check_options(bits: int | None, group_size: int, axis: str, sparsity: float | None, method: str,
                   calibration: str | None, calibration_size: int) -> int | None:
    """Every check on the numbers and names; returns the group size (None: whole channel)."""
    from .pruning import METHODS
    from .quantized import check_axis, check_bits, check_group_size

    if bits is None and sparsity is None:
        raise ConfigError("nothing to do: give --quantize BITS (2, 3, 4 or 8), --prune SPARSITY (a fraction in "
                          "[0, 1)), or both.")
    group = None if group_size == 0 else group_size
    if bits is not None:
        check_bits(bits)
        check_group_size(group)
        check_axis(axis)
    if sparsity is not None:
        if not 0 <= sparsity < 1:
            raise ConfigError(f"--prune {sparsity}: give the fraction of weights to remove, a number in [0, 1) "
                              "(0.5 removes half).")
        if method not in METHODS:
            raise ConfigError(f"--prune-method {method!r} is unknown; choose one of {', '.join(METHODS)}.")
        if method == "wanda" and calibration is None:
            raise ConfigError("--prune-method wanda needs --calibration: a built-in task (e.g. country-capital) or "
                              "a text / JSONL / CSV file of calibration text.")
    if calibration is not None and (sparsity is None or method != "wanda"):
        raise ConfigError("--calibration is only used by --prune-method wanda; leave it out, or prune with wanda.")
    if calibration_size < 1:
        raise ConfigError(f"--calibration-size {calibration_size}: give a number of examples >= 1.")
    return group


def _check_out(out: Path, model: str, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ParetuneError(f"--out {out} is a file; give a folder path.")
    src = Path(model).expanduser()
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise ParetuneError(f"--out {out} is the model being compressed; choose another output folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ParetuneError(f"--out {out} already exists and is not empty; choose another folder or pass --overwrite "
                            "to replace it.")


def _check_model_source(model: str) -> None:
    from .storage import is_compressed, read_meta

    src = Path(model).expanduser()
    if src.is_dir() and is_compressed(src):
        meta = read_meta(src)
        what = " and ".join(w for w, on in (("quantised", meta["modules"]), ("pruned", meta["pruned"])) if on)
        raise ParetuneError(f"--model {model} is already a compressed folder ({what or 'compressed'}); compressing "
                            "it again would compound the rounding and pruning. Give the original float model.")


def _text_of(row: Any, where: str) -> str:
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected an object with a 'text' field (or 'prompt' and 'completion').")
    if isinstance(row.get("text"), str):
        return row["text"]
    if isinstance(row.get("prompt"), str):
        return row["prompt"] + (row.get("completion") or "")
    raise ConfigError(f"{where}: no 'text' (or 'prompt' + 'completion') field; calibration examples need text.")


def calibration_texts(source: str, size: int) -> list[str]:
    """The first ``size`` calibration texts of a built-in task or a file (module docstring's rule)."""
    from ..data import TASKS, get_task

    path = Path(source).expanduser()
    texts: list[str] = []
    if source in TASKS and not path.exists():
        train, _ = get_task(source).splits()
        texts = [_text_of(r, f"task {source}") for r in train.rows[:size]]
    elif path.is_file():
        suffix = path.suffix.lower()
        try:
            with path.open(encoding="utf-8", newline="") as f:
                if suffix in (".jsonl", ".ndjson"):
                    for i, line in enumerate(f, 1):
                        if len(texts) >= size:
                            break
                        if line.strip():
                            try:
                                row = json.loads(line)
                            except json.JSONDecodeError as e:
                                raise ConfigError(f"--calibration {path}, line {i}: not JSON ({e.msg}).") from None
                            texts.append(_text_of(row, f"--calibration {path}, line {i}"))
                elif suffix == ".csv":
                    for i, row in enumerate(csv.DictReader(f), 2):
                        if len(texts) >= size:
                            break
                        texts.append(_text_of(row, f"--calibration {path}, row {i}"))
                else:
                    texts = [line.rstrip("\n") for line in f if line.strip()][:size]
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise ConfigError(f"--calibration {path} cannot be read ({e}).") from None
    else:
        raise ConfigError(f"--calibration {source!r} is neither a built-in task ({', '.join(TASKS)}) nor an existing "
                          "file.")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ConfigError(f"--calibration {source}: no calibration text found.")
    return texts


def _suggest_group(model: Any, names: list[str], axis: str) -> int | None:
    """The largest of 128, 64, 32, 16, 8 that divides every named layer's grouped length."""
    from ..core.geometry import geometry_for
    from .quantized import group_length

    geos = [geometry_for(model.get_submodule(n)) for n in names]
    lengths = [group_length(g.d_out, g.d_in, axis) for g in geos]
    for g in (128, 64, 32, 16, 8):
        if all(length % g == 0 for length in lengths):
            return g
    return None


def _precheck_targets(model: Any, targets: Any, bits: int | None, group: int | None, axis: str,
                      sparsity: float | None) -> None:
    """Targets and grouping checked on the loaded model before any weight changes."""
    from ..core.inject import match_targets
    from .pruning import KINDS
    from .quantize import _grouping_problems, select

    if sparsity is not None:
        match_targets(model, targets, KINDS, "prune")
    if bits is not None:
        names = select(model, targets, None)
        bad = _grouping_problems(model, names, group, axis)
        if bad:
            g = _suggest_group(model, names, axis)
            hint = f"--group-size {g} divides every one" if g else "--group-size 0 makes one group per whole channel"
            raise ConfigError(f"--group-size {group} does not divide the grouped length (axis {axis}) of "
                              f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}; {hint}.")


@contextlib.contextmanager
def _quiet_transformers(quiet: bool) -> Iterator[None]:
    """With ``quiet``, no transformers load report or progress bar while loading; restored after."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _tensor_bytes(model: Any) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def compress_command(
    model: str = typer.Option(..., "--model", help="a bundled model (smollm2-135m, minilm-l6), a local folder or a "
                              "Hub id"),
    out: Path = typer.Option(..., "--out", help="output folder (a compressed model folder; written atomically)"),
    quantize_bits: Optional[int] = typer.Option(None, "--quantize", help="quantise to BITS: 2, 3, 4 or 8"),
    group_size: int = typer.Option(DEFAULT_GROUP, "--group-size", help="weights per quantisation group (0: one group "
                                   "per whole channel); must divide every quantised layer's grouped length"),
    axis: str = typer.Option("out", "--axis", help="groups along each output row (out) or input column (in)"),
    prune_sparsity: Optional[float] = typer.Option(None, "--prune", help="fraction of weights to prune, in [0, 1)"),
    prune_method: str = typer.Option("magnitude", "--prune-method", help="magnitude, magnitude-global or wanda"),
    calibration: Optional[str] = typer.Option(None, "--calibration", help="wanda's calibration text: a built-in "
                                              "task or a .txt (a line an example) / .jsonl / .csv file"),
    calibration_size: int = typer.Option(128, "--calibration-size", help="calibration examples used"),
    targets: List[str] = typer.Option([], "--targets", help="module names / suffixes to compress (repeated or comma-separated), "
                                      "or one re:REGEX; default every Linear but the output head"),
    dequantized: bool = typer.Option(False, "--dequantized", help="also write a float model.safetensors of the "
                                     "quantised weights that transformers reads"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if it exists and is not empty"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress; print nothing but errors"),
) -> None:
    """Prune and/or quantise a model and write it as a compressed folder (with its tokenizer)."""
    group = _check_options(quantize_bits, group_size, axis, prune_sparsity, prune_method, calibration, calibration_size)
    tg = parse_targets(targets)
    _check_out(out, model, overwrite)
    _check_model_source(model)
    texts = calibration_texts(calibration, calibration_size) if calibration is not None else None

    def say(text: str) -> None:
        if not quiet:
            typer.echo(text, err=True)

    from .. import models
    from .pruning import masks, prune
    from .quantize import is_quantized, quantize
    from .storage import save_compressed

    times: dict[str, float] = {}
    t = time.perf_counter()
    say(f"loading {model} ...")
    with _quiet_transformers(quiet):
        net, tokenizer = models.load(model)
    times["load"] = time.perf_counter() - t
    if is_quantized(net) or masks(net):
        raise ParetuneError(f"--model {model} is already quantised or pruned; give the original float model.")
    _precheck_targets(net, tg, quantize_bits, group, axis, prune_sparsity)
    params = sum(p.numel() for p in net.parameters())
    before = _tensor_bytes(net)
    report = None
    if prune_sparsity is not None:
        batches = None
        if texts is not None:
            if tokenizer is None:
                raise ParetuneError(f"--model {model} has no tokenizer, so calibration text cannot be tokenised.")
            t = time.perf_counter()
            say(f"calibration: tokenising {len(texts)} examples from {calibration} ...")
            batches = [tokenizer(x, return_tensors="pt", truncation=True, max_length=MAX_TOKENS)["input_ids"]
                       for x in texts]
            batches = [b for b in batches if b.numel()]
            times["calibration"] = time.perf_counter() - t
        t = time.perf_counter()
        say(f"pruning {prune_sparsity:g} with {prune_method} ...")
        report = prune(net, prune_sparsity, prune_method, targets=tg, calibration=batches, progress=not quiet)
        times["prune"] = time.perf_counter() - t
    if quantize_bits is not None:
        t = time.perf_counter()
        say(f"quantising to {quantize_bits} bits (group {group or 'whole channel'}, axis {axis}) ...")
        quantize(net, bits=quantize_bits, group_size=group, axis=axis, targets=tg, progress=not quiet)
        times["quantize"] = time.perf_counter() - t
    t = time.perf_counter()
    say(f"writing {out} ...")
    path = save_compressed(net, out, tokenizer, dequantized=dequantized)
    times["write"] = time.perf_counter() - t
    if quiet:
        return
    from ..units import human_bytes
    from .storage import info

    i = info(path)
    after = i["file_bytes"] or 0
    lines = [f"compressed {model} -> {path}"]
    lines.append(f"parameters:  {params:,}" + (f"; {report['pruned_weights']:,} pruned "
                                                f"({report['pruned_weights'] / params:.1%} of the model)"
                                                if report else ""))
    if quantize_bits is not None:
        settings = "; ".join(f"{s['bits']}-bit, group {s['group_size']}, axis {s['axis']}" for s in i["settings"])
        lines.append(f"quantised:   {i['quantized_modules']} modules: {settings}")
    if report is not None:
        lines.append(f"pruned:      {len(report['layers'])} modules with {prune_method}: sparsity {report['sparsity']:.1%}"
                     f" of the pruned layers (dense storage; {report['pruned_weights']:,} zeros)")
    lines.append(f"bytes:       {before:,} ({human_bytes(before)}) before, {after:,} ({human_bytes(after)}) after "
                 f"({i['weights_file']}); {after / max(before, 1):.1%}")
    lines.append("time:        " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    lines.append(f"load it:     paretune.models.load({str(path)!r})")
    if i["float_copy"]:
        lines.append(f"             transformers.AutoModelForCausalLM.from_pretrained({str(path)!r}) "
                     "(or the AutoModel class of its architecture) reads model.safetensors")
    for line in lines:
        typer.echo(line)
