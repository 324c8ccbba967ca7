"""Other libraries' log chatter held back where autoprune says what matters itself."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def quieter(level: int, *names: str) -> Iterator[None]:
    """The loggers ``names``, and those below them (``torch`` holds ``torch.fx...``), show
    only ``level`` and above in the block; their own levels come back after."""
    loggers = [logging.getLogger(n) for n in {*names, *logging.root.manager.loggerDict}
               if any(n == name or n.startswith(f"{name}.") for name in names)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, was in zip(loggers, levels, strict=True):
            lg.setLevel(was)
