"""Weight inheritance: a trial prunes a finished trial's fine-tuned model instead of the base.

A trial whose channels fit inside a finished trial's (every group keeps no more than there)
can start from that trial's fine-tuned weights: prune the missing channels away (importance
read off those weights), then adaptive BN and the same brief fine-tune. Its model has the same
channel counts as one pruned straight from the base, so its MACs, parameters and latency are
the same; its weights have been fine-tuned twice, for the price of once. Measured on
resnet8/mnist5k (uniform ratios, 60 fine-tune steps, 2 seeds, the parent pruned uniformly
too): at MACs ratio 0.197, 0.946-0.947 pruned from a fine-tuned model at 0.243 against
0.921-0.927 pruned from the base (0.948-0.951 with twice the steps); at 0.243, 0.949-0.959
from fine-tuned parents at uniform ratios 0.4-0.5 against 0.942-0.948 (``search.inherit``).

The parent is the cheapest (in MACs) of the finished trials' models that keeps every group's
channels (not the same structure: that is a duplicate, see :mod:`autoprune.dedup`). Models are
held up to 2 GiB of weights; past that the most dominated go first, and the front always
stays. Uniform baselines never inherit: they are the reference uniform pruning gives.

The trial records its parent's structure key (``inherits``) and a pruning record that continues
the parent's history, so :func:`autoprune.prune.replay` rebuilds it from the base model, and an
export without kept weights re-runs the chain, parent first (:func:`rerun`). Which parent a
trial gets depends on which trials finished before it: with several trials at once, the results
depend on timing. The models are held by :class:`ParentModels`, in-process, through a manager
for the local controller's workers, or as an actor on Ray; a resumed local search reloads them
from the kept weights (``search.keep_models``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from autoprune.dedup import DUPLICATE_OF, structure_key
from autoprune.pareto import nondominated_ranks
from autoprune.prune import PruneRecord, replay
from autoprune.sources._models import cpu_state, load_state_dict_strict

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from autoprune.trial import TrialContext, TrialResult


@dataclass
class Parent:
    """A finished trial's fine-tuned model, as a later trial may start from it."""

    key: str  # structure key (kept channels and seed) of the trial
    kept: dict[str, int]
    macs_ratio: float
    accuracy: float
    record: dict[str, Any]
    state_dict: dict[str, torch.Tensor]


INHERITS_TRIAL = "inherits_trial"  # user attr: the parent's trial number, when it was recorded
Inherit = Callable[[Mapping[str, int]], "Parent | None"]


def _covers(parent: Mapping[str, int], kept: Mapping[str, int]) -> bool:
    return dict(parent) != dict(kept) and all(
        g in parent and parent[g] >= c for g, c in kept.items())


class ParentModels:
    """Finished trials' fine-tuned models, for later trials to start from.

    Models are held until they pass ``max_bytes``; then the worst non-dominated layer (on
    accuracy and MACs ratio) goes first, newest first within it. The front itself is always
    held, whatever it weighs."""

    def __init__(self, max_bytes: int = 2 << 30) -> None:
        self.max_bytes = max_bytes
        self._held: dict[str, Parent] = {}

    def put(self, parent: Parent) -> None:
        a, m = parent.accuracy, parent.macs_ratio
        if not (a == a and m == m) or parent.key in self._held:  # NaN, or held already
            return
        self._held[parent.key] = parent
        while self._bytes() > self.max_bytes:
            keys = list(self._held)
            ranks = nondominated_ranks(
                np.array([[self._held[k].accuracy, self._held[k].macs_ratio] for k in keys]),
                ("maximize", "minimize"))
            if ranks.max() == 0:
                return
            worst = [k for k, r in zip(keys, ranks, strict=True) if r == ranks.max()]
            del self._held[worst[-1]]

    def find(self, kept: Mapping[str, int]) -> Parent | None:
        fits = [p for p in self._held.values() if _covers(p.kept, kept)]
        return min(fits, key=lambda p: (p.macs_ratio, -p.accuracy)) if fits else None

    def get(self, key: str) -> Parent | None:
        """The held model of the trial with structure key ``key``, if still held."""
        return self._held.get(key)

    def _bytes(self) -> int:
        return sum(t.numel() * t.element_size() for p in self._held.values()
                   for t in p.state_dict.values())

    def keys(self) -> list[str]:
        return list(self._held)

    def __len__(self) -> int:
        return len(self._held)


def parent_of(result: TrialResult) -> Parent | None:
    """The parent a finished trial offers (complete, fine-tuned here, weights at hand)."""
    if result.state != "complete" or result.state_dict is None or not result.kept_channels \
            or result.duplicate_of is not None:
        return None
    return Parent(structure_key(result.kept_channels, result.seed), dict(result.kept_channels),
                  float(result.macs_ratio), float(result.accuracy), dict(result.record),
                  cpu_state(result.state_dict))


def offer(models: Any, result: TrialResult) -> None:
    """Add a finished trial's model to ``models`` (in-process, manager proxy or Ray actor)."""
    parent = parent_of(result)
    if parent is not None:
        _put(models, parent)


def _put(models: Any, parent: Parent) -> None:
    if hasattr(models.put, "remote"):  # a Ray actor
        import ray

        # held once this returns: the driver finds it when it records the trial
        ray.get(models.put.remote(parent))
    else:
        models.put(parent)


