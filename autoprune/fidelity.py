"""Multi-fidelity search: the rung book that decides which trials keep fine-tuning.

Optuna rejects ``report``/``should_prune`` in multi-objective studies, so the bookkeeping is
autoprune's own. The rule is multi-objective successive halving (Schmucker et al. 2021): at
each rung the trials that reached it are sorted into non-dominated layers on (accuracy at the
rung, cost); a trial goes on if fewer than ``ceil(n / eta)`` trials lie in better layers than its
own. The first layer (the rung's own front) always goes on.
Until ``min_trials`` trials reached a rung, everything is promoted (there is nothing to compare
with, and a stopped trial cannot be resumed later).

An earlier rung stops trials only once it has shown that it predicts the last rung beyond what
the cost already says: over the first ``trust_min`` trials seen at both (all promoted by this
rung, so an unbiased sample), the partial Spearman correlation of (accuracy here, accuracy at
the last rung | cost) must reach ``trust_threshold``. Seed points (uniform baselines, warm
starts) are judged like any trial but stay out of that sample: they are not what the sampler
proposes, and on resnet8/mnist5k they let a proxy with no information beyond MACs (0.09 over
random configs) reach 0.48 over the first 12 trials and be trusted. Until then, and if it
does not, the rung promotes everything. The last rung is trusted (what follows it is the full
budget). Uniform baselines (and, with ``search.inherit``, warm starts) are never stopped:
baselines are the reference the front is read against, warm starts the parents of later trials.
They report their proxy at rung 0, where they are the first reference, and skip the later rungs,
whose evaluations could change nothing for them. The last rung stands in for the final
accuracy, which only trials that passed every rung have. Measured on resnet8/mnist5k
(``benchmarks/rung_fidelity.py``, 20 random configs), partial correlation with the final
accuracy given MACs: the adaptive-BN proxy 0.09 (no information beyond MACs: it sat near chance
for heavy pruning; -0.09 with the last rung), the BN-recalibrated accuracy after
1/9 of the budget 0.41 (0.61 with the last rung), after 1/3 0.73.

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

    def __init__(self, eta: float = 3.0, min_trials: int = 4, trust_min: int = 8,
                 trust_threshold: float = 0.3, last_rung: int | None = None) -> None:
        self.eta, self.min_trials = eta, min_trials
        self.trust_min, self.trust_threshold, self.last_rung = trust_min, trust_threshold, \
            last_rung
        self.rungs: dict[int, dict[str, tuple[float, float]]] = {}
        self.seeds: set[str] = set()  # seed points: judged like the others, never sampled

    def report(self, key: str, rung: int, accuracy: float, cost: float,
               sample: bool = True) -> bool:
        """Record ``key``'s result at ``rung``; True if it may go on to the next rung.
        ``sample=False`` (a seed point) keeps it out of the trust sample."""
        entries = self.rungs.setdefault(int(rung), {})
        entries[key] = (float(accuracy), float(cost))
        if not sample:
            self.seeds.add(key)
        return self.promotable(key, rung)

    def trust(self, rung: int) -> float | None:
        """Partial Spearman correlation of (accuracy at ``rung``, at the last rung | cost) over
        the first ``trust_min`` sampled trials seen at both; None until there are that many."""
        last = self.last_rung if self.last_rung is not None else int(rung) + 1
        here, after = self.rungs.get(int(rung), {}), self.rungs.get(last, {})
        keys = [k for k in here if k in after and k not in self.seeds][:self.trust_min]
        if len(keys) < max(self.trust_min, 3):
            return None
        return partial_spearman([here[k][0] for k in keys], [after[k][0] for k in keys],
                                [here[k][1] for k in keys])

    def trusted(self, rung: int) -> bool:
        if self.last_rung is None or rung >= self.last_rung or self.trust_threshold <= -1:
            return True
        rho = self.trust(rung)
        return rho is not None and rho >= self.trust_threshold

    def promotable(self, key: str, rung: int) -> bool:
        entries = self.rungs.get(int(rung), {})
        n = len(entries)
        if n < self.min_trials or not self.trusted(rung):
            return True
        keys = list(entries)
        ranks = nondominated_ranks(np.array([entries[k] for k in keys]), DIRECTIONS)
        mine = ranks[keys.index(key)]
        # A whole non-dominated layer goes on when it starts inside the top 1/eta: a trial is
        # stopped only when enough trials at this rung dominate it, layer by layer.
        return int((ranks < mine).sum()) < math.ceil(n / self.eta)

    def load(self, history: Iterable[tuple[str, list[tuple[int, float, float]], bool]]) -> None:
        """Refill from finished trials (``(key, [(rung, accuracy, cost), ...], sample)``) on
        resume."""
        for key, rungs, sample in history:
            for rung, acc, cost in rungs:
                self.rungs.setdefault(int(rung), {})[key] = (float(acc), float(cost))
            if not sample:
                self.seeds.add(key)

    def sizes(self) -> dict[int, int]:
        return {r: len(e) for r, e in sorted(self.rungs.items())}


def book_args(fid: Any) -> tuple[float, int, int, float, int]:
    """:class:`RungBook` arguments for a space's ``search.fidelity`` (rung 0 is the proxy;
    the last rung is the last fraction of the budget)."""
    return fid.eta, fid.min_trials, fid.trust_min, fid.trust_threshold, len(fid.rungs)


def partial_spearman(x: Iterable[float], y: Iterable[float], z: Iterable[float]) -> float:
    """Spearman correlation of ``x`` and ``y`` with ``z`` partialled out (0 when undefined,
    e.g. a constant column)."""
    from scipy.stats import spearmanr

    xs, ys, zs = (np.asarray(list(v), dtype=float) for v in (x, y, z))
    r = {}
    for name, (a, b) in {"xy": (xs, ys), "xz": (xs, zs), "yz": (ys, zs)}.items():
        rho = spearmanr(a, b).statistic if a.std() > 0 and b.std() > 0 else 0.0
        r[name] = float(rho) if np.isfinite(rho) else 0.0
    den = math.sqrt(max((1 - r["xz"] ** 2) * (1 - r["yz"] ** 2), 0.0))
    return (r["xy"] - r["xz"] * r["yz"]) / den if den > 1e-9 else 0.0


class Promoter:
    """``promote(rung, accuracy, cost)``: report a trial's result at a rung to the book, and
    say whether the trial goes on. ``keep`` (a trial that is never stopped) makes it go on
    whatever the book says; such a trial reports only rung 0 (the proxy, which it computes
    anyway): a later rung's adaptive BN and evaluation could change nothing for it."""

    def __init__(self, report: Promote, keep: bool = False) -> None:
        self.report, self.keep = report, keep

    def __call__(self, rung: int, accuracy: float, cost: float) -> bool:
        return self.report(rung, accuracy, cost) or self.keep


