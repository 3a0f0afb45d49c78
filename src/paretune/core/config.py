"""Config base class: every method's options are a dataclass validated with clear errors."""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, ClassVar

from ..errors import ConfigError


def _is_number(v: Any) -> bool:
    """An int or float (not a bool) that is finite."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return isinstance(v, int) or math.isfinite(v)


@dataclasses.dataclass
class AdapterConfig:
    """Base of every method's options. Subclasses add fields and override :meth:`validate`.

    ``method`` is filled in by the registry; it is not a user option. ``INIT_ONLY`` names the
    options that only change how the adapter is initialised (not its shapes or its scaling):
    ``paretune.hot_swap`` accepts a saved adapter whose values differ in those.
    """

    method: ClassVar[str] = ""
    INIT_ONLY: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        self._all_finite()
        self.validate()

    def _all_finite(self) -> None:
        """Refuse an infinite or NaN number in any option, before the method's own checks: no
        method has an option where inf or NaN means something (they only turn every output into
        NaN), so this one check covers options a method's ``validate`` forgot."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                self._require(False, f.name, v, "it must be a finite number")

    def validate(self) -> None:
        """Raise :class:`ConfigError` for an option out of range. Subclasses extend this."""

    # -- helpers for subclasses -------------------------------------------------------------
    def _require(self, ok: bool, option: str, value: Any, need: str) -> None:
        if not ok:
            raise ConfigError(f"{self.method or type(self).__name__}: {option}={value!r} is invalid; {need}.")

    def _positive_int(self, option: str) -> None:
        v = getattr(self, option)
        self._require(isinstance(v, int) and not isinstance(v, bool) and v > 0, option, v, "it must be an integer >= 1")

    def _number(self, option: str) -> None:
        """Any finite number (int or float, not bool; inf and NaN refused)."""
        v = getattr(self, option)
        self._require(_is_number(v), option, v, "it must be a finite number")

    def _non_negative(self, option: str) -> None:
        """A finite number >= 0 (inf and NaN refused)."""
        v = getattr(self, option)
        self._require(_is_number(v) and v >= 0, option, v, "it must be a finite number >= 0")

    def _probability(self, option: str) -> None:
        """A dropout-like rate in [0, 1)."""
        v = getattr(self, option)
        self._require(_is_number(v) and 0 <= v < 1, option, v,
                      "it must be in [0, 1)")

    def _count_or_fraction(self) -> None:
        """``count`` (an integer >= 1) or ``fraction`` (in (0, 1]), at most one of them set."""
        self._require(self.count is None or self.fraction is None, "count", self.count,
                      f"set either count or fraction (got fraction={self.fraction!r} too), not both")
        if self.count is not None:
            self._positive_int("count")
        if self.fraction is not None:
            v = self.fraction
            self._require(_is_number(v) and 0 < v <= 1, "fraction", v,
                          "it must be in (0, 1]")

    def _seed(self, option: str = "seed") -> None:
        v = getattr(self, option)
        self._require(isinstance(v, int) and not isinstance(v, bool) and v >= 0, option, v,
                      "it must be an integer >= 0")

    def _flag(self, option: str) -> None:
        v = getattr(self, option)
        self._require(isinstance(v, bool), option, v, "it must be True or False")

    def _one_of(self, option: str, choices: tuple) -> None:
        v = getattr(self, option)
        self._require(v in choices, option, v, f"choose one of {', '.join(map(repr, choices))}")

    # -- JSON round trip -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def options(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def upgrade(cls, saved: dict[str, Any]) -> dict[str, Any]:
        """Options of a config read from a saved adapter, brought to this version's meaning
        (``paretune.load`` calls it before building the adapter). Default: unchanged. A method
        whose defaults or random draws changed overrides it, so that files saved before the
        change still load as they were trained."""
        return saved

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        """Build from user options, rejecting unknown ones with the closest valid name."""
        known = cls.options()
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(
                    f"{cls.method or cls.__name__}: unknown option {key!r}.{hint} "
                    f"Valid options: {', '.join(known) or '(none)'}."
                )
        return cls(**data)
