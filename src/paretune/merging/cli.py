"""`paretune merge`: merge fine-tuned models into their base with a YAML recipe.

    paretune merge recipe.yaml --out merged-model
    paretune merge recipe.yaml --out merged-model --overwrite --shard-size 500MB

The recipe format is described in :mod:`paretune.merging.recipe`. The output is a transformers
folder (config, tokenizer files, safetensors shards), written atomically.
"""

from __future__ import annotations

import re
from pathlib import Path

import typer

from ..errors import ConfigError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """``"500MB"`` -> 500_000_000, ``"1GiB"`` -> 1073741824, ``"4096"`` -> 4096 (bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS or float(m.group(1)) * _UNITS[unit] < 1:
        raise ConfigError(f"size {text!r} is invalid; give a number of bytes with an optional unit, e.g. 500MB or 2GiB.")
    return int(float(m.group(1)) * _UNITS[unit])


def merge_command(
    recipe: Path = typer.Argument(..., help="a YAML merge recipe (base, method, parameters, inputs, filters, dtype, "
                                  "tokenizer_from)"),
    out: Path = typer.Option(..., "--out", help="output folder (a transformers model folder; written atomically)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if it exists"),
    shard_size: str = typer.Option("1GiB", "--shard-size", help="largest output shard, e.g. 500MB, 2GiB"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar; print nothing but errors"),
) -> None:
    """Merge fine-tuned models into their base (task arithmetic, TIES, DARE, PCB...) as a recipe says."""
    from .recipe import load_recipe, run_recipe

    size = parse_size(shard_size)
    r = load_recipe(recipe)
    path = run_recipe(r, out, overwrite=overwrite, shard_bytes=size, progress=not quiet)
    if not quiet:
        typer.echo(f"merged {len(r.inputs)} model(s) into {r.base} with {r.method}: {path}")
