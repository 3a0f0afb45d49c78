"""Checkpoints for resuming a run: trainable tensors, optimizer, step, RNG and loss history, and
the shapes of adapters that grow during training. Only trainable tensors are written (not the
frozen base), atomically.

Format (a folder, written with :func:`paretune.core.atomic.atomic_dir`): nothing in it is ever
unpickled.

* ``state.safetensors``: ``param/<name>`` for each tensor the optimizer trains,
  ``growth/<host>:<adapter>/<field>`` for a growing adapter's tensors,
  ``optim/<i>/<key>`` for each tensor of the optimizer's per-parameter state (``i`` the
  parameter's index in the optimizer's order), ``rng/torch`` and ``rng/cuda/<device>`` (the
  torch RNG states, uint8 tensors).
* ``state.json``: format version, step, loss histories, each parameter group's tensor names
  and hyper-parameters (betas, eps, weight decay, ...), non-tensor optimizer state, the shapes of
  growing adapters, Python's ``random`` state (as lists) and the run's fingerprint: the options
  that must not change between the interrupted run and its resumption (method, options, targets,
  learning rate, batch size, seed, data, ...). A resume with other options is refused with the
  names of those that differ; the number of steps may grow (not shrink below the checkpoint's
  step).

A folder holding ``state.pt`` (the format of older paretune versions, a pickle that could run
code when loaded) is refused without being opened.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.atomic import atomic_dir, recover
from ..errors import DivergedError, ParetuneError

TENSORS = "state.safetensors"
META = "state.json"
OLD_FILE = "state.pt"  # older versions' pickle: refused, never opened
FORMAT = 2


def _growing(model: nn.Module):
    """(key, delta) of every adapter on the model whose shapes change during training."""
    from ..core.inject import hosts

    for host_name, host in hosts(model):
        for adapter, delta in host.deltas.items():
            if delta.growth_state() is not None:
                yield f"{host_name}:{adapter}", delta


def _jsonable(value: Any) -> Any:
    """A JSON form of an option value (tuples as lists; anything else JSON cannot hold as its repr)."""
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return repr(value)


def fingerprint(**options: Any) -> dict[str, Any]:
    """The run options a checkpoint records, in JSON form (compared on resume)."""
    return {k: _jsonable(v) for k, v in options.items()}


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer, step: int, history: list[float],
                    aux_history: list[float] | None = None, *, run: dict[str, Any] | None = None,
                    eval_history: list[dict[str, Any]] | None = None) -> None:
    """Write the tensors the optimizer trains (also those a schedule has frozen since, such as
    LaMDA's B), the optimizer with the names of each group's tensors (groups added by rank growth
    are rebuilt on resume), step, histories, RNG states, every growing adapter's shapes and the
    run's fingerprint ``run`` (see :func:`fingerprint`) and the held-out ``eval_history``. A non-finite trained tensor raises
    :class:`DivergedError` and nothing is written."""
    from safetensors.torch import save_file

    names = {id(p): n for n, p in model.named_parameters()}
    order = [p for group in optimizer.param_groups for p in group["params"]]
    tensors: dict[str, torch.Tensor] = {}
    for p in order:
        t = p.detach()
        if not bool(torch.isfinite(t).all()):
            raise DivergedError(f"step {step}: {names[id(p)]} holds non-finite values (inf or NaN); the run "
                                "diverged and no checkpoint was written. Train again with a lower --lr.")
        tensors[f"param/{names[id(p)]}"] = t.cpu().contiguous()
    sd = optimizer.state_dict()
    extra_state: dict[str, dict[str, Any]] = {}
    for i, st in sd["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{i}/{key}"] = v.detach().cpu().contiguous()
            else:
                extra_state.setdefault(str(i), {})[key] = _jsonable(v)
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for d, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{d}"] = s
    groups = []
    for g_state, g in zip(sd["param_groups"], optimizer.param_groups):
        hyper = {k: _jsonable(v) for k, v in g_state.items() if k != "params"}
        groups.append({"names": [names[id(p)] for p in g["params"]], "indices": list(g_state["params"]),
                       "peak_lr": g.get("peak_lr", g["lr"]), "hyper": hyper})
    growth: dict[str, dict[str, Any]] = {}
    for key, delta in _growing(model):
        growth[key] = {}
        for field, v in delta.growth_state().items():
            if isinstance(v, torch.Tensor):
                tensors[f"growth/{key}/{field}"] = v.detach().cpu().contiguous()
                growth[key][field] = {"tensor": f"growth/{key}/{field}"}
            else:
                growth[key][field] = v
    py_version, py_state, py_gauss = random.getstate()
    meta = {
        "format": FORMAT,
        "step": int(step),
        "history": [float(h) for h in history],
        "aux_history": [float(h) for h in (aux_history or [])],
        "eval_history": list(eval_history or []),
        "groups": groups,
        "optimizer_extra": extra_state,
        "growth": growth,
        "python_random": [py_version, list(py_state), py_gauss],
        "run": run or {},
    }
    text = json.dumps(meta, indent=1)  # a growing adapter's float statistics may be inf: Python's JSON keeps it
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        (tmp / META).write_text(text, encoding="utf-8")


def has_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a checkpoint (of this format or an older one, which loading refuses)."""
    path = Path(path)
    recover(path)
    return (path / META).is_file() or (path / TENSORS).is_file() or (path / OLD_FILE).is_file()


def _corrupt(path: Path, why: str) -> ParetuneError:
    return ParetuneError(f"the checkpoint in {path} is corrupt or incomplete ({why}); delete {path} and start "
                         "again (without --resume).")


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a checkpoint folder, with clear errors for an older format, a
    missing, truncated or corrupt file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    recover(path)
    if not (path / META).is_file() and (path / OLD_FILE).exists():
        raise ParetuneError(f"this checkpoint was written by an older paretune in a format that can run code "
                            f"({path / OLD_FILE}, a pickle), so it is not opened; delete {path} and start again.")
    for f in (META, TENSORS):
        if not (path / f).is_file():
            raise _corrupt(path, f"{f} is missing")
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _corrupt(path, f"{META} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _corrupt(path, f"{META} is not a format-{FORMAT} paretune checkpoint")
    try:
        tensors = load_file(str(path / TENSORS))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _corrupt(path, f"{TENSORS} cannot be read: {e}") from None
    need = ("step", "history", "groups", "python_random", "run")
    missing = [k for k in need if k not in meta]
    if missing:
        raise _corrupt(path, f"{META} lacks {', '.join(missing)}")
    return meta, tensors


def check_run(path: str | os.PathLike, saved: dict[str, Any], now: dict[str, Any], steps: int, step: int) -> None:
    """Refuse to resume a checkpoint written with other run options, or with ``steps`` below the
    checkpoint's ``step``; the message names every option that differs."""
    diff = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diff:
        shown = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in diff)
        raise ParetuneError(f"the checkpoint in {path} was written by a run with other options ({shown}); resume "
                            f"with the checkpoint's options, or delete {path} to start again.")
    if steps < step:
        raise ParetuneError(f"the checkpoint in {path} is at step {step}, beyond --steps {steps}; give --steps "
                            f">= {step} to resume it, or delete {path} to start again.")


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer, *, run: dict[str, Any] | None = None,
                    steps: int | None = None) -> dict[str, Any]:
    """Restore a checkpoint in place; returns its metadata (step, history, aux_history). With
    ``run`` (a :func:`fingerprint`), a checkpoint of a run with other options is refused; with
    ``steps``, one beyond ``steps`` is. Growing adapters are first given the checkpoint's
    shapes, and parameter groups added by growth are added again in order. Every check runs
    before the model or optimizer is touched, except the growth that must precede the shape
    check."""
    path = Path(path)
    meta, tensors = read_checkpoint(path)
    if run is not None:
        check_run(path, meta["run"], run, steps if steps is not None else meta["step"], meta["step"])
    growing = dict(_growing(model))
    for key, grown in meta.get("growth", {}).items():
        if key in growing:
            growing[key].grow_to({f: tensors[v["tensor"]] if isinstance(v, dict) and set(v) == {"tensor"} else v
                                  for f, v in grown.items()})
    params = dict(model.named_parameters())
    saved_names = {k[len("param/"):] for k in tensors if k.startswith("param/")}
    group_names = [n for g in meta["groups"] for n in g["names"]]
    unknown = sorted(n for n in group_names if n not in params)
    if unknown or set(group_names) != saved_names:
        raise ParetuneError(f"the checkpoint in {path} trains other tensors than this model has ("
                            f"{', '.join(unknown[:5]) or 'a different set'}); it belongs to another model or "
                            f"adapter. Delete {path} to start again.")
    for n in saved_names:
        if tuple(params[n].shape) != tuple(tensors[f"param/{n}"].shape):
            raise ParetuneError(f"the checkpoint in {path} holds {n} of shape {tuple(tensors[f'param/{n}'].shape)}"
                                f" but the model's is {tuple(params[n].shape)}; it belongs to another model or "
                                f"adapter options. Delete {path} to start again.")
    for group in meta["groups"][len(optimizer.param_groups):]:
        optimizer.add_param_group({"params": [params[n] for n in group["names"]], "lr": group["peak_lr"],
                                   "peak_lr": group["peak_lr"]})
    if len(optimizer.param_groups) != len(meta["groups"]):
        raise _corrupt(path, "its parameter groups do not match this run's optimizer")
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        if key.startswith("optim/"):
            _, i, name = key.split("/", 2)
            state.setdefault(int(i), {})[name] = t
    for i, extra in meta.get("optimizer_extra", {}).items():
        state.setdefault(int(i), {}).update(extra)
    groups = []
    for g in meta["groups"]:
        hyper = dict(g["hyper"])
        if isinstance(hyper.get("betas"), list):
            hyper["betas"] = tuple(hyper["betas"])
        groups.append({**hyper, "params": list(g["indices"])})
    with torch.no_grad():
        for n in saved_names:
            params[n].copy_(tensors[f"param/{n}"])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as e:
        raise _corrupt(path, f"its optimizer state does not fit: {e}") from None
    torch.set_rng_state(tensors["rng/torch"])
    version, py_state, gauss = meta["python_random"]
    random.setstate((version, tuple(py_state), gauss))
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng/cuda/")),
                                       key=lambda k: int(k.rsplit("/", 1)[1]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    meta.setdefault("aux_history", [])
    return meta
