"""What paretune remembers on a model: its adapters (method, config, targets), which are active
and which are merged. This is the one place that state lives; hosts read it from here."""

from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn

from ..errors import ParetuneError
from .config import AdapterConfig

ATTR = "_paretune"

# Callbacks run when a model gets its first adapter state (``on_attach``) and when the state is
# dropped (``on_detach``: unload, or removing the last adapter). A layer above the core registers
# them (the transformers integration, :mod:`paretune.hf`, installs its save_pretrained there), so
# the core itself knows nothing of that layer.
on_attach: list[Callable[[nn.Module], None]] = []
on_detach: list[Callable[[nn.Module], None]] = []


@dataclasses.dataclass
class AdapterRecord:
    """One adapter as added: its method, options and adapted module names (in model order)."""

    name: str
    method: str
    config: AdapterConfig
    targets: list[str]
    bits: int | None = None  # k-bit adapter: its weight tensors train quantised and are stored packed


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """A snapshot of one adapter for users (:func:`paretune.adapters`)."""

    name: str
    method: str
    config: AdapterConfig
    targets: list[str]
    active: bool
    merged: bool


@dataclasses.dataclass
class ModelState:
    """The adapters of one model, the active ones (in order) and the merged ones (in merge order).
    ``version`` changes with every change of the active or merged set, so hosts can cache their
    routing on it."""

    adapters: dict[str, AdapterRecord] = dataclasses.field(default_factory=dict)
    active: tuple[str, ...] = ()
    merged: tuple[str, ...] = ()
    version: int = 0
    weights: dict[str, float] = dataclasses.field(default_factory=dict)  # active adapters' weights other than 1
    # SHA-256 of a module's base weights taken just before an adapter that changes them when built
    # (PiSSA's residual) was added, so that a saved fingerprint names the original weights exactly
    base_sha256: dict[str, str] = dataclasses.field(default_factory=dict)

    def set_active(self, names: list[str] | tuple[str, ...], weights: dict[str, float] | None = None) -> None:
        """``weights``: the new weights (missing names: 1); None keeps the current ones of the
        adapters that stay active."""
        self.active = tuple(names)
        source = self.weights if weights is None else weights
        self.weights = {n: float(w) for n, w in source.items() if n in self.active and float(w) != 1.0}
        self.version += 1

    def weight(self, name: str) -> float:
        """The active adapter's weight: its change of every output is scaled by it (1 by default)."""
        return self.weights.get(name, 1.0)

    def set_merged(self, name: str, merged: bool) -> None:
        self.merged = tuple(n for n in self.merged if n != name) + ((name,) if merged else ())
        self.version += 1

    def is_merged(self, name: str) -> bool:
        return name in self.merged

    def info(self, name: str) -> AdapterInfo:
        r = self.adapters[name]
        return AdapterInfo(r.name, r.method, r.config, list(r.targets), name in self.active, name in self.merged)


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
        for callback in on_attach:
            callback(model)
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
    if model.__dict__.pop(ATTR, None) is not None:
        for callback in on_detach:
            callback(model)
