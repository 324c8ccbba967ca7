"""Errors autoprune raises for bad input, each naming what was wrong and what is allowed."""

from __future__ import annotations


class AutopruneError(Exception):
    """Base class: an error a user can act on (bad input, not a bug)."""


class ConfigError(AutopruneError, ValueError):
    """A search-space or export config value is invalid.

    Args:
        path: dotted key path of the offending field, e.g. ``groups.default.high``.
        value: the value that was given.
        allowed: what would have been accepted.
    """

    def __init__(self, path: str, value: object, allowed: str) -> None:
        self.path, self.value, self.allowed = path, value, allowed
        super().__init__(f"{path}: got {value!r}; allowed: {allowed}")


class SourceError(AutopruneError):
    """A model or data source could not be built or imported."""


class CheckpointError(AutopruneError):
    """A checkpoint or weights file does not fit the architecture."""


class PruningError(AutopruneError):
    """Pruning could not be applied; the input model is left untouched."""
