"""What paretune remembers on a model: its adapters (method, config, targets) and the active set."""

from __future__ import annotations

import dataclasses

from torch import nn

from ..errors import ParetuneError
from .config import AdapterConfig

ATTR = "_paretune"


@dataclasses.dataclass
class AdapterRecord:
    name: str
    method: str
    config: AdapterConfig
    targets: list[str]  # module names, in model order
    merged: bool = False


@dataclasses.dataclass
class ModelState:
    adapters: dict[str, AdapterRecord] = dataclasses.field(default_factory=dict)
    active: list[str] = dataclasses.field(default_factory=list)


def state_of(model: nn.Module, create: bool = False) -> ModelState:
    st = model.__dict__.get(ATTR)
    if st is None:
        if not create:
            raise ParetuneError(
                f"this {type(model).__name__} has no paretune adapters; add one with paretune.adapt(model, 'lora') "
                "or paretune.load(model, path)."
            )
        st = ModelState()
        model.__dict__[ATTR] = st
    return st


def has_state(model: nn.Module) -> bool:
    return model.__dict__.get(ATTR) is not None


def record_of(model: nn.Module, name: str) -> AdapterRecord:
    st = state_of(model)
    if name not in st.adapters:
        raise ParetuneError(
            f"no adapter named {name!r} on this model; it has: {', '.join(map(repr, st.adapters)) or 'none'}."
        )
    return st.adapters[name]


def drop_state(model: nn.Module) -> None:
    model.__dict__.pop(ATTR, None)
