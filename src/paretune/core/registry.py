"""The method registry: ``@register("name", config=Cfg)`` on a Delta class makes a method."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import TYPE_CHECKING, Callable

from ..errors import ConfigError

if TYPE_CHECKING:
    from .config import AdapterConfig
    from .delta import Delta


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """What the engine knows of one method."""

    name: str
    config_cls: type["AdapterConfig"]
    delta_cls: type["Delta"]
    summary: str  # one line: what the method is, with its paper
    formula: str  # trainable parameters of one adapted (d_out x d_in) layer, as text
    kinds: tuple[str, ...]  # host kinds it supports: linear, conv1d, embedding, conv2d
    budget_option: str | None = None  # the integer option that sets its size (default: r if it has one)
    budget_max: int | None = None  # largest value of that option worth trying (default: min(d_out, d_in))
    default_lr: float | None = None  # the bench's learning rate for it (default: the bench's adapter rate)


_METHODS: dict[str, MethodSpec] = {}


def register(
    name: str, *, config: type["AdapterConfig"], summary: str, formula: str,
    kinds: tuple[str, ...] = ("linear", "conv1d", "embedding", "conv2d"),
    budget_option: str | None = None, budget_max: int | None = None, default_lr: float | None = None,
) -> Callable[[type["Delta"]], type["Delta"]]:
    """Class decorator registering a Delta class and its config dataclass under ``name``."""

    def deco(cls: type["Delta"]) -> type["Delta"]:
        if name in _METHODS and _METHODS[name].delta_cls is not cls:
            raise ValueError(f"method {name!r} is registered twice")
        config.method = name
        cls.method = name
        _METHODS[name] = MethodSpec(name, config, cls, summary, formula, kinds, budget_option, budget_max,
                                    default_lr)
        return cls

    return deco


def _load_builtin_methods() -> None:
    # importing the package registers every built-in method; import_module (not ``from ..
    # import methods``) because ``paretune.methods`` is also the public function listing them
    importlib.import_module("paretune.methods")


def get(name: str) -> MethodSpec:
    """The spec of method ``name``; an unknown name is an error listing the known ones."""
    _load_builtin_methods()
    key = name.lower() if isinstance(name, str) else name
    if key not in _METHODS:
        close = difflib.get_close_matches(str(name), list(_METHODS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown method {name!r}.{hint} Known methods: {', '.join(sorted(_METHODS))}.")
    return _METHODS[key]


def all_methods() -> dict[str, MethodSpec]:
    """Every registered method, by name, sorted."""
    _load_builtin_methods()
    return dict(sorted(_METHODS.items()))
