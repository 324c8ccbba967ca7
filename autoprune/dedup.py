"""The same config is never fine-tuned twice.

NSGA-II on a stepped grid proposes configs it has already tried (crossover of two identical
parents, a mutation that lands back on a parent), more so once the population converges. A
trial is seeded by ``search.seed``, so re-running a config would only repeat the same result at
full cost. Instead the earlier result is reused: the new trial is recorded with the same
measurements, ``duplicate_of`` the trial that ran, no fine-tune steps and no rungs, and it
never appears on the front twice.

Failed trials are not reused (a failure may be transient). :class:`SeenConfigs` is held
in-process by the local controller and as an actor by the Ray controller, filled from the study
on resume.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import optuna
from optuna.trial import TrialState

from autoprune.trial import TrialResult

DUPLICATE_OF = "duplicate_of"
_FIELDS = TrialResult.__dataclass_fields__
_FLOAT_FIELDS = {k for k, f in _FIELDS.items() if f.type == "float"}


def config_key(ratios: Mapping[str, float]) -> str:
    return json.dumps(sorted((k, round(float(v), 9)) for k, v in ratios.items()))


class SeenConfigs:
    """Finished results by config: ``{key: (trial label, result fields)}``."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[Any, dict[str, Any]]] = {}

    def put(self, ratios: Mapping[str, float], label: Any, fields: Mapping[str, Any]) -> None:
        if fields.get("state") in (None, "failed"):
            return
        self._seen.setdefault(config_key(ratios), (label, dict(fields)))

    def get(self, ratios: Mapping[str, float]) -> tuple[Any, dict[str, Any]] | None:
        return self._seen.get(config_key(ratios))

    def load(self, entries: Iterable[tuple[Mapping[str, float], Any, Mapping[str, Any]]]) -> None:
        for ratios, label, fields in entries:
            self.put(ratios, label, fields)

    def __len__(self) -> int:
        return len(self._seen)


def result_fields(result: TrialResult) -> dict[str, Any]:
    """What a duplicate reuses: the measurements, not the weights, losses or pruning record."""
    d = result.to_dict()
    for key in ("record", "finetune_losses", "state_dict"):
        d.pop(key, None)
    return d


def study_entries(study: optuna.Study) -> list[tuple[dict[str, float], int, dict[str, Any]]]:
    """Finished, reusable trials of a study (originals only) as ``(ratios, number, fields)``."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        attrs = t.user_attrs
        if attrs.get(DUPLICATE_OF) is not None or attrs.get("state") in (None, "failed"):
            continue
        fields = {k: v for k, v in attrs.items() if k in _FIELDS}
        out.append((dict(t.params), t.number, fields))
    return out


def duplicate_result(ratios: Mapping[str, float], of: int,
                     fields: Mapping[str, Any]) -> TrialResult:
    """A result for a config that already ran: the same measurements, none of the cost."""
    kw = {k: v for k, v in fields.items() if k in _FIELDS}
    for k in _FLOAT_FIELDS & kw.keys():  # the study stores NaN as null
        kw[k] = math.nan if kw[k] is None else float(kw[k])
    kw.update(ratios=dict(ratios), duplicate_of=of, finetune_steps=0, finetune_losses=[], rungs=[],
              duration_s=0.0, record={}, state_dict=None, error=None)
    return TrialResult(**kw)
