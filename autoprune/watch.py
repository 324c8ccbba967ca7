"""A line for a trial that has run long: a trial whose data loader hung showed nothing, for
good, and a 30-minute trial looked the same until it ended."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType

#: A running trial is named after this long, and again each time as long passes.
STILL_RUNNING_S = 600.0


def duration(seconds: float) -> str:
    """A duration as a person reads it: 45 s, 2 min 30 s, 2 h 5 min."""
    if seconds < 90:
        return f"{seconds:g} s"
    hours, rest = divmod(round(seconds), 3600)
    parts = zip((hours, *divmod(rest, 60)), ("h", "min", "s"), strict=True)
    return " ".join(f"{n} {unit}" for n, unit in parts if n)


class TrialWatch:
    """Says ``autoprune: trial N still running after 20 min`` for each trial started and not
    finished for ``after_s``, every ``after_s``, from a thread of its own (the controller's
    thread may be the one running the trial)."""

    def __init__(self, say: Callable[[str], None], after_s: float | None = None) -> None:
        self.say = say
        self.after_s = STILL_RUNNING_S if after_s is None else after_s
        self.every_s = min(15.0, self.after_s / 4)
        self._running: dict[str, list[float]] = {}  # name -> [started, last said]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def started(self, name: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._running[name] = [now, now]

    def finished(self, name: str) -> None:
        with self._lock:
            self._running.pop(name, None)

    def check(self) -> None:
        now, due = time.monotonic(), []
        with self._lock:
            for name, times in self._running.items():
                if now - times[1] >= self.after_s:
                    times[1] = now
                    due.append((name, now - times[0]))
        for name, ran in due:
            self.say(f"autoprune: {name} still running after {duration(round(ran))} (Ctrl-C "
                     "stops the search; --resume runs it again)")

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.check()

    def __enter__(self) -> TrialWatch:
        self._thread = threading.Thread(target=self._loop, name="autoprune-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
