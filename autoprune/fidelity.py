"""Multi-fidelity search: the rung book that decides which trials keep fine-tuning.

Optuna rejects ``report``/``should_prune`` in multi-objective studies, so the bookkeeping is
autoprune's own. The rule is multi-objective successive halving (Schmucker et al. 2021): at
each rung the trials that reached it are sorted into non-dominated layers on (accuracy at the
rung, cost); a trial goes on if fewer than ``ceil(n / eta)`` trials lie in better layers than its
own. The first layer (the rung's own front) always goes on.
Until ``min_trials`` trials reached a rung, everything is promoted (there is nothing to compare
with, and a stopped trial cannot be resumed later).

The same :class:`RungBook` serves both controllers: in-process for the local controller, through
a ``multiprocessing`` manager for its worker processes, as a Ray actor on a cluster.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from autoprune.pareto import nondominated_ranks

DIRECTIONS = ("maximize", "minimize")  # (accuracy at the rung, cost)

Promote = Callable[[int, float, float], bool]


class RungBook:
    """Results per rung, and the promotion rule.

    Args:
        eta: keep the top ``1/eta`` at each rung.
        min_trials: below this many results at a rung, promote.
    """

    def __init__(self, eta: float = 3.0, min_trials: int = 4) -> None:
        self.eta, self.min_trials = eta, min_trials
        self.rungs: dict[int, dict[str, tuple[float, float]]] = {}

    def report(self, key: str, rung: int, accuracy: float, cost: float) -> bool:
        """Record ``key``'s result at ``rung``; True if it may go on to the next rung."""
        entries = self.rungs.setdefault(int(rung), {})
        entries[key] = (float(accuracy), float(cost))
        return self.promotable(key, rung)

    def promotable(self, key: str, rung: int) -> bool:
        entries = self.rungs.get(int(rung), {})
        n = len(entries)
        if n < self.min_trials:
            return True
        keys = list(entries)
        ranks = nondominated_ranks(np.array([entries[k] for k in keys]), DIRECTIONS)
        mine = ranks[keys.index(key)]
        # A whole non-dominated layer goes on when it starts inside the top 1/eta: a trial is
        # stopped only when enough trials at this rung dominate it, layer by layer.
        return int((ranks < mine).sum()) < math.ceil(n / self.eta)

    def load(self, history: Iterable[tuple[str, list[tuple[int, float, float]]]]) -> None:
        """Refill from finished trials (``(key, [(rung, accuracy, cost), ...])``) on resume."""
        for key, rungs in history:
            for rung, acc, cost in rungs:
                self.rungs.setdefault(int(rung), {})[key] = (float(acc), float(cost))

    def sizes(self) -> dict[int, int]:
        return {r: len(e) for r, e in sorted(self.rungs.items())}


def promoter(book: Any, key: str) -> Promote:
    """A ``promote(rung, accuracy, cost)`` callable for one trial, whatever holds the book."""
    if hasattr(book, "report") and hasattr(book.report, "remote"):  # a Ray actor handle
        import ray

        return lambda rung, acc, cost: bool(ray.get(book.report.remote(key, rung, acc, cost)))
    return lambda rung, acc, cost: bool(book.report(key, rung, acc, cost))


def rung_steps(total: int, fractions: Iterable[float]) -> list[int]:
    """Fine-tune steps at which the rungs after rung 0 are judged (distinct, < total)."""
    steps = sorted({max(1, round(f * total)) for f in fractions})
    return [s for s in steps if s < total]
