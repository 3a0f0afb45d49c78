"""Merge recipes: a YAML file that says which models to merge, how, and into what.

    base: ./smol-base
    method: ties
    parameters: {density: 0.2, lam: 1.0, majority_sign: total}
    inputs:
      - {model: ./smol-math, weight: 0.6}
      - {model: ./smol-code, weight: 0.4, density: 0.2}
    filters:
      include: ["*"]
      exclude: ["*embed_tokens*", "re:^lm_head\\\\."]
    dtype: bfloat16
    tokenizer_from: base

Keys: ``base`` and ``inputs`` (required; an input is a path or ``{model, weight, density}``),
``method`` (required; a name in :data:`paretune.merging.methods.METHODS`), ``parameters`` (the
method's options, plus ``lam``, the scale of the merged task vector, default 1, and ``seed`` for
the random methods), ``filters`` (``include`` / ``exclude``: globs, or ``re:`` regular
expressions, on tensor names; the rest is copied from the base), ``dtype`` (output dtype of float
tensors: ``float32``, ``bfloat16``, ``float16`` or ``auto``, the default, which keeps the base's)
and ``tokenizer_from`` (``base``, default, or a model folder). Relative paths are relative to
the folder of the recipe file.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ParetuneError
from .models import DEFAULT_SHARD_BYTES, PER_INPUT, check_parameters, merge_models, method_function, resolve_dtype

TOP_KEYS = ("base", "method", "parameters", "inputs", "filters", "dtype", "tokenizer_from")
FILTER_KEYS = ("include", "exclude")
INPUT_KEYS = ("model", *PER_INPUT)


@dataclass
class Recipe:
    """A parsed, checked merge recipe (paths resolved)."""

    base: Path
    method: str
    inputs: list[dict[str, Any]]
    parameters: dict[str, Any] = field(default_factory=dict)
    lam: float = 1.0
    include: list[str] | None = None
    exclude: list[str] | None = None
    dtype: str | None = None
    tokenizer_from: str | Path = "base"
    source: Path | None = None


def _unknown(key: str, known: tuple[str, ...], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(f"{where}: unknown key {key!r}; {hint}known keys: {', '.join(known)}.")


def _path(value: Any, root: Path, what: str) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ConfigError(f"{what} must be a folder path, got {value!r}.")
    p = Path(os.path.expanduser(str(value)))
    p = p if p.is_absolute() else root / p
    if not p.is_dir():
        raise ConfigError(f"{what} {value!r} does not exist (looked for {p}); fix the path (relative paths are "
                          "relative to the recipe's folder).")
    return p


def _patterns(value: Any, what: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{what} must be a list of patterns (globs, or 're:REGEX'), got {value!r}.")
    return value


def parse_recipe(data: Any, root: str | os.PathLike = ".", *, where: str = "recipe") -> Recipe:
    """Check a recipe given as a mapping (as YAML loads it) and resolve its paths against
    ``root``. Raises :class:`ConfigError` naming the bad key or value."""
    root = Path(root)
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping with keys {', '.join(TOP_KEYS)}, got {type(data).__name__}.")
    for key in data:
        if key not in TOP_KEYS:
            raise _unknown(str(key), TOP_KEYS, where)
    for key in ("base", "method", "inputs"):
        if data.get(key) is None:
            raise ConfigError(f"{where}: '{key}' is required.")
    method = data["method"]
    method_function(method)  # unknown method -> ConfigError listing the known ones
    base = _path(data["base"], root, "base")
    raw_inputs = data["inputs"]
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ConfigError(f"{where}: 'inputs' must be a non-empty list of model folders or "
                          "{model: PATH, weight: W} entries.")
    inputs = []
    for i, item in enumerate(raw_inputs):
        if isinstance(item, (str, os.PathLike)):
            item = {"model": item}
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: input {i} must be a path or a mapping with 'model', got {item!r}.")
        for key in item:
            if key not in INPUT_KEYS:
                raise _unknown(str(key), INPUT_KEYS, f"{where}: input {i}")
        if "model" not in item:
            raise ConfigError(f"{where}: input {i} has no 'model' (the path of its model folder).")
        entry = {"model": _path(item["model"], root, f"input {i} model")}
        for key in PER_INPUT:
            if key in item:
                v = item[key]
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ConfigError(f"{where}: input {i} {key} must be a number, got {v!r}.")
                entry[key] = float(v)
        inputs.append(entry)
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: 'parameters' must be a mapping of the method's options, got {params!r}.")
    params = dict(params)
    lam = params.pop("lam", 1.0)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise ConfigError(f"{where}: parameters.lam must be a number, got {lam!r}.")
    check_parameters(method, params, [k for d in inputs for k in d if k != "model"])
    filters = data.get("filters") or {}
    if not isinstance(filters, dict):
        raise ConfigError(f"{where}: 'filters' must be a mapping with include / exclude lists, got {filters!r}.")
    for key in filters:
        if key not in FILTER_KEYS:
            raise _unknown(str(key), FILTER_KEYS, f"{where}: filters")
    dtype = data.get("dtype")
    resolve_dtype(dtype)
    tok = data.get("tokenizer_from", "base")
    tok = "base" if tok in (None, "base") else _path(tok, root, "tokenizer_from")
    return Recipe(base=base, method=method, inputs=inputs, parameters=params, lam=float(lam),
                  include=_patterns(filters.get("include"), "filters.include"),
                  exclude=_patterns(filters.get("exclude"), "filters.exclude"),
                  dtype=None if dtype is None else str(dtype), tokenizer_from=tok)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and check a YAML recipe file (see the module docstring for its keys)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ParetuneError(f"recipe {path} does not exist; give the path of a YAML merge recipe.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"recipe {path} is not valid YAML{at}: {getattr(e, 'problem', None) or e}.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ParetuneError(f"recipe {path} cannot be read ({e}).") from None
    recipe = parse_recipe(data, path.parent, where=f"recipe {path}")
    recipe.source = path
    return recipe


def run_recipe(
    recipe: Recipe | str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Run a recipe (a :class:`Recipe` or the path of a YAML file) with
    :func:`paretune.merging.merge_models`; returns the output folder."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    return merge_models(recipe.base, recipe.inputs, method=recipe.method, out=out, parameters=recipe.parameters,
                        include=recipe.include, exclude=recipe.exclude, lam=recipe.lam, dtype=recipe.dtype,
                        tokenizer_from=recipe.tokenizer_from, shard_bytes=shard_bytes, overwrite=overwrite,
                        progress=progress)


__all__ = ["Recipe", "load_recipe", "parse_recipe", "run_recipe"]
