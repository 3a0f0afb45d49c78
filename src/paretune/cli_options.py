"""Options written the same way in every command.

``--targets`` takes module names or suffixes either repeated (``--targets q_proj --targets v_proj``)
or comma-separated (``--targets q_proj,v_proj``), or both; ``re:PATTERN`` (one regular expression
over whole module names) must then be the only value, since a regular expression may itself hold
commas.
"""

from __future__ import annotations

from typing import Iterable

from .errors import ConfigError


def parse_targets(values: Iterable[str] | str | None) -> list[str] | str | None:
    """``None`` / empty -> None (the method's defaults); ``["re:..."]`` -> the pattern (a str);
    ``all-linear`` -> itself; otherwise the names, split at commas, blanks dropped, order kept, duplicates removed."""
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    values = [v for v in values if v is not None]
    regex = [v for v in values if v.strip().startswith("re:")]
    if regex:
        if len(values) > 1:
            raise ConfigError("--targets re:PATTERN must be the only --targets value (one regular expression over "
                              "whole module names).")
        return regex[0].strip()[3:]
    names: list[str] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if part and part not in names:
                names.append(part)
    if names == ["all-linear"]:
        return "all-linear"
    return names or None
