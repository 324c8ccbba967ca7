"""One process at a time: for searches started together on one runs directory, and files
that a killed process never leaves half written.

MLflow and Optuna create their tables on a new SQLite file with migrations (alembic). Two
searches that start together on a fresh runs directory raced there: one failed with "table
_alembic_tmp_experiments already exists" after its base training and sensitivity scan. Two new
studies of one space also raced to create the same MLflow experiment, and both trained the
same base model and ran the same scan, where one could wait and reuse the other's.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (made with its folder if missing); without
    POSIX locks (Windows), no lock."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def held_alone(lock_file: Path, busy: str) -> Iterator[None]:
    """Hold ``lock_file`` for the block, or raise :class:`AutopruneError` (``busy``, then the
    holder's pid and start) at once when another process holds it; without POSIX locks
    (Windows), no lock. The kernel frees it when its holder dies, however it dies."""
    from autoprune.errors import AutopruneError

    lock_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_file, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise AutopruneError(f"{busy} (held by {holder}; {lock_file})") from None
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
            f.flush()
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def sqlite_setup(url: str) -> Iterator[None]:
    """Hold an exclusive lock on ``<file>.lock`` next to a ``sqlite:///`` store (its folder is
    created); other URLs (a server, a database server) need none."""
    if not url.startswith("sqlite:///"):
        yield
        return
    db = Path(url.removeprefix("sqlite:///"))
    if db.is_file() and not os.access(db.parent, os.W_OK):
        # a store in a read-only folder (an archive of results, a read-only mount) is only
        # read, and sets nothing up: pareto and export failed making the lock file
        yield
        return
    with exclusive(db.with_name(db.name + ".lock")):
        yield


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write; it replaces ``path`` when the block ends
    without an error, so a process killed mid-write never leaves half a file (a truncated
    weights.pt had failed every --resume). The name carries the pid: two processes writing
    the same file do not share it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
