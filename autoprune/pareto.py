"""Pareto-front arithmetic on plain arrays: dominance, hypervolume, knee, pick rules.

Conventions: ``points`` is an ``(n, k)`` array; ``directions`` says per column whether larger
(``"maximize"``) or smaller (``"minimize"``) is better. Internally everything is turned into
minimisation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd


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
    for a, x in zip(acc_s, c_s, strict=True):
        if a > best:
            area += (a - best) * (ref_cost - x)
            best = a
    return float(area)


def knee_index(accuracy: np.ndarray, cost: np.ndarray) -> int:
    """The knee of a 2-D front: the point farthest above the line joining its two extremes.

    Both axes are min-max normalised first, so the knee does not depend on units. "Above" means
    more accurate than the line at that cost: the best trade-off. A point below the line is the
    worst trade-off on the front (both its neighbours' mix beats it), so the distance is
    signed. When no point lies above the line (a front that bends the other way has no knee),
    or with one or two points, the most accurate point is returned.
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
    above = (d[0] * (a - p0[1]) - d[1] * (x - p0[0])) / length
    return int(np.argmax(above)) if above.max() > 1e-12 else int(np.argmax(acc))


def accuracy_at_cost(accuracy: np.ndarray, cost: np.ndarray, budget: float) -> float:
    """Best accuracy among points with cost <= budget (NaN when none is that cheap)."""
    acc = np.asarray(accuracy, dtype=float)
    ok = np.asarray(cost, dtype=float) <= budget
    return float(acc[ok].max()) if ok.any() else float("nan")


# ----------------------------------------------------------------------------------------------
# Pick rules: which point of a front to export.

_BUDGET = re.compile(
    r"^\s*(accuracy|macs|latency_ms|latency|params)\s*(<=|>=)\s*([0-9.eE+-]+)\s*$")
_COLUMN = {"macs": "macs_ratio", "params": "params_ratio", "latency": "latency_ms",
           "latency_ms": "latency_ms", "accuracy": "accuracy"}
PICK_RULES = ("knee", "max-accuracy", "macs<=R", "params<=R", "latency_ms<=MS", "accuracy>=A",
              "trial:N")


def pick(front: pd.DataFrame, rule: str, cost: str = "macs_ratio") -> int:
    """The trial number a pick rule selects from a front (rows: trial, accuracy, costs).

    Rules: ``knee`` (the knee of accuracy vs ``cost``, see :func:`knee_index`),
    ``max-accuracy``, a budget ``macs<=0.5`` / ``params<=0.5`` / ``latency_ms<=3.0`` (the most
    accurate point within it), ``accuracy>=0.97`` (the cheapest point by ``cost`` that reaches
    it), and ``trial:N``.

    Raises:
        ValueError: the rule is malformed or matches no point of the front.
    """
    if front.empty:
        raise ValueError("the front is empty: no feasible trial has completed")
    rule = rule.strip()
    if rule.startswith("trial:"):
        try:
            n = int(rule.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"--pick: got {rule!r}; allowed: trial:N, N a trial number of "
                             "the front") from None
        if n not in set(front["trial"]):
            raise ValueError(f"--pick {rule}: trial {n} is not on the front")
        return n
    if rule == "max-accuracy":
        return int(front.loc[front["accuracy"].idxmax(), "trial"])
    if rule == "knee":  # on the 2-D front of accuracy vs cost within the study's front
        pts = front[["accuracy", cost]].to_numpy(float)
        front2 = front[pareto_mask(pts, ["maximize", "minimize"])]
        i = knee_index(front2["accuracy"].to_numpy(float), front2[cost].to_numpy(float))
        return int(front2.iloc[i]["trial"])
    m = _BUDGET.match(rule)
    try:
        limit = float(m.group(3)) if m else float("nan")
    except ValueError:
        limit = float("nan")
    if not m or limit != limit:
        raise ValueError(f"--pick: got {rule!r}; allowed: {', '.join(PICK_RULES)}")
    col, op = _COLUMN[m.group(1)], m.group(2)
    if op != (">=" if col == "accuracy" else "<="):
        # a budget is an upper bound on a cost and a floor on accuracy; the other direction
        # would quietly export a model the user did not mean
        want = f"{m.group(1)}{'>=' if col == 'accuracy' else '<='}{m.group(3)}"
        raise ValueError(f"--pick: got {rule!r}; allowed: {want} (a floor on accuracy, an "
                         f"upper bound on a cost), or {', '.join(PICK_RULES)}")
    if col == "accuracy":
        ok = front[front["accuracy"] >= limit]
        if ok.empty:
            raise ValueError(f"--pick {rule}: no point of the front meets it")
        return int(ok.loc[ok[cost].idxmin(), "trial"])
    ok = front[front[col] <= limit]
    if ok.empty:
        raise ValueError(f"--pick {rule}: no point of the front meets it")
    return int(ok.loc[ok["accuracy"].idxmax(), "trial"])


def crowding_distance(points: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """NSGA-II crowding distance within one set of points (extremes get +inf)."""
    p = _as_min(points, directions)
    n, k = p.shape if p.ndim == 2 else (len(p), 0)
    dist = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for j in range(k):
        order = np.argsort(p[:, j])
        span = p[order[-1], j] - p[order[0], j]
        dist[order[0]] = dist[order[-1]] = np.inf
        if span > 0:
            dist[order[1:-1]] += (p[order[2:], j] - p[order[:-2], j]) / span
    return dist
