"""Pareto-front arithmetic on plain arrays: dominance, hypervolume, knee, matched-cost accuracy.

Conventions: ``points`` is an ``(n, k)`` array; ``directions`` says per column whether larger
(``"maximize"``) or smaller (``"minimize"``) is better. Internally everything is turned into
minimisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _as_min(points: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    signs = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    return np.asarray(points, dtype=float) * signs


def pareto_mask(points: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Boolean mask of the non-dominated rows (duplicates of a front point stay on it)."""
    p = _as_min(points, directions)
    n = len(p)
    mask = np.ones(n, dtype=bool)
    for i in range(n):
        dominated = np.all(p <= p[i], axis=1) & np.any(p < p[i], axis=1)
        mask[i] = not dominated.any()
    return mask


def nondominated_ranks(points: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Non-dominated sorting: rank 0 is the front, rank 1 the front of the rest, and so on."""
    p = np.asarray(points, dtype=float)
    ranks = np.full(len(p), -1)
    remaining = np.arange(len(p))
    rank = 0
    while len(remaining):
        mask = pareto_mask(p[remaining], directions)
        ranks[remaining[mask]] = rank
        remaining = remaining[~mask]
        rank += 1
    return ranks


def hypervolume_2d(accuracy: np.ndarray, cost: np.ndarray, ref_accuracy: float = 0.0,
                   ref_cost: float = 1.0) -> float:
    """Area dominated by (accuracy up, cost down) points, bounded by the reference point.

    The reference point ``(ref_accuracy, ref_cost)`` is the worst corner: accuracy 0 and the
    base model's cost (ratio 1.0) by default. Points outside it add nothing.
    """
    acc = np.asarray(accuracy, dtype=float)
    c = np.asarray(cost, dtype=float)
    keep = (acc > ref_accuracy) & (c < ref_cost)
    if not keep.any():
        return 0.0
    order = np.argsort(c[keep])
    acc_s, c_s = acc[keep][order], c[keep][order]
    area, best = 0.0, ref_accuracy
    # Sweep from cheapest to most costly: each point adds the accuracy it gains over the best
    # cheaper point, for the cost range from it up to the reference.
    for a, x in zip(acc_s, c_s):
        if a > best:
            area += (a - best) * (ref_cost - x)
            best = a
    return float(area)


def knee_index(accuracy: np.ndarray, cost: np.ndarray) -> int:
    """The knee of a 2-D front: the point farthest from the line joining its two extremes.

    Both axes are min-max normalised first, so the knee does not depend on units. With one or
    two points the most accurate point is returned.
    """
    acc = np.asarray(accuracy, dtype=float)
    c = np.asarray(cost, dtype=float)
    if len(acc) <= 2:
        return int(np.argmax(acc))

    def norm(v: np.ndarray) -> np.ndarray:
        span = v.max() - v.min()
        return (v - v.min()) / span if span > 0 else np.zeros_like(v)

    a, x = norm(acc), norm(c)
    i0, i1 = int(np.argmin(x)), int(np.argmax(x))
    p0, p1 = np.array([x[i0], a[i0]]), np.array([x[i1], a[i1]])
    d = p1 - p0
    length = float(np.hypot(*d))
    if length == 0:
        return int(np.argmax(acc))
    dist = np.abs(d[0] * (a - p0[1]) - d[1] * (x - p0[0])) / length
    return int(np.argmax(dist))


def accuracy_at_cost(accuracy: np.ndarray, cost: np.ndarray, budget: float) -> float:
    """Best accuracy among points with cost <= budget (NaN when none is that cheap)."""
    acc = np.asarray(accuracy, dtype=float)
    ok = np.asarray(cost, dtype=float) <= budget
    return float(acc[ok].max()) if ok.any() else float("nan")
