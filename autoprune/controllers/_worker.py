"""Trial worker processes for the local controller: each builds the context once, then runs
trials with its own torch thread budget."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import torch

from autoprune.base import BaseMetrics
from autoprune.config import parse_space
from autoprune.dedup import reuser
from autoprune.fidelity import promoter
from autoprune.inherit import inheritor
from autoprune.trial import TrialContext, TrialResult, run_trial

_CTX: TrialContext | None = None
_INIT_ERROR: tuple[str, int] | None = None  # why this worker could not build its context
_BUSY = False  # running a trial (Ctrl-C then ends it as the controller expects)


def _on_ctrl_c(signum: int, frame: Any) -> None:
    """Ctrl-C reaches the whole process group. A worker waiting for a trial leaves quietly
    (its KeyboardInterrupt printed a traceback from the pool's queue, which read as a crash);
    one running a trial stops it with KeyboardInterrupt, as before."""
    if _BUSY:
        raise KeyboardInterrupt
    raise SystemExit(130)  # not os._exit: the pool's queue lock, held while waiting, is freed


def die_with_parent() -> None:
    """Have the kernel end this process when the search's process dies (Linux): after a
    ``kill -9`` or an out-of-memory kill of the search, its workers and manager lived on,
    idle, holding their memory, until killed by hand."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    import multiprocessing

    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the call
        os._exit(1)




def init_worker(space: dict[str, Any], base: dict[str, Any], threads: int) -> None:
    global _CTX, _INIT_ERROR
    die_with_parent()
    signal.signal(signal.SIGINT, _on_ctrl_c)
    torch.set_num_threads(threads)
    # A spawned process starts its own children by spawning too, which pickles them: a
    # DataLoader with workers and a lambda collate_fn (fine with --jobs 1, whose loaders start
    # theirs the platform's way) failed in every trial worker. Start them as --jobs 1 does.
    import multiprocessing

    multiprocessing.set_start_method(None, force=True)
    try:
        _CTX = TrialContext.build(parse_space(space), BaseMetrics.from_dict(base))
    except Exception as e:  # noqa: BLE001 - its trials fail with why, and the search goes on
        # Raised here, it broke the pool: the pool only says so (a raw traceback per worker
        # on stderr), and the trials in flight were queued again as if a worker had died.
        from autoprune.errors import first_line

        _INIT_ERROR = (f"a worker process could not start: {type(e).__name__}: "
                       f"{first_line(e)}", int(space.get("search", {}).get("seed", 0)))


def work(ratios: dict[str, float], keep_model: bool, book: Any = None,
         key: str = "", seen: Any = None, role: str | None = None,
         models: Any = None, pids: Any = None) -> TrialResult:
    global _BUSY
    if _CTX is None and _INIT_ERROR is not None:
        error, seed = _INIT_ERROR
        return TrialResult(ratios=dict(ratios), state="failed", seed=seed, error=error)
    assert _CTX is not None, "init_worker() did not run"  # a bug, not user input
    if pids is not None:  # which process runs which trial: the one whose worker dies fails
        pids[key] = os.getpid()
    promote = promoter(book, key, role, _CTX.space.search.inherit) if book is not None else None
    _BUSY = True
    try:
        return run_trial(_CTX, ratios, keep_model=keep_model, promote=promote,
                         reuse=reuser(seen) if seen is not None else None,
                         inherit=inheritor(models) if models is not None else None)
    finally:
        _BUSY = False
