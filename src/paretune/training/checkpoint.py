"""Checkpoints for resuming a run: trainable tensors, optimizer, step, RNG and loss history, and
the shapes of adapters that grow during training. Only trainable tensors are written (not the
frozen base), atomically."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.atomic import atomic_dir
from ..core.inject import hosts

FILE = "state.pt"


def _growing(model: nn.Module):
    """(key, delta) of every adapter on the model whose shapes change during training."""
    for host_name, host in hosts(model):
        for adapter, delta in host.deltas.items():
            if delta.growth_state() is not None:
                yield f"{host_name}:{adapter}", delta


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer, step: int, history: list[float],
                    aux_history: list[float] | None = None) -> None:
    """Write the tensors the optimizer trains (also those a schedule has frozen since, such as
    LaMDA's B), the optimizer with the names of each group's tensors (groups added by rank growth
    are rebuilt on resume), step, histories, RNG states and every growing adapter's shapes."""
    names = {id(p): n for n, p in model.named_parameters()}
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    state = {
        "step": step,
        "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if id(p) in trained},
        "optimizer": optimizer.state_dict(),
        "groups": [{"names": [names[id(p)] for p in g["params"]], "peak_lr": g.get("peak_lr", g["lr"])}
                   for g in optimizer.param_groups],
        "growth": {key: delta.growth_state() for key, delta in _growing(model)},
        "history": list(history),
        "aux_history": list(aux_history or []),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    with atomic_dir(path) as tmp:
        torch.save(state, tmp / FILE)


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer) -> dict[str, Any]:
    """Restore a checkpoint in place; returns it (step, history). Growing adapters are first given
    the checkpoint's shapes, and parameter groups added by growth are added again in order."""
    state = torch.load(Path(path) / FILE, map_location="cpu", weights_only=True)  # never unpickles
    growing = dict(_growing(model))
    for key, grown in state.get("growth", {}).items():
        if key in growing:
            growing[key].grow_to(grown)
    params = dict(model.named_parameters())
    for group in state.get("groups", [])[len(optimizer.param_groups):]:
        optimizer.add_param_group({"params": [params[n] for n in group["names"]], "lr": group["peak_lr"],
                                   "peak_lr": group["peak_lr"]})
    with torch.no_grad():
        for n, t in state["trainable"].items():
            params[n].copy_(t)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


def has_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / FILE).is_file()
