"""The Optuna side of a search: study creation, the ratio search space, baselines, bookkeeping.

Both controllers use it: the local controller asks and tells through it, the Ray controller hands
the same sampler and distributions to ``OptunaSearch``; ``pareto`` and ``export`` read studies
back through it.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from autoprune.base import BaseMetrics
from autoprune.config import Range, SearchConfig, SpaceConfig, flat_items, parse_space
from autoprune.errors import AutopruneError
from autoprune.fill import FILL_ATTR, FrontFill, fill_axes
from autoprune.groups import GroupInfo
from autoprune.locks import sqlite_setup
from autoprune.trial import OBJECTIVES, TrialResult

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

# user attr of trials whose process died mid-trial (resume re-runs them)
INTERRUPTED = "interrupted"


def directions(objectives: Sequence[str]) -> list[Literal["minimize", "maximize"]]:
    return [OBJECTIVES[o][0] for o in objectives]


def group_range(space: SpaceConfig, group: str) -> Range:
    """The first glob pattern that matches ``group`` wins; otherwise ``groups.default``."""
    for pattern, rng in space.groups.patterns.items():
        if fnmatch.fnmatchcase(group, pattern):
            return rng
    return space.groups.default


def distributions(space: SpaceConfig, groups: Sequence[GroupInfo]) -> dict[str, FloatDistribution]:
    """One float per searchable group. Groups matching ``groups.ignore`` are left out."""
    out = {}
    for g in groups:
        r = group_range(space, g.name)
        step = r.step if r.step and r.high > r.low else None
        high = r.low + math.floor((r.high - r.low) / step + 1e-9) * step if step else r.high
        out[g.name] = FloatDistribution(r.low, round(high, 10), step=step)
    return out


def check_patterns(space: SpaceConfig, groups: Sequence[GroupInfo],
                   modules: Sequence[str] = ()) -> None:
    """A glob pattern in ``groups`` that matches no group, or in ``groups.ignore`` that matches
    no module name (of ``modules``, when given), is almost surely a typo."""
    import difflib

    for pattern in space.groups.ignore if modules else ():
        if not any(fnmatch.fnmatchcase(n, pattern) for n in modules):
            close = difflib.get_close_matches(pattern, list(modules), n=3, cutoff=0.4)
            raise AutopruneError(
                f"groups.ignore: {pattern!r} matches no module of {space.model.source}; allowed: "
                f"glob patterns of module names (close matches: {close or 'none'}; see "
                "`autoprune layers`)")
    names = [g.name for g in groups]
    for pattern in space.groups.patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.4)
            raise AutopruneError(
                f"groups.{pattern}: matches no group of {space.model.source}; close "
                f"matches: {close or 'none'}; groups: {names} (see `autoprune layers`)")


def snap(value: float, dist: FloatDistribution) -> float:
    """Clip a ratio into a distribution and onto its step grid."""
    v = min(max(value, dist.low), dist.high)
    if dist.step:
        v = dist.low + round((v - dist.low) / dist.step) * dist.step
    return float(round(min(v, dist.high), 10))


class FidelityNSGAIISampler(optuna.samplers.NSGAIISampler):
    """NSGA-II whose generations also count trials stopped at a rung (PRUNED).

    Optuna's NSGA-II fills a generation with COMPLETE trials only; with multi-fidelity most
    trials end PRUNED, so the search would stay in generation 0 (random sampling) for good.
    Parents are still drawn from complete trials only.
    """

    def get_trial_generation(self, study: optuna.Study, trial: FrozenTrial) -> int:
        key = self._get_generation_key()
        generation = trial.system_attrs.get(key)
        if generation is not None:
            return int(generation)
        counts: dict[int, int] = {}
        for t in study._get_trials(deepcopy=False, states=[TrialState.COMPLETE,
                                                           TrialState.PRUNED], use_cache=True):
            g = t.system_attrs.get(key, -1)
            counts[g] = counts.get(g, 0) + 1
        newest = max(counts, default=0)
        newest = max(newest, 0)
        size = self._population_size or 1
        generation = newest + 1 if counts.get(newest, 0) >= size else newest
        study._storage.set_trial_system_attr(trial._trial_id, key, generation)
        return generation


class FillNSGAIISampler(FrontFill, optuna.samplers.NSGAIISampler):
    """NSGA-II with front fill (see :mod:`autoprune.fill`)."""


class FillFidelityNSGAIISampler(FrontFill, FidelityNSGAIISampler):
    """NSGA-II counting stopped trials in its generations, with front fill."""


# Same generation keys in the storage as without the fill: a study keeps its generations
# whichever of the two samplers resumes it (Optuna names the keys after the class).
for _fill, _plain in ((FillNSGAIISampler, optuna.samplers.NSGAIISampler),
                      (FillFidelityNSGAIISampler, FidelityNSGAIISampler)):
    _fill._GENERATION_KEY = _plain._GENERATION_KEY
    _fill._PARENT_CACHE_KEY_PREFIX = _plain._PARENT_CACHE_KEY_PREFIX


class FillTPESampler(FrontFill, optuna.samplers.TPESampler):
    """TPE with front fill."""


class FillGPSampler(FrontFill, optuna.samplers.GPSampler):
    """Gaussian-process sampler with front fill."""


def make_sampler(space: SpaceConfig, seed: int) -> optuna.samplers.BaseSampler:
    """The space's sampler; with ``search.front_fill`` (not for random search) every n-th
    proposal after the seed points fills the widest step of the front."""
    s = space.search
    axes = fill_axes(space.objectives)
    fill: dict[str, Any] = {"fill_every": s.front_fill, "fill_axes": axes} \
        if s.front_fill and axes is not None else {}
    if s.sampler == "nsga2":
        cls: type[optuna.samplers.BaseSampler]
        if s.fidelity.enabled:
            cls = FillFidelityNSGAIISampler if fill else FidelityNSGAIISampler
        else:
            cls = FillNSGAIISampler if fill else optuna.samplers.NSGAIISampler
        return cls(population_size=s.population_size, seed=seed, **fill)
    if s.sampler == "tpe":
        return (FillTPESampler if fill else optuna.samplers.TPESampler)(
            multivariate=True, seed=seed, n_startup_trials=max(len(s.baselines) + 2, 8), **fill)
    if s.sampler == "gp":
        return (FillGPSampler if fill else optuna.samplers.GPSampler)(seed=seed, **fill)
    return optuna.samplers.RandomSampler(seed=seed)


def storage_for(url: str) -> optuna.storages.BaseStorage:
    """The Optuna storage at ``url``; one that cannot be opened (a malformed URL, a database
    driver not installed, a server not reachable) is an error naming the URL."""
    import sqlalchemy.exc

    try:
        with sqlite_setup(url):  # a new file gets its tables: one process at a time
            return optuna.storages.RDBStorage(
                url, engine_kwargs={"connect_args": {"timeout": 60}}
                if url.startswith("sqlite") else None)
    except (ImportError, sqlalchemy.exc.ArgumentError, sqlalchemy.exc.OperationalError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AutopruneError(f"storage: got {url!r}, which cannot be opened ({reason}); "
                             "allowed: an Optuna storage URL such as "
                             "sqlite:////abs/path/optuna.db, or a database URL whose driver "
                             "is installed and whose server is reachable") from None


def list_studies(storage_url: str) -> list[str]:
    """The names of the studies in a storage (names only: the summaries read every trial of
    every study, 0.35 s a call against 0.002 s beside a 400-trial study, three calls a start)."""
    return list(optuna.get_all_study_names(storage_for(storage_url)))


def load_study(name: str, storage_url: str) -> optuna.Study:
    """Load an existing study; a missing one is an error that lists the studies there (a
    missing SQLite file too: reading must not leave an empty store behind)."""
    if storage_url.startswith("sqlite:///") and \
            not Path(storage_url.removeprefix("sqlite:///")).exists():
        raise AutopruneError(f"--study: no study {name!r}: there is no study store at "
                             f"{storage_url} (run a search first, or pass --runs-dir or "
                             "--storage)")
    try:
        return optuna.load_study(study_name=name, storage=storage_for(storage_url))
    except KeyError:
        names = list_studies(storage_url)
        raise AutopruneError(f"--study: no study {name!r} in {storage_url}; studies there: "
                             f"{names or 'none'}") from None


def check_study(space: SpaceConfig, name: str, resume: bool) -> optuna.Study | None:
    """The study ``name`` as this search may open it: None when it is new (or holds no
    trials), the study when it is resumed. A study that exists without ``resume``, or that was
    made with other objectives or another space, is an error. Cheap: the search checks it
    before preparing the base model, and again when it opens the study."""
    if space.storage_url.startswith("sqlite:///") and \
            not Path(space.storage_url.removeprefix("sqlite:///")).exists():
        return None  # nothing there yet; reading must not create the store
    if name not in list_studies(space.storage_url):
        return None
    old = optuna.load_study(study_name=name, storage=storage_for(space.storage_url))
    if not old.get_trials(deepcopy=False):
        return None
    if not resume:
        raise AutopruneError(f"--study: study {name!r} already exists in "
                             f"{space.storage_url}; pass --resume to continue it, or "
                             "--study NEW_NAME")
    if old.user_attrs.get("objectives") != list(space.objectives):
        raise AutopruneError(f"objectives: got {list(space.objectives)} but study {name!r} "
                             f"was created with {old.user_attrs.get('objectives')}; allowed: "
                             "the same objectives, or a new --study")
    _check_same_space(name, old, space)
    return old


def open_study(space: SpaceConfig, name: str, resume: bool, seed: int,
               base: BaseMetrics) -> optuna.Study:
    """Create the study (once, before any worker starts) or, with ``resume``, load it.

    A study without trials (left by a start that failed, e.g. on an unreachable Ray cluster)
    is made again from this space."""
    storage = storage_for(space.storage_url)
    old = check_study(space, name, resume)
    if old is not None:
        old.sampler = make_sampler(space, sampler_seed(seed, old))
        return old
    if name in list_studies(space.storage_url):  # one without trials: made again
        optuna.delete_study(study_name=name, storage=storage)
    study = optuna.create_study(study_name=name, storage=storage,
                                directions=directions(space.objectives),
                                sampler=make_sampler(space, seed))
    study.set_user_attr("space", space.to_dict())
    study.set_user_attr("objectives", list(space.objectives))
    study.set_user_attr("base", base.to_dict())
    study.set_user_attr("code", code_digests(space))
    study.set_user_attr("import_dir", os.getcwd())  # where the user's modules were imported
    study.set_user_attr("seed", seed)
    stamp_rounding(study)
    return study


def stamp_rounding(study: optuna.Study) -> None:
    """Record the rounding rule (and autoprune version) the study's trials are pruned by."""
    from autoprune import __version__
    from autoprune.prune import ROUNDING_RULE

    study.set_user_attr("rounding_rule", ROUNDING_RULE)
    study.set_user_attr("autoprune_version", __version__)


