"""The same pruned model is never fine-tuned twice.

NSGA-II on a stepped grid proposes configs it has already tried (crossover of two identical
parents, a mutation that lands back on a parent), more so once the population converges; and
with ``round_to``, nearby ratios often keep exactly the same channels (a 16-channel layer with
``round_to: 4`` has five widths for seventeen ratios). Two trials that keep the same channels
with the same seed build the same model and would repeat the same result at full cost. So after
pruning, a trial whose structure already ran reuses that result: it is recorded with the same
measurements, ``duplicate_of`` the trial that ran, its own ratios and pruning record, no
fine-tune steps and no rungs, and the front lists the model once.

Failed trials are not reused (a failure may be transient). :class:`SeenConfigs` is held
in-process by the local controller, through a manager for its worker processes, and as an actor
by the Ray controller; it is refilled from the study on resume.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import optuna
from optuna.trial import TrialState

from autoprune.trial import TrialResult

DUPLICATE_OF = "duplicate_of"
_FIELDS = TrialResult.__dataclass_fields__
_FLOAT_FIELDS = {k for k, f in _FIELDS.items() if f.type == "float"}

Hit = tuple[int, dict[str, Any]]  # (trial number that ran it, its result fields)
Reuse = Callable[[str], "Hit | None"]


def structure_key(kept_channels: Mapping[str, int], seed: int) -> str:
    """What determines a trial's model and fine-tune: the channels each group keeps, the seed."""
    return json.dumps([seed, sorted((k, int(v)) for k, v in kept_channels.items())])


class SeenConfigs:
    """Finished results by structure key."""

    def __init__(self) -> None:
        self._seen: dict[str, Hit] = {}

    def put(self, key: str, label: int, fields: Mapping[str, Any]) -> None:
        if fields.get("state") in (None, "failed") or fields.get(DUPLICATE_OF) is not None:
            return
        self._seen.setdefault(key, (label, dict(fields)))

    def get(self, key: str) -> Hit | None:
        return self._seen.get(key)

    def load(self, entries: Iterable[tuple[str, int, Mapping[str, Any]]]) -> None:
        for key, label, fields in entries:
            self.put(key, label, fields)

    def __len__(self) -> int:
        return len(self._seen)


def result_fields(result: TrialResult) -> dict[str, Any]:
    """What a duplicate reuses: the measurements, not the weights, losses or pruning record."""
    d = result.to_dict()
    for key in ("record", "finetune_losses", "state_dict"):
        d.pop(key, None)
    return d


def remember(seen: Any, result: TrialResult, number: int) -> None:
    """Add a finished trial to ``seen`` (in-process, manager proxy or Ray actor)."""
    if result.state == "failed" or result.duplicate_of is not None or not result.kept_channels:
        return
    key = structure_key(result.kept_channels, result.seed)
    if hasattr(seen, "put") and hasattr(seen.put, "remote"):
        seen.put.remote(key, number, result_fields(result))
    else:
        seen.put(key, number, result_fields(result))


def mark_twin(seen: Any, result: TrialResult) -> None:
    """Record a trial that ran alongside its twin as a duplicate of the one recorded first.

    With several trials at once, two that keep the same channels can both start before
    either has finished, so neither finds the other (on Ray, NSGA-II proposed 0.5/0.5 twice
    and both were fine-tuned and listed on the front). The one recorded second takes the
    first one's measurements and ``duplicate_of``, so the front lists the model once; its
    fine-tune steps stay, as they were spent.
    """
    if result.state == "failed" or result.duplicate_of is not None or not result.kept_channels:
        return
    hit = reuser(seen)(structure_key(result.kept_channels, result.seed))
    if hit is None:
        return
    spent = result.finetune_steps, result.finetune_losses, result.rungs
    reuse_into(result, hit)
    result.finetune_steps, result.finetune_losses, result.rungs = spent
    result.state_dict = None  # its weights are not the ones the original's record stands for


def reuser(seen: Any) -> Reuse:
    """A ``reuse(key)`` callable for :func:`autoprune.trial.run_trial`, whatever holds ``seen``."""
    if hasattr(seen, "get") and hasattr(seen.get, "remote"):  # a Ray actor handle
        import ray

        def lookup(key: str) -> Hit | None:
            try:
                return ray.get(seen.get.remote(key), timeout=60)
            except Exception:  # noqa: BLE001 - a lost lookup only means running the trial
                return None

        return lookup
    return lambda key: seen.get(key)


def study_entries(study: optuna.Study) -> list[tuple[str, int, dict[str, Any]]]:
    """Finished, reusable trials of a study (originals only) as ``(key, number, fields)``."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        attrs = t.user_attrs
        if attrs.get(DUPLICATE_OF) is not None or attrs.get("state") in (None, "failed") \
                or not attrs.get("kept_channels") or attrs.get("seed") is None:
            continue
        fields = {k: v for k, v in attrs.items() if k in _FIELDS}
        out.append((structure_key(attrs["kept_channels"], int(attrs["seed"])), t.number, fields))
    return out


def reuse_into(result: TrialResult, hit: Hit) -> None:
    """Fill ``result`` (pruned, not yet measured) with the measurements of the trial that built
    the same model: none of the cost is paid again."""
    number, fields = hit
    keep = {"ratios", "seed", "kept_channels", "record", "state_dict", "inherits"}
    for k, v in fields.items():
        if k in _FIELDS and k not in keep:
            setattr(result, k, math.nan if v is None and k in _FLOAT_FIELDS else v)
    result.duplicate_of = number
    result.finetune_steps, result.finetune_losses, result.rungs = 0, [], []
    result.error = None
