"""Checkpoints for resuming a run: trainable tensors, optimizer, step, RNG and loss history.
Only trainable tensors are written (not the frozen base), atomically."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.atomic import atomic_dir

FILE = "state.pt"


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer, step: int, history: list[float]) -> None:
    """Write the tensors the optimizer trains (also those a schedule has frozen since, such as
    LaMDA's B), the optimizer, step, history and RNG states."""
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    state = {
        "step": step,
        "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if id(p) in trained},
        "optimizer": optimizer.state_dict(),
        "history": list(history),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    with atomic_dir(path) as tmp:
        torch.save(state, tmp / FILE)


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer) -> dict[str, Any]:
    """Restore a checkpoint in place; returns it (step, history)."""
    state = torch.load(Path(path) / FILE, map_location="cpu", weights_only=True)  # never unpickles
    params = dict(model.named_parameters())
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