def older_rounding(study: optuna.Study, groups: Sequence[Any], round_to: int) -> list[str]:
    """The trials an older autoprune pruned to other channel counts than today's rounding
    of their ratios gives (half-way counts at float-error ratios rounded down before rule 3),
    each as ``trial N: group at ratio r kept k of C (k' now)``; empty for a study stamped
    with today's rule."""
    from autoprune.prune import ROUNDING_RULE, kept_after_rounding

    if study.user_attrs.get("rounding_rule") == ROUNDING_RULE:
        return []
    by_name = {g.name: g for g in groups}
    found = []
    for t in study.get_trials(deepcopy=False):
        kept = t.user_attrs.get("kept_channels") or {}
        for name, ratio in t.params.items():
            g = by_name.get(name)
            if g is None or name not in kept:
                continue
            now = kept_after_rounding(g.channels, float(ratio), round_to, g.blocks)
            if now != int(kept[name]):
                found.append(f"trial {t.number}: {name} at ratio {float(ratio):g} kept "
                             f"{kept[name]} of {g.channels} channels ({now} now)")
                break
    return found


def code_digests(space: SpaceConfig) -> dict[str, str]:
    """The hashes of the user's code behind the sources (:func:`autoprune.base.code_digest`):
    export names an edit since the search when the model it rebuilds does not match."""
    from autoprune.base import code_digest

    return {k: d for k, v in code_sources(space).items() if (d := code_digest(v))}