def promoter(book: Any, key: str, role: str | None = None,
             keep_seeds: bool = False) -> Promoter:
    """The :class:`Promoter` of one trial, whatever holds the book.

    ``role`` is a seed point's (:func:`autoprune.study.seed_role`): seed points stay out of the
    trust sample, and a uniform ``baseline`` is never stopped: it is the reference the front is
    read against. ``keep_seeds`` (with ``search.inherit``) keeps warm-start seeds too: later
    seeds and trials start from their fine-tuned models. Both still report their proxy (rung
    0), where they are the reference the first trials are judged against."""
    sample = role is None
    keep = role == "baseline" or (keep_seeds and role is not None)
    if hasattr(book, "report") and hasattr(book.report, "remote"):  # a Ray actor handle
        import ray

        return Promoter(lambda rung, acc, cost: bool(ray.get(book.report.remote(
            key, rung, acc, cost, sample))), keep)
    return Promoter(lambda rung, acc, cost: bool(book.report(key, rung, acc, cost, sample)),
                    keep)


def rung_steps(total: int, fractions: Iterable[float]) -> list[int]:
    """Fine-tune steps at which the rungs after rung 0 are judged (distinct, < total)."""
    steps = sorted({max(1, round(f * total)) for f in fractions})
    return [s for s in steps if s < total]


def numbered_rungs(total: int, fractions: Iterable[float]) -> list[tuple[int, int]]:
    """``(rung, step)`` of the rungs after rung 0. The last is numbered ``len(fractions)``, the
    rung the book measures every earlier rung's trust against (:func:`book_args`), also when a
    small budget merges or drops rungs (fewer distinct steps than fractions: 4 steps make 1/9
    and 1/3 both step 1); numbered 1, 2, ... they never reached it, so no rung earned trust and
    none stopped a trial."""
    fractions = tuple(fractions)
    steps = rung_steps(total, fractions)
    return list(enumerate(steps, start=len(fractions) - len(steps) + 1))
