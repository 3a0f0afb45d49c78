"""The method registry: ``@register("name", config=Cfg, ...)`` on a Delta class makes a method.

The registry knows only what it is given: the built-in methods register themselves when
``paretune.methods`` is imported (``import paretune`` does that), a plug-in's when its module is.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import TYPE_CHECKING, Any, Callable

from ..errors import ConfigError

if TYPE_CHECKING:
    from .config import AdapterConfig
    from .delta import Delta

ALL_KINDS = ("linear", "conv1d", "embedding", "conv2d")  # the weight-matrix kinds (a method's default)
KNOWN_KINDS = ALL_KINDS + ("norm", "block")  # plus normalisation layers and whole sub-layers


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """What the engine knows of one method."""

    name: str
    config_cls: type["AdapterConfig"]
    delta_cls: type["Delta"]
    summary: str  # one line: what the method is, with its paper
    formula: str  # trainable parameters of one adapted (d_out x d_in) layer, as text
    kinds: tuple[str, ...]  # host kinds it supports: linear, conv1d, embedding, conv2d, norm, block
    default_targets: Callable[..., Any] | None = None  # (model[, config]) -> its targets when adapt gets none
    # True, or a function of the config, when the saved tensors do not determine ΔW alone (it
    # depends on the base weights): loading onto other base weights is then refused
    base_dependent: bool | Callable[["AdapterConfig"], bool] = False

    def depends_on_base_weights(self, config: "AdapterConfig") -> bool:
        """Whether an adapter of this method with ``config`` changes meaning on other base weights
        of the same shapes (see :func:`register`'s ``base_dependent``)."""
        flag = self.base_dependent
        return bool(flag(config) if callable(flag) else flag)

    def targets_for(self, model: Any, targets: Any, config: "AdapterConfig | None" = None) -> Any:
        """``targets``, or the method's default targets for ``model`` (and ``config``, for a method
        whose options choose its sites, e.g. an adapter's placement) when it is None."""
        if targets is not None or self.default_targets is None:
            return targets
        import inspect

        takes_config = len(inspect.signature(self.default_targets).parameters) >= 2
        if not takes_config:
            return self.default_targets(model)
        return self.default_targets(model, config if config is not None else self.config_cls())


_METHODS: dict[str, MethodSpec] = {}


def register(
    name: str, *, config: type["AdapterConfig"], summary: str, formula: str, kinds: tuple[str, ...] = ALL_KINDS,
    default_targets: Callable[..., Any] | None = None,
    base_dependent: bool | Callable[["AdapterConfig"], bool] | None = None,
) -> Callable[[type["Delta"]], type["Delta"]]:
    """Class decorator registering a Delta class and its config dataclass under ``name``.

    ``default_targets(model)`` or ``default_targets(model, config)``: the targets
    ``paretune.adapt`` uses when given none (e.g. IA3's keys, values and feed-forward layers of the
    model's architecture, an adapter's placement); without it, "all-linear".

    ``base_dependent``: whether the adapter's saved tensors fail to determine its ΔW alone, so that
    on a base with other weights (same shapes) it would silently be another adapter; True, False,
    or a function of the config (for a method where only some options read the base). ``None``
    (the default) derives it from the class: True for a delta that changes the base when built
    (``shifts_base``: PiSSA's residual is recomputed from the base on load) or whose ΔW is a
    function of W (``depends_on_base``: Hydra's W_s·W₀, IA3's (l − 1)·W). ``paretune.load`` refuses
    such an adapter on base weights whose SHA-256 differs from the saved one, and only warns for the
    others.

    Refused with a clear error: a name taken by another class, an unknown host kind, and a class
    declared ``mergeable`` (the default) that does not implement ``delta_weight``."""
    from .delta import Delta

    def deco(cls: type["Delta"]) -> type["Delta"]:
        if name in _METHODS and _METHODS[name].delta_cls is not cls:
            raise ConfigError(f"method {name!r} is registered twice; pick another name or unregister the first.")
        unknown = [k for k in kinds if k not in KNOWN_KINDS]
        if unknown:
            raise ConfigError(f"method {name!r}: unknown host kinds {unknown}; choose from {', '.join(KNOWN_KINDS)}.")
        if cls.mergeable and cls.delta_weight is Delta.delta_weight:
            raise ConfigError(
                f"method {name!r}: {cls.__name__} is mergeable (the default) but does not implement delta_weight(); "
                "implement it, or set mergeable = False on the class for an input-dependent delta."
            )
        config.method = name
        cls.method = name
        dependent = (cls.shifts_base or cls.depends_on_base) if base_dependent is None else base_dependent
        _METHODS[name] = MethodSpec(name, config, cls, summary, formula, tuple(kinds), default_targets, dependent)
        return cls

    return deco


def unregister(name: str) -> None:
    """Remove method ``name`` from the registry (for plug-in tests that register a method for a while)."""
    get(name)
    del _METHODS[name.lower()]


def get(name: str) -> MethodSpec:
    """The spec of method ``name``; an unknown name is an error listing the known ones."""
    key = name.lower() if isinstance(name, str) else name
    if key not in _METHODS:
        close = difflib.get_close_matches(str(name), list(_METHODS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown method {name!r}.{hint} Known methods: {', '.join(sorted(_METHODS))}.")
    return _METHODS[key]


def all_methods() -> dict[str, MethodSpec]:
    """Every registered method, by name, sorted."""
    return dict(sorted(_METHODS.items()))