def code_sources(space: SpaceConfig) -> dict[str, str]:
    """The space's sources that may be the user's code, by key."""
    sources = {"model.source": space.model.source, "data.source": space.data.source,
               "data.evaluate": space.data.evaluate or ""}
    return {k: v for k, v in sources.items() if v}


# What may change when a study is resumed: how many trials, how many at once, where results go.
RESUME_MAY_CHANGE = ("search.trials", "search.jobs", "search.timeout", "search.device",
                     "runs_dir", "tracking.")


def _check_same_space(name: str, study: optuna.Study, space: SpaceConfig) -> None:
    """A resumed study must keep its space: its trials were made under it. A changed range
    would mix trials of two spaces on one front, and leaves NSGA-II without a common search
    space (it silently falls back to random sampling); a changed model or fine-tune makes the
    front compare models that were not made alike."""
    stored = study.user_attrs.get("space")
    if stored is None:
        return
    try:  # parsed again, so fields a newer autoprune added hold their defaults, not an edit
        stored = parse_space(stored, check=False).to_dict()
    except AutopruneError:
        pass
    before, now = flat_items(stored), flat_items(space.to_dict())
    if before.get("model.checkpoint") and now.get("model.checkpoint"):
        # one file spelt two ways (ckpt/best.pt from the project, its full path from
        # elsewhere) refused the resume: the file's SHA-256 is compared (check_same_base)
        now["model.checkpoint"] = before["model.checkpoint"]
    changed = [k for k in sorted(set(before) | set(now))
               if before.get(k) != now.get(k) and not k.startswith(RESUME_MAY_CHANGE)]
    if changed:
        shown = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
        raise AutopruneError(
            f"--resume: the space differs from the one study {name!r} was created with ({shown}"
            f"{'; ...' if len(changed) > 6 else ''}); allowed changes on resume: "
            f"{', '.join(k.rstrip('.') for k in RESUME_MAY_CHANGE)}; anything else needs a new "
            "--study")


