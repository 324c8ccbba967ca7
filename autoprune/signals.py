"""Signal handlers for the length of a block (a search's Ctrl-C, an export's SIGTERM, the UI
server's stop), restored after it. Python installs handlers from the main thread only:
elsewhere nothing is installed and the block runs as it would."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

#: Signals that stop a search as Ctrl-C does: a scheduler's or ``timeout``'s SIGTERM (Slurm,
#: ``docker stop``, Kubernetes) and a closed terminal's SIGHUP. Before, they killed it at once:
#: its MLflow parent run stayed RUNNING and its tables were not remade.
STOP_SIGNALS: tuple[int, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))

#: The stop signals a search was ended by (the CLI exits 128 + the last, as a shell reports it).
STOPPED_BY: list[int] = []


@contextlib.contextmanager
def handling(signals: Iterable[int], handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Run the block with ``handler`` for ``signals``; the handlers before come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, previous in before.items():
            signal.signal(sig, previous)


def stop_as_interrupt() -> contextlib.AbstractContextManager[None]:
    """SIGTERM and SIGHUP (:data:`STOP_SIGNALS`) raise KeyboardInterrupt in the block, as
    Ctrl-C does, and are remembered in :data:`STOPPED_BY`."""
    def stop(signum: int, _frame: Any) -> None:
        STOPPED_BY.append(signum)
        raise KeyboardInterrupt

    return handling(STOP_SIGNALS, stop)
