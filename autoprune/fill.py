"""Front fill: some proposals bisect the widest step of the accuracy-cost front.

A front of a few complete trials is a staircase: between two neighbours (cost c1, accuracy a1)
and (c2, a2) a user with a budget just under c2 only gets a1. NSGA-II's offspring land wherever
crossover and mutation put them, so with a small trial budget such steps stay open. Every
``search.front_fill``-th proposal after the seed points is instead the midpoint, in ratio space,
of the two neighbours around the step of largest area (c2 - c1) x (a2 - a1): the point that
would add the most hypervolume if accuracy runs straight between them, and that halves the
largest shortfall against any other method's front there. A midpoint that snaps onto a config
already proposed moves to a quarter point, then to the next step; with none left the sampler
proposes as usual. A midpoint whose channel counts came out as a neighbour's (``round_to``
leaves few distinct counts in a narrow layer; its result was reused) rules out the quarter
point on that neighbour's side, which has the same counts.

Fill trials are ordinary trials (judged at the rungs, parents for NSGA-II), tagged
``front_fill``. It lives in the sampler, so the Ray controller's ``OptunaSearch`` runs it too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState

FILL_ATTR = "front_fill"
_FIXED = "fixed_params"  # Optuna's system attr of an enqueued trial
_COSTS = ("macs", "params", "latency")  # the cost axis of the fill: the first objective present


def fill_axes(objectives: Sequence[str]) -> tuple[int, int] | None:
    """Indices of accuracy and of the cost the fill works on, in the study's values."""
    cost = next((o for o in _COSTS if o in objectives), None)
    if "accuracy" not in objectives or cost is None:
        return None
    return list(objectives).index("accuracy"), list(objectives).index(cost)


def front_steps(points: Sequence[tuple[float, float, Mapping[str, Any]]]) -> list[
        tuple[float, Mapping[str, Any], Mapping[str, Any]]]:
    """The steps of the (cost, accuracy) staircase, largest area first.

    Args:
        points: (cost, accuracy, params) of complete trials.

    Returns:
        (area, params of the cheaper neighbour, params of the dearer one) per step.
    """
    front: list[tuple[float, float, Mapping[str, Any]]] = []
    for cost, acc, params in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((cost, acc, params))
    steps = [((c2 - c1) * (a2 - a1), p1, p2)
             for (c1, a1, p1), (c2, a2, p2) in zip(front, front[1:], strict=False)]
    return sorted(steps, key=lambda s: -s[0])


def _snap(value: float, d: FloatDistribution) -> float:
    from autoprune.study import snap

    return snap(value, d)


def fill_params(points: Sequence[tuple[float, float, Mapping[str, Any]]],
                dists: Mapping[str, BaseDistribution],
                taken: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """The config that fills the widest step not yet filled (None when there is none).

    Each group's channel count moves monotonically along the segment between the neighbours.
    So a midpoint that came back with one neighbour's result (the same structure: its result
    was reused) has that structure over the whole half towards it, and only the quarter point
    of the other half can still split the step."""
    floats = {n: d for n, d in dists.items() if isinstance(d, FloatDistribution)}
    if not floats:
        return None
    result = {_key(p): (c, a) for c, a, p in reversed(points)}  # the first trial of a config
    for area, left, right in front_steps(points):
        if area <= 0 or any(n not in left or n not in right for n in floats):
            continue
        at = {t: {n: _snap((1 - t) * left[n] + t * right[n], d) for n, d in floats.items()}
              for t in (0.5, 0.25, 0.75)}
        mid = result.get(_key(at[0.5]))
        for t, params in at.items():
            if mid is not None and mid == result[_key(left if t < 0.5 else right)]:
                continue  # between the midpoint and the neighbour it came back as
            if all(any(p.get(n) != v for n, v in params.items()) for p in taken):
                return params
    return None


def _key(params: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(params.items()))


class FrontFill:
    """Mixin for an Optuna sampler: every ``every``-th proposal that is not a seed point is a
    front fill (see the module docstring); the others come from the sampler itself."""

    def __init__(self, *args: Any, fill_every: int = 0, fill_axes: tuple[int, int] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fill_every, self.fill_axes = fill_every, fill_axes

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        params = self._fill(study, trial, search_space)
        if params is not None:
            study._storage.set_trial_user_attr(trial._trial_id, FILL_ATTR, True)
            generation = getattr(self, "get_trial_generation", None)
            if generation is not None:  # a GA sampler: the fill joins a generation, as a parent
                generation(study, trial)
            return params
        return super().sample_relative(study, trial, search_space)  # type: ignore[misc]

    def _fill(self, study: optuna.Study, trial: FrozenTrial,
              search_space: dict[str, BaseDistribution]) -> dict[str, float] | None:
        if self.fill_every <= 0 or self.fill_axes is None or not search_space \
                or _FIXED in trial.system_attrs:
            return None
        trials = study._get_trials(deepcopy=False, use_cache=True)
        earlier = sum(1 for t in trials
                      if t.number < trial.number and _FIXED not in t.system_attrs)
        if earlier % self.fill_every != self.fill_every - 1:
            return None
        acc, cost = self.fill_axes
        # infeasible trials are COMPLETE in Optuna (with constraints): not on a user's front
        points = [(t.values[cost], t.values[acc], t.params) for t in trials
                  if t.state == TrialState.COMPLETE and t.values is not None
                  and t.user_attrs.get("state", "complete") == "complete"
                  and all(math.isfinite(v) for v in t.values)]
        taken = [t.params for t in trials if t.number != trial.number]
        taken += [t.system_attrs[_FIXED] for t in trials if _FIXED in t.system_attrs]
        return fill_params(points, search_space, taken)