def check_same_ranges(name: str, study: optuna.Study,
                      dists: Mapping[str, FloatDistribution]) -> None:
    """A resumed study must search each group in the range its trials were drawn from. The
    space's values are compared before (:func:`check_study`); this catches what they cannot:
    two overlapping patterns swapped (the first match wins), so a group falls under the other.
    Patterns swapped that match no group in common change nothing, and pass."""
    drawn: dict[str, Any] = {}
    for t in study.get_trials(deepcopy=False):
        drawn.update(t.distributions)
    moved = [f"{g}: {_range(drawn[g])} -> {_range(d)}" for g, d in dists.items()
             if g in drawn and drawn[g] != d]
    if moved:
        raise AutopruneError(
            f"--resume: groups would be searched in other ranges than study {name!r} drew "
            f"from ({'; '.join(moved[:6])}{'; ...' if len(moved) > 6 else ''}): the order of "
            "overlapping group patterns changed (the first match wins); allowed: the order "
            "the study was made with, or a new --study")


def _range(d: Any) -> str:
    return f"[{d.low:g}, {d.high:g}] step {d.step:g}" if getattr(d, "step", None) else \
        f"[{getattr(d, 'low', '?')}, {getattr(d, 'high', '?')}]"


def check_same_base(name: str, study: optuna.Study, space: SpaceConfig) -> None:
    """A resumed study must prune the base model its trials were pruned from. Your checkpoint
    file replaced at the same path, or a trained base made again for other model or data code
    (its cache file is keyed by that code), would put trials of two base models on one front,
    and export could rebuild none of the old ones. (The same base trained again after its
    cache file was deleted is the same base: same file name.) Run before the base model is
    trained or loaded, with the sources built (so their code is hashed): an edit refused
    after a base training had cost that training."""
    from autoprune.base import base_cache_path, sha256_file

    stored = study.user_attrs.get("base") or {}
    was = stored.get("checkpoint_sha256")
    if not was:
        return
    if not space.model.checkpoint:
        _check_base_file(name, stored, str(base_cache_path(space)), space,
                         study.user_attrs.get("code"))
        return
    if not Path(space.model.checkpoint).is_file():
        return  # loading it says so
    now = sha256_file(space.model.checkpoint)
    if was != now:
        raise AutopruneError(
            f"model.checkpoint: {space.model.checkpoint!r} is not the file study {name!r} was "
            f"made from (SHA-256 {was[:12]}... then, {now[:12]}... now); allowed: that "
            "checkpoint, or a new --study for this one")


def _check_base_file(name: str, stored: Mapping[str, Any], now: str, space: SpaceConfig,
                     code: Mapping[str, str] | None = None) -> None:
    if Path(str(stored.get("checkpoint", ""))).name == Path(now).name:
        return
    why = (f"the code or files of model.source ({space.model.source!r}) or data.source "
           f"({space.data.source!r}) changed since; allowed: the code the study was made "
           "with, or a new --study")
    today = code_digests(space)
    # The sources are as they were (a study made before their code was stored has built-in
    # sources only when none is hashed today): autoprune's own recipe changed.
    if (code is None and not today) or (code is not None and code == today):
        from autoprune import __version__

        why = (f"the sources are as they were, so this autoprune ({__version__}) trains its base "
               f"models another way than the one that made the study; allowed: a new --study "
               "(pareto and export of this one still work), or the autoprune version that made "
               "it to resume it")
    raise AutopruneError(f"--resume: study {name!r} pruned the base model "
                         f"{stored.get('checkpoint')!r}; this space gives {now!r}: {why}")


