"""What every PEFT format shares: file names, key prefix, config field checks, target lookup."""

from __future__ import annotations

import math
import re
from typing import Any

from torch import nn

from ..errors import AdapterFileError

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # every per-module key; PEFT's shared tensors sit under "base_model."


class Fields:
    """Typed reads of one ``adapter_config.json`` (a dict), each failure an :class:`AdapterFileError`
    that names the file, the key, the value found and what is expected."""

    def __init__(self, cfg: dict[str, Any], where: Any):
        self.cfg, self.where = cfg, where

    def _bad(self, key: str, want: str) -> AdapterFileError:
        return AdapterFileError(
            f"{self.where}: {key}={self.cfg.get(key)!r} in adapter_config.json is invalid; it must be {want}. "
            "Fix the file or save the adapter again with PEFT.")

    def require(self, key: str) -> Any:
        if key not in self.cfg:
            raise AdapterFileError(
                f"{self.where}: adapter_config.json lacks {key!r}, which a PEFT {self.cfg.get('peft_type')} config "
                "always has; the file is incomplete. Save the adapter again with PEFT.")
        return self.cfg[key]

    def int(self, key: str, default: Any = None, *, required: bool = False, minimum: int = 1) -> Any:
        value = self.require(key) if required else self.cfg.get(key, default)
        if value is None and not required:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._bad(key, f"an integer >= {minimum}")
        return value

    def number(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        value = self.require(key) if required else self.cfg.get(key, default)
        if value is None and not required:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self._bad(key, "a finite number")
        return float(value)

    def probability(self, key: str) -> float:
        value = self.number(key, 0.0)
        value = 0.0 if value is None else value
        if not 0.0 <= value < 1.0:
            raise self._bad(key, "a number in [0, 1)")
        return value

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.cfg.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._bad(key, "true or false")
        return value

    def pattern(self, key: str, kind: str) -> dict[str, Any]:
        """``rank_pattern`` / ``alpha_pattern``: a dict of module-name pattern -> value."""
        value = self.cfg.get(key) or {}
        if not isinstance(value, dict):
            raise self._bad(key, "an object mapping module names to values")
        for k, v in value.items():
            ok = (isinstance(v, int) and v >= 1) if kind == "int" else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok:
                raise self._bad(key, f"an object mapping module names to {'integers >= 1' if kind == 'int' else 'numbers'}"
                                f" (found {k!r}: {v!r})")
        return value


def pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key that is the module name or
    a dotted suffix of it."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def module_exists(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def check_modules(model: nn.Module, modules: list[str], cfg: dict[str, Any], path: Any) -> None:
    missing = [m for m in modules if not module_exists(model, m)]
    if missing:
        raise AdapterFileError(
            f"{path} adapts modules this model does not have: {missing[:5]}; load it onto its base model "
            f"({cfg.get('base_model_name_or_path') or 'unknown'}).")


def split_keys(tensors: dict, suffixes: dict[str, str], path: Any, what: str) -> dict[str, dict]:
    """``{PREFIX + module + suffix: t}`` -> ``{module: {suffixes[suffix]: t}}``; any other key is an error."""
    out: dict[str, dict] = {}
    for key, t in tensors.items():
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if suffix is None or not key.startswith(PREFIX):
            raise AdapterFileError(f"{path}: unexpected tensor {key!r} in a PEFT {what} file.")
        out.setdefault(key[len(PREFIX):-len(suffix)], {})[suffixes[suffix]] = t
    if not out:
        raise AdapterFileError(f"{path}: the PEFT file holds no {what} tensors.")
    return out


def one_setting(settings: set, path: Any, what: str) -> tuple:
    if len(settings) > 1:
        raise AdapterFileError(
            f"{path} gives its modules different {what} {sorted(settings)}; a paretune adapter uses one setting "
            "for all its modules. Import it as several adapters, one per setting.")
    (setting,) = settings
    return setting
