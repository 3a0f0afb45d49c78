"""Exceptions raised by paretune. Every message names what was wrong and what would be right."""

from __future__ import annotations


class ParetuneError(ValueError):
    """Bad input to paretune: the message says what was wrong and how to fix it."""


class ConfigError(ParetuneError):
    """A method option is missing, unknown or out of range."""


class TargetError(ParetuneError):
    """Target modules could not be matched or are of an unsupported kind."""


class AdapterFileError(ParetuneError):
    """An adapter folder is missing, corrupt, or does not fit the model it is loaded into."""


class DivergedError(ParetuneError):
    """Training produced a non-finite loss, gradient or weight; nothing of the run was saved."""