def sampler_seed(seed: int, study: optuna.Study) -> int:
    """The sampler's seed for a run of ``study``: ``seed`` for a new study; on resume, moved on
    by the trials the study holds. From ``seed`` again, a resumed sampler would re-draw the
    proposals it made before (a random draw, NSGA-II's first generation), and each would only
    reuse a finished trial's result; the same resume point still gives the same draws."""
    return seed + len(study.get_trials(deepcopy=False))


SeedPoint = tuple[dict[str, float], dict[str, Any]]  # (params, user attrs)
SEED_ATTRS = ("baseline", "baseline_ratio", "warm_start", "warm_start_budget")


def seed_points(space: SpaceConfig, dists: Mapping[str, FloatDistribution],
                allocated: Mapping[float, dict[str, float]] | None = None) -> list[SeedPoint]:
    """The first trials of a study: (with a sensitivity scan) one sensitivity-allocated config
    per warm-start MACs budget (``allocated``, from :func:`warm_start_configs`), coarse to fine
    (see :func:`coarse_to_fine`), then uniform ratios at each ``search.baselines`` level. The
    allocated configs come first: they are the better-informed guesses, so the front fills in
    sooner; the baselines follow as the reference a user compares with.

    With ``search.inherit`` the allocations nest: each budget's starts from the next dearer
    one's and only prunes more, so every seed fits inside the dearer seeds and can start from
    one of their fine-tuned models; :func:`coarse_to_fine` then runs downwards, the dearest
    first."""
    points: list[SeedPoint] = []
    if allocated is not None:
        for budget in coarse_to_fine(list(allocated), dearest_first=space.search.inherit):
            ratios = allocated[budget]
            params = {n: snap(ratios[n], d) for n, d in dists.items()}
            if all(params != p for p, _a in points):
                points.append((params, {"warm_start": True, "warm_start_budget": budget}))
    chosen = tuple(space.search.baselines) != SearchConfig().baselines  # not the defaults
    for i, level in enumerate(space.search.baselines):
        params = {n: snap(level, d) for n, d in dists.items()}
        ranged = {n: d for n, d in dists.items() if d.low < d.high}  # fixed groups stay out
        outside = sorted(n for n, d in ranged.items() if not d.low <= level <= d.high)
        run_at = {params[n] for n in ranged}
        # clipped the same in every group, it is the uniform baseline at the level it ran at
        attrs = {"baseline": True,
                 "baseline_ratio": run_at.pop() if outside and len(run_at) == 1 else level}
        same = [a for p, a in points if p == params]
        if outside and chosen:
            warnings.warn(f"search.baselines[{i}]: {level} lies outside the range of "
                          f"{len(outside)} of {len(ranged)} groups (e.g. {outside[0]!r}: "
                          f"[{ranged[outside[0]].low}, {ranged[outside[0]].high}]); it runs "
                          "clipped into each group's range (labelled "
                          f"{attrs['baseline_ratio']})", stacklevel=2)
        if same and "baseline" in same[0]:
            warnings.warn(f"search.baselines[{i}]: {level} runs the same config as baseline "
                          f"{same[0]['baseline_ratio']} (clipped into the groups' ranges); "
                          "it is not run again", stacklevel=2)
        elif same:  # an allocation that is uniform (the cheapest config, say) is both
            same[0].update(attrs)
        else:
            points.append((params, attrs))
    return points


def warm_start_configs(space: SpaceConfig, dists: Mapping[str, FloatDistribution],
                       groups: Sequence[GroupInfo], sensitivity: Any,
                       measure: Callable[[Mapping[str, float]], float] | None = None
                       ) -> dict[float, dict[str, float]]:
    """The sensitivity allocation for each warm-start budget (nested with ``search.inherit``:
    each starts from the next dearer one's), by budget, cheapest first. A budget above
    ``constraints.max_macs_ratio`` is taken at that limit."""
    from autoprune.sensitivity import allocate

    out: dict[float, dict[str, float]] = {}
    floor: dict[str, float] | None = None
    cap = space.constraints.max_macs_ratio  # a seed over it would be infeasible: never tuned
    budgets = {b if cap is None else min(b, cap) for b in space.search.warm_start.budgets}
    for budget in sorted(budgets, reverse=True):
        out[budget] = allocate(sensitivity, groups, budget, dists, measure, floor)
        floor = out[budget] if space.search.inherit else None
    return dict(sorted(out.items()))


