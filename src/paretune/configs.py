"""Adapter configurations as objects: build one, keep it as JSON, pass it to :func:`paretune.adapt`.

    config = paretune.LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"])
    paretune.adapt(model, config)
    text = config.to_json()                         # '{"method": "lora", "r": 8, ...}'
    same = paretune.MethodConfig.from_json(text)

One class, :class:`MethodConfig`, covers every registered method: ``MethodConfig("vera", r=256)``.
The named classes (``LoraConfig``, ``PissaConfig``, ...) are the same thing with the method
fixed. Options are validated when the object is built, by the method's own option dataclass
(what ``paretune methods --options`` lists), so a typo or an out-of-range value fails here, not
later in ``adapt``.

``to_dict()`` holds ``method``, every option with its value (defaults filled in, so a file
records exactly what was used even if a later version changes a default), and ``targets`` /
``bits`` when they were given. It is plain JSON (lists, numbers, strings, null).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from .errors import ConfigError

__all__ = ["MethodConfig", "LoraConfig", "PissaConfig", "VeraConfig", "AdaLoraConfig", "IA3Config",
           "BitFitConfig", "PromptTuningConfig", "PrefixTuningConfig", "config_class"]

# Keys of to_dict() that are not method options.
_RESERVED = ("method", "targets", "bits")


class MethodConfig:
    """A method name, its options and (optionally) targets and bits: what ``paretune.adapt`` takes.

    ``targets``: as for :func:`paretune.adapt` (None: the method's default; ``"all-linear"``; a
    regex; or a list of module names or suffixes). ``bits``: a k-bit adapter (see ``adapt``).
    """

    #: the method of a named subclass (``LoraConfig.METHOD == "lora"``); None on MethodConfig
    METHOD: ClassVar[str | None] = None

    def __init__(self, method: str | None = None, *, targets: Any = None, bits: int | None = None,
                 **options: Any) -> None:
        from .core import registry

        if self.METHOD is not None:
            if method is not None and method != self.METHOD:
                raise ConfigError(f"{type(self).__name__} is for method {self.METHOD!r}, not {method!r}; "
                                  f"use paretune.MethodConfig({method!r}, ...) for that one.")
            method = self.METHOD
        if not isinstance(method, str) or not method:
            raise ConfigError("MethodConfig needs a method name, e.g. MethodConfig('lora', r=8); "
                              "`paretune methods` lists them.")
        spec = registry.get(method)  # unknown method: an error naming the closest one
        self.method: str = spec.name
        if isinstance(targets, tuple):
            targets = list(targets)
        self.targets = targets
        self.bits = bits
        self._config = spec.config_cls.from_dict(dict(options))  # validates

    @property
    def options(self) -> dict[str, Any]:
        """Every option of the method with its value (defaults included)."""
        return _jsonable(self._config.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """``{"method": ..., <every option>: ..., "targets": ..., "bits": ...}`` (the last two only
        when given); JSON-serialisable."""
        out: dict[str, Any] = {"method": self.method, **self.options}
        if self.targets is not None:
            out["targets"] = _jsonable(self.targets)
        if self.bits is not None:
            out["bits"] = self.bits
        return out

    def to_json(self, indent: int | None = None) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodConfig":
        """Rebuild from :meth:`to_dict`'s output (a named subclass also accepts a dict without
        ``method``). Returns the named class for the method when there is one."""
        if not isinstance(data, dict):
            raise ConfigError(f"a method config must be a dict (from to_dict()), not {type(data).__name__}.")
        data = dict(data)
        method = data.pop("method", cls.METHOD)
        if method is None:
            raise ConfigError("the config has no 'method' key; add one, e.g. {'method': 'lora', 'r': 8}.")
        if cls is MethodConfig:
            named = config_class(method) if isinstance(method, str) else MethodConfig
            return named(**data) if named is not MethodConfig else MethodConfig(method, **data)
        return cls(method, **data)

    @classmethod
    def from_json(cls, text: str) -> "MethodConfig":
        """Rebuild from :meth:`to_json`'s output."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"the method config is not valid JSON ({e}).") from None
        return cls.from_dict(data)

    def adapt_arguments(self) -> tuple[str, dict[str, Any]]:
        """(method, keyword arguments for :func:`paretune.adapt`): options plus targets/bits if set."""
        kwargs = dict(self._config.to_dict())
        if self.targets is not None:
            kwargs["targets"] = self.targets
        if self.bits is not None:
            kwargs["bits"] = self.bits
        return self.method, kwargs

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MethodConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        items = {k: v for k, v in self.to_dict().items() if k != "method"}
        args = ", ".join(f"{k}={v!r}" for k, v in items.items())
        name = type(self).__name__
        return f"{name}({self.method!r}, {args})" if self.METHOD is None else f"{name}({args})"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _named(class_name: str, method: str, doc: str) -> type[MethodConfig]:
    return type(class_name, (MethodConfig,), {"METHOD": method, "__doc__": doc, "__module__": __name__})


LoraConfig = _named("LoraConfig", "lora", "LoRA options: ``LoraConfig(r=8, alpha=16, dropout=0.0, targets=[...])``.")
PissaConfig = _named("PissaConfig", "pissa", "PiSSA options: ``PissaConfig(r=16, alpha=16, svd='auto')``.")
VeraConfig = _named("VeraConfig", "vera", "VeRA options: ``VeraConfig(r=256)``.")
AdaLoraConfig = _named("AdaLoraConfig", "adalora", "AdaLoRA options: ``AdaLoraConfig(init_r=12, target_r=8)``.")
IA3Config = _named("IA3Config", "ia3", "(IA)³ options: ``IA3Config(targets=[...])``.")
BitFitConfig = _named("BitFitConfig", "bitfit", "BitFit options: ``BitFitConfig()``.")
PromptTuningConfig = _named("PromptTuningConfig", "prompt-tuning",
                            "Prompt tuning options: ``PromptTuningConfig(num_virtual_tokens=20)``.")
PrefixTuningConfig = _named("PrefixTuningConfig", "prefix-tuning",
                            "Prefix tuning options: ``PrefixTuningConfig(num_virtual_tokens=20)``.")

_NAMED: dict[str, type[MethodConfig]] = {c.METHOD: c for c in (  # type: ignore[misc]
    LoraConfig, PissaConfig, VeraConfig, AdaLoraConfig, IA3Config, BitFitConfig, PromptTuningConfig,
    PrefixTuningConfig)}


def config_class(method: str) -> type[MethodConfig]:
    """The named config class of ``method`` (``LoraConfig`` for ``"lora"``), else MethodConfig."""
    return _NAMED.get(method, MethodConfig)