def inheritor(models: Any) -> Inherit:
    """An ``inherit(kept)`` callable for :func:`autoprune.trial.run_trial`."""
    if hasattr(models.find, "remote"):  # a Ray actor handle
        import ray

        def find(kept: Mapping[str, int]) -> Parent | None:
            try:
                found: Parent | None = ray.get(models.find.remote(dict(kept)), timeout=120)
                return found
            except Exception:  # noqa: BLE001 - a lost lookup only means pruning the base
                return None

        return find
    return lambda kept: models.find(dict(kept))


def parent_model(ctx: TrialContext, parent: Parent) -> tuple[nn.Module, PruneRecord]:
    """The parent's fine-tuned model, rebuilt from the base model, and its record."""
    record = PruneRecord.from_dict(parent.record)
    model = replay(ctx.base_model, ctx.example_inputs, record)
    load_state_dict_strict(model, parent.state_dict, f"parent {parent.key} weights")
    return model, record


def load_kept(models: Any, study: optuna.Study, trials_dir: Path) -> int:
    """Refill ``models`` (in-process, manager proxy or Ray actor) on resume from the complete
    trials whose weights were kept."""
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        if a.get("state") != "complete" or a.get(DUPLICATE_OF) is not None:
            continue
        kept = read_kept(trials_dir / str(t.number))
        if kept is None:
            continue
        record, state = kept
        parent = Parent(structure_key(a["kept_channels"], int(a["seed"])),
                        dict(a["kept_channels"]), float(a["macs_ratio"]), float(a["accuracy"]),
                        record, state)
        _put(models, parent)
        n += 1
    return n


def read_kept(d: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A trial's kept pruning record and weights from its folder ``d``, or None when they are
    not there or cannot be read (a file cut short by a kill before saves were atomic, a full
    disk): the trial is then re-run from its seed, as when weights were not kept."""
    import json
    import warnings

    if not (d / "weights.pt").exists() or not (d / "prune_record.json").exists():
        return None
    try:
        record = json.loads((d / "prune_record.json").read_text())
        state = torch.load(d / "weights.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unreadable: re-run instead of stopping the search
        why = (str(e).splitlines() or [""])[0].split(". ")[0]  # torch adds advice after it
        warnings.warn(f"the kept weights in {d} cannot be read ({type(e).__name__}: {why}); "
                      "that trial is re-run from its seed where it is needed", stacklevel=2)
        return None
    return record, state


def rerun(ctx: TrialContext, originals: Mapping[str, FrozenTrial], attrs: Mapping[str, Any],
          ratios: Mapping[str, float]) -> TrialResult:
    """Re-run a trial with its seed (deterministic), its parent chain first (``originals``:
    :func:`originals_by_key`)."""
    from autoprune.errors import AutopruneError
    from autoprune.trial import run_trial

    inherit: Inherit | None = None
    key = attrs.get("inherits")
    if key:
        if key not in originals:
            raise AutopruneError(f"the trial inherited from a model ({key}) that is not in "
                                 "the study; it cannot be re-made")
        up = originals[key]
        presult = rerun(ctx, originals, up.user_attrs, up.params)
        parent = parent_of(presult)
        if parent is None:
            raise AutopruneError(f"re-running the parent trial {up.number} ended "
                                 f"{presult.state}: {presult.error or 'no model'}")
        inherit = lambda kept: parent  # noqa: E731 - the recorded parent, whatever it keeps
    seed = attrs.get("seed")
    # with the threads it ran with: a --jobs 2 trial (1 thread each) re-made with 2 scored
    # 0.9917 against its 0.9889, and export refused it
    was, threads = torch.get_num_threads(), int(attrs.get("threads") or 0)
    if threads:
        torch.set_num_threads(threads)
    try:
        # the channels it kept, not what its ratios round to today: a trial an older
        # autoprune made (half-way counts rounded down) was re-made another model
        return run_trial(ctx, ratios, None if seed is None else int(seed), keep_model=True,
                         inherit=inherit, constraints=False, kept=attrs.get("kept_channels"))
    finally:
        torch.set_num_threads(was)


def ancestors(originals: Mapping[str, FrozenTrial], attrs: Mapping[str, Any]) -> list[int]:
    """The trials :func:`rerun` re-runs before a trial with ``attrs``, oldest first."""
    out: list[int] = []
    key = attrs.get("inherits")
    while key and key in originals and len(out) < len(originals):
        up = originals[key]
        out.append(up.number)
        key = up.user_attrs.get("inherits")
    return out[::-1]


def originals_by_key(study: optuna.Study) -> dict[str, FrozenTrial]:
    """Complete original (not duplicate) trials by structure key; the first trial wins."""
    from optuna.trial import TrialState

    out: dict[str, FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        if a.get(DUPLICATE_OF) is None and a.get("kept_channels") and a.get("seed") is not None:
            out.setdefault(structure_key(a["kept_channels"], int(a["seed"])), t)
    return out


def parent_number(study: optuna.Study, key: str | None) -> int | None:
    """The trial number of a structure key's first complete original trial (None: not found)."""
    found = originals_by_key(study).get(key) if key else None
    return None if found is None else found.number