def coarse_to_fine(budgets: Sequence[float], dearest_first: bool = False) -> list[float]:
    """The cheapest budget, then every other one upwards, then those in between: the first
    seeds span the MACs range (most of the hypervolume), the later ones halve the steps.
    ``dearest_first`` (for ``search.inherit``) runs downwards instead: the dearest budget,
    then each at most half the last one taken, and the cheapest; then those between, dearest
    first. Every seed but the first then finds a dearer one finished, the dearest (the root of
    every chain) runs first, and a budget between two of the first pass starts from the
    closest dearer seed."""
    s = sorted(budgets)
    if not dearest_first:
        return s[:1] + s[1::2] + s[2::2]
    d = s[::-1]
    first: list[int] = []
    for i, b in enumerate(d):
        if not first or i == len(d) - 1 or b <= d[first[-1]] / 2 + 1e-9:
            first.append(i)
    return [d[i] for i in first] + [d[i] for i in range(len(d)) if i not in first]


SEED_POINTS = "seed_points"  # the study's seed points, as made at its start


def stored_seed_points(study: optuna.Study) -> list[SeedPoint] | None:
    """The seed points the study was started with (a resume reuses them: the space is the
    same), or None for a new study."""
    stored = study.user_attrs.get(SEED_POINTS)
    return None if stored is None else [(dict(p), dict(a)) for p, a in stored]


def enqueue_points(study: optuna.Study, points: Sequence[SeedPoint]) -> None:
    """Queue the seed points to run first (once per study)."""
    if study.user_attrs.get("seeds_enqueued"):
        return
    for params, attrs in points:
        study.enqueue_trial(params, user_attrs=attrs)
    study.set_user_attr("seeds_enqueued", True)


def recover_interrupted(study: optuna.Study) -> list[int]:
    """Trials left RUNNING by a killed or interrupted process: mark them failed-interrupted and
    queue them again, ahead of the queued trials that have not run yet. Optuna runs waiting
    trials oldest first; queued behind the seeds, the dearest warm-start seed (the root every
    later seed inherits from) ran after them, and they started from the base model."""
    carried = (*SEED_ATTRS, FILL_ATTR)
    lost = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not lost:
        return []
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    queue = [(dict(t.params), {k: t.user_attrs.get(k) for k in carried}) for t in lost]
    queue += [(dict(t.system_attrs.get("fixed_params") or {}),
               {k: t.user_attrs.get(k) for k in carried}) for t in waiting]
    storage = study._storage
    for t in lost:
        storage.set_trial_user_attr(t._trial_id, INTERRUPTED, True)
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    for slot, (params, attrs) in zip(waiting, queue, strict=False):  # the queue, moved back
        storage.set_trial_system_attr(slot._trial_id, "fixed_params", params)
        for key, value in attrs.items():
            if value is not None or key in slot.user_attrs:
                storage.set_trial_user_attr(slot._trial_id, key, value)
    for params, attrs in queue[len(waiting):]:
        study.enqueue_trial(params, user_attrs={k: v for k, v in attrs.items()
                                                if v is not None} or None)
    return [t.number for t in lost]


