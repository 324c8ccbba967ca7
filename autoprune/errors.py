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


def first_line(error: BaseException, limit: int = 300) -> str:
    """An error's first line, at most ``limit`` characters: what a one-line message quotes."""
    return (str(error).strip().splitlines() or [""])[0][:limit]


def environment_error(error: BaseException) -> str | None:
    """What went wrong around autoprune rather than in it, read from ``error``'s chain (a
    full disk, a store locked or deleted under a running search), in words that name the
    file; None for anything else. A full disk ended a search in 100-300 lines of chained
    traceback whose Optuna layer blamed "invalid data in the commit"."""
    import errno
    import sqlite3

    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        at = f" writing {e.filename}" if isinstance(e, OSError) and e.filename else ""
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"no space left on device{at}"
        if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return f"{e.strerror or e}{at}"
        if isinstance(e, sqlite3.OperationalError):
            text = str(e)
            if "disk is full" in text:
                return "no space left on device (a SQLite store could not grow)"
            if "locked" in text:
                return ("a SQLite store stayed locked by another process past the wait "
                        f"({text})")
            if "readonly" in text or "unable to open" in text or "no such table" in text:
                return (f"a SQLite store cannot be written ({text}): was it deleted, moved "
                        "or made read-only while autoprune ran?")
        if isinstance(e, RuntimeError) and "unexpected pos" in str(e):  # torch's zip writer
            return "torch could not finish writing a file (is the disk full?)"
        todo += [e.__cause__, e.__context__, getattr(e, "orig", None)]  # sqlalchemy's cause
    return None


#: How an allocation that failed reads from torch's CPU kernels (oneDNN), CUDA and the allocator.
_OOM_WORDS = ("could not create a primitive", "out of memory", "can't allocate memory",
              "not enough memory", "failed to allocate")


def out_of_memory(error: BaseException) -> bool:
    """Whether a trial's error is memory running out: under a memory cap, trials failed as
    'RuntimeError: could not create a primitive' or 'ONNX export failed', which read as
    faults of the model or the pruning."""
    text = str(error).lower()
    return isinstance(error, MemoryError) or any(w in text for w in _OOM_WORDS)
