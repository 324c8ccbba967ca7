"""Trial worker processes for the local controller: each builds the context once, then runs
trials with its own torch thread budget."""

from __future__ import annotations

from typing import Any

import torch

from autoprune.base import BaseMetrics
from autoprune.config import parse_space
from autoprune.dedup import reuser
from autoprune.fidelity import promoter
from autoprune.inherit import inheritor
from autoprune.trial import TrialContext, TrialResult, run_trial

_CTX: TrialContext | None = None


def init_worker(space: dict[str, Any], base: dict[str, Any], threads: int) -> None:
    global _CTX
    torch.set_num_threads(threads)
    _CTX = TrialContext.build(parse_space(space), BaseMetrics.from_dict(base))


def work(ratios: dict[str, float], keep_model: bool, book: Any = None,
         key: str = "", seen: Any = None, role: str | None = None,
         models: Any = None) -> TrialResult:
    assert _CTX is not None, "init_worker() did not run"  # a bug, not user input
    promote = promoter(book, key, role, _CTX.space.search.inherit) if book is not None else None
    return run_trial(_CTX, ratios, keep_model=keep_model, promote=promote,
                     reuse=reuser(seen) if seen is not None else None,
                     inherit=inheritor(models) if models is not None else None)