@dataclass
class TimeLimit:
    """One search run's wall-clock budget (``search.timeout``, ``--timeout``), counted from the
    run's start: once it is spent no trial starts, and the running ones finish and are recorded
    (as Optuna's ``optimize(timeout=...)``). A ``--resume`` starts a new budget."""

    seconds: float | None = None
    started: float = field(default_factory=lambda: time.monotonic())

    def reached(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.started >= self.seconds


def done_count(study: optuna.Study) -> int:
    """Trials that count toward ``search.trials``: finished, and not interrupted."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
               and not t.user_attrs.get(INTERRUPTED))


def ask(study: optuna.Study) -> optuna.Trial:
    """``study.ask()``, and give a queued trial (a seed point) its NSGA-II generation: Optuna
    only assigns one when it samples, so seed points would never become parents."""
    trial = study.ask()
    sampler = study.sampler
    if isinstance(sampler, optuna.samplers.NSGAIISampler):
        sampler.get_trial_generation(study, study._storage.get_trial(trial._trial_id))
    return trial


def suggest_ratios(trial: optuna.Trial,
                   dists: Mapping[str, FloatDistribution]) -> dict[str, float]:
    return {n: trial.suggest_float(n, d.low, d.high, step=d.step) for n, d in dists.items()}


def tell(study: optuna.Study, trial: optuna.Trial, result: TrialResult,
         objectives: Sequence[str]) -> FrozenTrial:
    """Record a trial result in the study: values, constraints and every metric as user attrs."""
    for key, value in result_attrs(result).items():
        trial.set_user_attr(key, value)
    if result.state == "failed":
        study.tell(trial, state=TrialState.FAIL)
    elif result.state == "pruned":  # stopped at a rung: never complete, never on the front
        study.tell(trial, state=TrialState.PRUNED)
    else:
        for key, value in result.constraints.items():
            trial.set_constraint(key, value)
        study.tell(trial, result.objective_values(tuple(objectives)))
    return study._storage.get_trial(trial._trial_id)


def result_attrs(result: TrialResult) -> dict[str, Any]:
    skip = ("record", "finetune_losses", "ratios", "state_dict")
    attrs = {k: _jsonable(v) for k, v in result.to_dict().items() if k not in skip}
    attrs["state"] = result.state
    return attrs


def add_result(study: optuna.Study, result: TrialResult, objectives: Sequence[str],
               dists: Mapping[str, FloatDistribution],
               user_attrs: Mapping[str, Any]) -> FrozenTrial:
    """Add a trial that ran elsewhere (Ray Tune) to the study, as ``tell`` would have."""
    failed = result.state in ("failed", "pruned")
    state = {"failed": TrialState.FAIL, "pruned": TrialState.PRUNED}.get(result.state,
                                                                       TrialState.COMPLETE)
    trial = optuna.trial.create_trial(
        state=state, values=None if failed else result.objective_values(tuple(objectives)),
        params={n: result.ratios[n] for n in dists}, distributions=dict(dists),
        user_attrs=result_attrs(result) | dict(user_attrs),
        system_attrs={} if failed else {f"constraints:{k}": float(v)
                                        for k, v in result.constraints.items()})
    study.add_trial(trial)
    return study.get_trials(deepcopy=False)[-1]


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    json.dumps(value)
    return value


def tidy_number(v: Any) -> Any:
    """A float to 10 significant digits: a ratio as its grid gives it (0.6, not Optuna's
    0.6000000000000001) in MLflow, trials.csv and ``pareto --json``; anything else as is."""
    return float(f"{v:.10g}") if isinstance(v, float) else v


def seed_role(attrs: Mapping[str, Any]) -> str | None:
    """``baseline`` or ``warm_start`` for a seed point (from a trial's user attrs), else None."""
    return "baseline" if attrs.get("baseline") else "warm_start" if attrs.get("warm_start") \
        else None


def origin(attrs: Mapping[str, Any]) -> str:
    """Where a trial's config came from: ``baseline``, ``warm_start``, ``front_fill`` (see
    :mod:`autoprune.fill`) or ``sampler``."""
    return seed_role(attrs) or ("front_fill" if attrs.get(FILL_ATTR) else "sampler")


def rung_history(study: optuna.Study) -> list[tuple[str, list[tuple[int, float, float]], bool]]:
    """Rung results of finished trials, to refill a :class:`~autoprune.fidelity.RungBook`
    (with whether each one belongs in its trust sample: seed points do not)."""
    out: list[tuple[str, list[tuple[int, float, float]], bool]] = []
    for t in study.get_trials(deepcopy=False):
        if t.state.is_finished() and t.user_attrs.get("rungs"):
            key = t.user_attrs.get("ray_trial_id") or f"t{t.number}"
            out.append((str(key), [(int(r), float(a), float(c))
                                   for r, a, c in t.user_attrs["rungs"]],
                        seed_role(t.user_attrs) is None))
    return out


def front_numbers(study: optuna.Study) -> set[int]:
    """Trial numbers on the current front (feasible trials only when constraints are used);
    a config that ran twice is on it once, as the trial that ran it."""
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return set()
    return {t.number for t in study.best_trials if t.user_attrs.get("duplicate_of") is None}
