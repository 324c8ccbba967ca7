"""A whole search: base model -> study -> controller -> records -> front.

``run_search`` is what ``autoprune search`` calls. The recording (Optuna tell, MLflow child run,
kept weights, refreshed tables and plots) happens here, in the controller process, for either
controller.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import torch
from optuna.trial import FrozenTrial

from autoprune.base import BaseMetrics
from autoprune.config import SpaceConfig, check_name, check_seed, dump_space, duration_seconds
from autoprune.errors import AutopruneError, ConfigError, environment_error, first_line
from autoprune.inherit import INHERITS_TRIAL, parent_number
from autoprune.locks import held_alone, replacing
from autoprune.preflight import preflight
from autoprune.quiet import quieter
from autoprune.report import (
    front_hypervolume,
    load_plotting,
    plot_front,
    speed_words,
    write_tables,
)
from autoprune.signals import stop_as_interrupt
from autoprune.study import (
    SEED_POINTS,
    TimeLimit,
    add_result,
    check_same_base,
    check_same_ranges,
    check_study,
    distributions,
    done_count,
    enqueue_points,
    front_numbers,
    list_studies,
    open_study,
    origin,
    recover_interrupted,
    seed_points,
    seed_role,
    stored_seed_points,
    tell,
)
from autoprune.tracking import (
    Tracker,
    absolute_uri,
    check_server,
    check_store,
    default_artifact_dir,
)
from autoprune.trial import TrialContext, TrialResult
from autoprune.watch import TrialWatch, duration

REPORT_EVERY = 5  # trials between refreshes of the parent run's tables and plots


@dataclass
class SearchSummary:
    study: str
    trials: int
    failed: int
    front: pd.DataFrame
    parent_run_id: str
    study_dir: Path
    errors: dict[str, list[int]] = field(default_factory=dict)  # first line -> failed trials
    base_accuracy: float | None = None  # the base model's score, every trial's reference
    repeats: int = 0  # trials whose config built an earlier trial's model (its result reused)
    timed_out: bool = False  # the time limit stopped it short of its trials


def study_dir(space: SpaceConfig, study: str) -> Path:
    return Path(space.runs_dir) / "studies" / study


def pruning_settings(space: SpaceConfig) -> dict[str, Any]:
    p = space.pruning
    return {"importance": p.importance, "round_to": p.round_to,
            "finetune_epochs": space.finetune.epochs, "finetune_steps": space.finetune.steps,
            "finetune_lr": space.finetune.lr, "seed": space.search.seed}


class Recorder:
    """Records each finished trial in Optuna, MLflow and ``runs/studies/<study>/``."""

    def __init__(self, space: SpaceConfig, study: optuna.Study, tracker: Tracker, out: Path,
                 progress: Any = None) -> None:  # progress: a bar, set before the trials
        self.space, self.study, self.tracker, self.out = space, study, tracker, out
        self.progress = progress
        self.lines = False  # one line per trial (output to a file or pipe: no bar to redraw)
        self.total = 0  # trials the search runs to, for those lines
        self.since_report = 0
        self.tracking_down = False  # MLflow failed: go on without it, catch up at the end
        self.ending = False  # an interrupt or an error is ending the search
        self.watch = TrialWatch(self.say)  # names a trial that runs long

    def track(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """An MLflow call that cannot stop the search: on the first failure (a server that
        went away, after MLflow's own retries) the search goes on without MLflow, and
        :meth:`catch_up` logs what it missed at the end (or ``--resume`` does)."""
        if self.tracking_down:
            return None
        try:  # MLflow's store logs its database errors with their traceback (75 lines on a
            # full disk): the first line below says it
            with quieter(logging.CRITICAL, "mlflow.store.db.utils"):
                return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never lose a trial
            self.tracking_down = True
            first = first_line(e)
            then = ("the search is ending; its trials are logged to MLflow by the next --resume"
                    if self.ending else "the search goes on without MLflow; every trial is kept "
                    f"in the Optuna study ({self.space.storage_url}) and is logged to MLflow at "
                    "the end of the search, or by the next --resume")
            _warn(f"autoprune: MLflow ({self.tracker.uri}) failed while {what}: "
                  f"{type(e).__name__}: {first}\nautoprune: {then}")
            return None

    def catch_up(self) -> None:
        """After MLflow failed: try once more to log the trials it missed."""
        if not self.tracking_down:
            return
        self.tracking_down = False
        n = self.track("logging the trials it missed", self.reconcile)
        if n is not None:
            _warn(f"autoprune: MLflow is back: logged the {n} trial(s) it missed")

    def say(self, line: str) -> None:
        """A status line: through the bar on a terminal, as a line elsewhere, none if quiet."""
        if self.progress is not None:
            self.progress.write(line, file=sys.stderr)
        elif self.lines:
            print(line, file=sys.stderr, flush=True)

    def start(self, trial: optuna.Trial, ratios: dict[str, float]) -> None:
        """A trial the local controller starts: its MLflow run opens now, with its ratios."""
        self.watch.started(f"trial {trial.number}")
        self.track(f"starting trial {trial.number}", self.tracker.start_trial, trial.number,
                   ratios, pruning_settings(self.space), origin(trial.user_attrs), time.time())

    def start_ray(self, trial_id: str, ratios: dict[str, float], came_from: str) -> None:
        """A trial Ray Tune starts: its MLflow run opens now (numbered when it is recorded)."""
        self.watch.started(f"Ray trial {trial_id}")
        self.track(f"starting Ray trial {trial_id}", self.tracker.start_trial, None, ratios,
                   pruning_settings(self.space), came_from, time.time(), trial_id)

    def requeued(self, numbers: list[int]) -> None:
        """Trials cut when a worker process died beside them: queued to run again."""
        for n in numbers:
            self.watch.finished(f"trial {n}")
            self.track(f"closing trial {n}'s run", self.tracker.drop_open, n)
        print(f"autoprune: trial(s) {numbers} ran beside the worker process that died and are "
              "queued to run again", file=sys.stderr)

    def __call__(self, trial: optuna.Trial, result: TrialResult) -> None:
        """Record a trial the local controller asked for."""
        self.watch.finished(f"trial {trial.number}")
        start = trial.datetime_start.timestamp() if trial.datetime_start else None
        for key, value in self._lineage(result).items():
            trial.set_user_attr(key, value)
        self._after(tell(self.study, trial, result, self.space.objectives), result, start)

    def add(self, result: TrialResult, user_attrs: dict[str, Any],
            dists: dict[str, Any], start: float | None = None) -> FrozenTrial:
        """Record a trial that another searcher proposed (Ray Tune's OptunaSearch)."""
        self.watch.finished(f"Ray trial {user_attrs.get('ray_trial_id')}")
        frozen = add_result(self.study, result, self.space.objectives, dists,
                            dict(user_attrs) | self._lineage(result))
        self._after(frozen, result, start)
        return frozen

    def _lineage(self, result: TrialResult) -> dict[str, Any]:
        """The trial number whose model a trial pruned (``search.inherit``)."""
        n = parent_number(self.study, result.inherits)
        return {} if n is None else {INHERITS_TRIAL: n}

    def _after(self, frozen: FrozenTrial, result: TrialResult, start: float | None) -> None:
        artifacts = self._keep(frozen.number, result)
        self.track(f"logging trial {frozen.number}", self.tracker.log_trial, frozen.number,
                   frozen.user_attrs, frozen.params, pruning_settings(self.space),
                   result.finetune_losses, start, time.time(), artifacts)
        front = front_numbers(self.study)
        self.track("tagging the front", self.tracker.update_front, front)
        self.since_report += 1
        if self.since_report >= REPORT_EVERY:
            self._refresh()
        if self.progress is not None or self.lines:
            pruned = sum(1 for t in self.study.get_trials(deepcopy=False)
                         if t.state == optuna.trial.TrialState.PRUNED)
            # the study's front: the tracker's stood still while MLflow was down
            counts = {"failed": self.failed(), "pruned": pruned, "front": len(front)}
            if self.progress is not None:
                self.progress.set_postfix(counts, refresh=False)  # one redraw per trial
                self.progress.update(1)
            else:
                print(trial_line(frozen, done_count(self.study), self.total, counts),
                      file=sys.stderr, flush=True)

    def _keep(self, number: int, result: TrialResult) -> list[Path]:
        if not result.record:
            return []
        d = self.out / "trials" / str(number)
        d.mkdir(parents=True, exist_ok=True)
        with replacing(d / "prune_record.json") as tmp:
            tmp.write_text(json.dumps(result.record))
        if result.state_dict is not None:
            with replacing(d / "weights.pt") as tmp:
                torch.save(result.state_dict, tmp)
        return [d / "prune_record.json"]

    def failed(self) -> int:
        return sum(len(v) for v in self.errors().values())

    def errors(self) -> dict[str, list[int]]:
        """Failed trials (not those a kill interrupted) by the first line of their error."""
        out: dict[str, list[int]] = {}
        for t in self.study.get_trials(deepcopy=False):
            if t.state == optuna.trial.TrialState.FAIL and not t.user_attrs.get("interrupted"):
                line = (t.user_attrs.get("error") or "unknown error").split("\n")[0]
                out.setdefault(line, []).append(t.number)
        return out

    def _refresh(self) -> None:
        """The tables and plots every few trials: a side line, which must not end the search
        (out of memory there ended one whose trials were recorded)."""
        try:
            self.report()
        except Exception as e:  # noqa: BLE001 - the trials are in the study: the end remakes it
            if (environment_error(e) or "").startswith("no space"):
                raise  # a full disk: the next record fails too, and says so
            _warn(f"autoprune: the tables and plots were not refreshed ({type(e).__name__}: "
                  f"{first_line(e)}); the search goes on, and they are remade at its end")

    def report(self, final: bool = False) -> pd.DataFrame:
        """Refresh ``trials.csv``, ``pareto.csv`` and the plots on the parent run (the
        interactive HTML pages only at the end: they embed plotly.js, ~5 MB each)."""
        self.since_report = 0
        df, tables = write_tables(self.study, self.out)
        plots = plot_front(df, self.study.user_attrs["base"], self.out / "plots", html=final,
                           study=self.study.study_name)
        self.track("logging the tables", self.tracker.log_artifacts, tables)
        self.track("logging the plots", self.tracker.log_artifacts, plots, "plots")
        done = df[df["state"] == "complete"] if not df.empty else df
        if not done.empty:
            metrics = {"front_size": float(df["pareto"].sum()),
                       "hypervolume_acc_macs": front_hypervolume(df),
                       "best_accuracy": float(done["accuracy"].max()),
                       "trials_done": float(done_count(self.study)),
                       "trials_pruned": float((df["state"] == "pruned").sum()),
                       "finetune_steps_total": float(df["finetune_steps"].fillna(0).sum())}
            tau = proxy_kendall_tau(df)
            if tau is not None:
                metrics["proxy_kendall_tau"] = tau
                self.study.set_user_attr("proxy_kendall_tau", tau)
            rho = proxy_partial_rho(df)
            if rho is not None:
                metrics["proxy_partial_rho"] = rho
                self.study.set_user_attr("proxy_partial_rho", rho)
            self.track("logging the search's metrics", self.tracker.log_parent_metrics,
                       metrics, step=done_count(self.study))
        return df

    def reconcile(self) -> int:
        """Log finished trials that MLflow does not have yet (a kill between the two writes),
        and close the runs a killed search left running."""
        trials = self.study.get_trials(deepcopy=False)
        logged = self.tracker.adopt_stale({t.number for t in trials if t.state.is_finished()
                                           and not t.user_attrs.get("interrupted")})
        missing = [t for t in trials
                   if t.state.is_finished() and t.number not in logged
                   and not t.user_attrs.get("interrupted")]
        for t in missing:
            record = self.out / "trials" / str(t.number) / "prune_record.json"
            self.tracker.log_trial(t.number, t.user_attrs, t.params, pruning_settings(self.space),
                                   (), t.datetime_start.timestamp() if t.datetime_start else None,
                                   t.datetime_complete.timestamp() if t.datetime_complete
                                   else None, [record] if record.is_file() else [])
        if missing:  # logged 'pareto: false': the front's are tagged now
            self.tracker.sync_front(front_numbers(self.study))
        return len(missing)


def trial_line(frozen: FrozenTrial, done: int, total: int, counts: dict[str, int]) -> str:
    """One finished trial as a line of the search's log, where output goes to a file or pipe:
    ``autoprune: trial 12 complete: accuracy 0.9861, macs_ratio 0.106, 2.42x faster, 1.3 s
    [13/24; failed 0, pruned 1, front 6]`` (a bar redrawn there was one line of 85 KB after
    400 trials, with no trial in it)."""
    a = frozen.user_attrs
    state = str(a.get("state", "failed"))
    what = "stopped at a rung" if state == "pruned" else state
    if (came := origin(a)) != "sampler":
        what += f" ({came.replace('_', ' ')})"
    parts = []
    score = "accuracy at the stop" if state == "pruned" else \
        "proxy accuracy" if state == "infeasible" else "accuracy"
    for key, fmt in (("accuracy", score + " {:.4f}"), ("macs_ratio", "macs_ratio {:.3f}"),
                     ("speedup", "")):
        value = a.get(key)
        if isinstance(value, (int, float)) and value == value:
            parts.append(fmt.format(value) if fmt else speed_words(value))
    if state == "failed":
        parts = [(str(a.get("error") or "unknown error").split("\n")[0])[:200]]
    parts += [f"{v:.3g} under constraints.min_accuracy" if k == "accuracy" else
              f"{v:.3g} over constraints.max_{k}"
              for k, v in (a.get("constraints") or {}).items() if v > 0]
    if a.get("duplicate_of") is not None:
        parts.append(f"the model of trial {a['duplicate_of']}, reused")
    if isinstance(a.get("duration_s"), (int, float)):
        parts.append(f"{a['duration_s']:.1f} s")
    tally = ", ".join(f"{k} {v}" for k, v in counts.items())
    return (f"autoprune: trial {frozen.number} {what}: {', '.join(parts)} "
            f"[{done}/{total}; {tally}]")


#: A base latency whose 90th percentile exceeds its median by this factor was disturbed, and
#: one measured on resume this far off the study's compares badly with it.
LATENCY_SPREAD = 1.5
#: Repeated measurements of the base latency further apart than this: latency is noise there.
LATENCY_REPEATS_APART = 1.25


def _check_latency_device(name: str, was: dict[str, Any], now: dict[str, Any]) -> None:
    """A resumed study times its trials where its base was timed (``latency.device: auto``
    would pick CUDA on a GPU machine, for a study started on a CPU)."""
    def kind(lat: dict[str, Any]) -> str:
        return "cuda" if "cuda" in str(lat.get("device", "")).lower() else "cpu"

    if was and kind(was) != kind(now):
        raise AutopruneError(
            f"latency.device: study {name!r} timed its base model on {kind(was)} "
            f"({was.get('device')}) and this machine times on {kind(now)} ({now.get('device')});"
            f" allowed: latency.device {kind(was)!r} here, or a new --study")


def _study_base(name: str, stored: dict[str, Any], base: BaseMetrics, resumed: bool,
                log: Callable[[str], None]) -> BaseMetrics:
    """The base metrics the study's trials are compared with: on resume, the study's own base
    latency (measured again, it differs by a few percent from run to run, so every trial's
    speed-up is against the one the study shows); and what makes its latency untrustworthy,
    said."""
    if resumed and stored.get("checkpoint_sha256") == base.checkpoint_sha256:
        _check_latency_device(name, stored.get("latency") or {}, base.latency)
        log(f"autoprune: --resume: speed-ups stay against the study's base latency "
            f"{stored['latency_ms']:.3f} ms (measured now: {base.latency_ms:.3f} ms)")
        drift = base.latency_ms / stored["latency_ms"] if stored["latency_ms"] else 1.0
        if not 1 / LATENCY_SPREAD <= drift <= LATENCY_SPREAD:
            _warn(f"autoprune: warning: the base latency measured now ({base.latency_ms:.3f}"
                  f" ms) is {drift:.2f}x the study's ({stored['latency_ms']:.3f} ms): the "
                  "machine or its load differs from when the study started, and the new "
                  "trials' times are measured now: their speed-ups and the earlier trials' "
                  "do not compare well")
        return _replace(base, latency_ms=stored["latency_ms"],
                        latency_p90_ms=stored["latency_p90_ms"], latency=stored["latency"])
    if not resumed and base.latency_p90_ms > LATENCY_SPREAD * base.latency_ms:
        med, p90 = base.latency_ms, base.latency_p90_ms
        _warn(f"autoprune: warning: the base model's latency varied while it was measured "
              f"(90th percentile {p90:.3f} ms, {p90 / med:.1f}x the median {med:.3f} ms): "
              "something else was using the cores. "
              "Every trial's speed-up is against this median, for the whole study; on a "
              "quieter machine, or with more latency.repeats, start it again for steadier "
              "figures")
    runs = [r for r in base.latency.get("runs_ms") or [] if r > 0]
    if not resumed and runs and max(runs) > LATENCY_REPEATS_APART * min(runs):
        cuda = "cuda" in str(base.latency.get("device", "")).lower()
        why = (f"on CUDA at batch {base.latency.get('batch_size')}, eager PyTorch waits on "
               "kernel launches, not on the model's size (an H100 timed a small ResNet at "
               "0.8 to 1.7 ms from one measurement to the next, and it with half its channels "
               "pruned at 0.8 to 1.5 ms)" if cuda else "something else was using the cores")
        _warn(f"autoprune: warning: the base model's latency differed "
              f"{max(runs) / min(runs):.2f}x between {len(runs)} measurements ("
              f"{', '.join(f'{r:.3f}' for r in runs)} ms): {why}. Trials' latencies closer "
              "than that are noise on this machine: time at your deployment's "
              "latency.batch_size, raise latency.repeats, or compare on macs")
    return base


def _warn(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)  # above a progress bar, when there is one


def _check_runs_dir(path: str) -> None:
    """``runs_dir`` must be a folder autoprune can make and write, before any work."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe = Path(path) / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError("runs_dir", path, f"a folder autoprune can create and write "
                          f"({e.strerror or e})") from None


def run_search(space: SpaceConfig, study_name: str | None = None, trials: int | None = None,
               jobs: int | None = None, resume: bool = False, seed: int | None = None,
               backend: str = "local", ray_options: dict[str, Any] | None = None,
               quiet: bool = False, timeout: float | None = None) -> SearchSummary:
    """Run (or resume) a search to ``trials`` finished trials and return its front; see
    :func:`_run_search` for the arguments. One search at a time holds a study: a second one
    (a ``--resume`` in another terminal) took the first's running trial for one a dead process
    left, and the first then crashed recording it."""
    name = study_name or space.name
    check_name(name, "--study" if study_name is not None else "name")
    _check_runs_dir(space.runs_dir)
    lock = search_lock(space, name)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError("search.storage", space.storage_url, f"a store in a folder autoprune "
                          f"can create and write ({e.strerror or e})") from None
    with held_alone(lock,
                    f"--study: study {name!r} is being searched by another process on this "
                    f"machine; allowed: wait for it to end, stop it (Ctrl-C: --resume goes on "
                    f"from there), or another --study"):
        return _run_search(space, study_name, trials, jobs, resume, seed, backend, ray_options,
                           quiet, timeout)


def search_lock(space: SpaceConfig, name: str) -> Path:
    """The lock file a search of study ``name`` holds: beside a ``sqlite:///`` store (whatever
    runs dir names it), else in the study's folder."""
    url = space.storage_url
    if url.startswith("sqlite:///"):
        db = Path(url.removeprefix("sqlite:///"))
        return db.with_name(f".{db.name}.{name}.search.lock")
    return study_dir(space, name) / ".search.lock"


def _run_search(space: SpaceConfig, study_name: str | None = None, trials: int | None = None,
                jobs: int | None = None, resume: bool = False, seed: int | None = None,
                backend: str = "local", ray_options: dict[str, Any] | None = None,
                quiet: bool = False, timeout: float | None = None) -> SearchSummary:
    """Run (or resume) a search to ``trials`` finished trials and return its front.

    Args:
        space: the validated search space.
        study_name: defaults to the space name.
        trials: total trials (overrides ``search.trials``).
        jobs: trials at once (overrides ``search.jobs``; on Ray, ``--concurrency`` wins).
        resume: continue an existing study (and its MLflow parent run).
        seed: overrides ``search.seed``.
        backend: ``local`` (Optuna in-process) or ``ray`` (Ray Tune).
        ray_options: address, concurrency, resources for the Ray backend.
        quiet: no progress bar.
        timeout: this run's time budget in seconds (overrides ``search.timeout``), counted from
            now: base training and the sensitivity scan spend it too. Once it is spent no trial
            starts; the running ones finish.
    """
    from tqdm import tqdm

    limit = TimeLimit(timeout if timeout is not None else
                      duration_seconds(space.search.timeout, "search.timeout"))
    for flag, count in (("--trials", trials), ("--jobs", jobs)):
        if count is not None and count <= 0:
            raise ConfigError(flag, count, "an integer > 0")
    if study_name is not None:
        check_name(study_name, "--study")
    if seed is not None:
        check_seed(seed, "--seed")
        space = space.replace(search=_replace(space.search, seed=seed))
    if space.tracking.uri:  # relative to this directory, which export (from anywhere) can't know
        space = space.replace(tracking=_replace(space.tracking,
                                                uri=absolute_uri(space.tracking.uri)))
    name = study_name or space.name
    total = trials or space.search.trials
    load_plotting()  # at the start: an interrupt during its first import had no handler to see
    check_server(space.tracking_uri)  # before any work: an MLflow server that does not answer
    check_store(space.tracking_uri, space.experiment_name)  # or a store that cannot be read
    if backend == "ray":
        from autoprune.controllers.ray_tune import check_address

        check_address((ray_options or {}).get("address"))
    existing = check_study(space, name, resume)  # before minutes of base training
    out = study_dir(space, name)
    log = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr))

    from autoprune.measure import threads_warning

    slow = threads_warning(space.latency.threads,
                           1 if backend == "ray" else jobs or space.search.jobs or 1)
    if slow:  # not silenced by --quiet: it changes what is measured
        _warn(slow)
    log(f"autoprune: preparing the base model for {space.model.source} on {space.data.source}")
    # fails here, before any trial, on bad sources, and before base training on a space
    # that cannot be searched
    def checks(first: TrialContext) -> None:
        preflight(first)
        if existing is not None:
            check_same_base(name, existing, space)

    ctx = TrialContext.build(space, check=checks)
    dists = distributions(space, ctx.groups)
    log(f"autoprune: base accuracy {ctx.base.accuracy:.4f}, {ctx.base.macs / 1e6:.2f} MMACs, "
        f"latency {ctx.base.latency_ms:.3f} ms; {len(dists)} groups to search")

    if resume and name not in list_studies(space.storage_url):  # shown with --quiet: a
        # mistyped --study would otherwise start a new study without a word
        _warn(f"autoprune: --resume: no study {name!r} in {space.storage_url} yet; starting it")
    study = open_study(space, name, resume, space.search.seed, ctx.base)
    if existing is not None:
        check_same_ranges(name, study, dists)
        _warn_older_rounding(study, ctx)
    ctx.base = _study_base(name, study.user_attrs.get("base") or {}, ctx.base,
                           resumed=existing is not None, log=log)
    lost = recover_interrupted(study) if resume else []
    if lost:
        log(f"autoprune: re-queued trials interrupted by the last run: {lost}")
    sens = None
    points = stored_seed_points(study)
    if space.search.warm_start.sensitivity:
        from autoprune.sensitivity import Sensitivity, cache_path, cached_scan

        own = out / "sensitivity.json"  # the scan that seeded the study, kept with it
        if points is not None and own.exists() and \
                not cache_path(ctx, list(space.search.warm_start.ratios)).exists():
            # its seeds are stored: a scan missing from the cache (deleted, or keyed by an
            # older autoprune's rounding rule) would only redraw the heatmap, for minutes
            sens = Sensitivity(**json.loads(own.read_text()))
            log("autoprune: sensitivity: the study's own scan (its seeds are stored)")
        else:
            sens, cached = cached_scan(ctx, progress=not quiet, log=log)
            log(f"autoprune: sensitivity {'from the cache' if cached else 'scanned'}")
    if points is None:  # counting each allocation's MACs takes minutes on a large model: once
        allocated = None
        if sens is not None:
            from autoprune.sensitivity import cached_warm_start

            allocated = cached_warm_start(ctx, sens, dists)[0]
        points = seed_points(space, dists, allocated)
        study.set_user_attr(SEED_POINTS, [[p, a] for p, a in points])
    if backend != "ray":  # on Ray the seed points go to OptunaSearch as points_to_evaluate
        enqueue_points(study, points)

    out.mkdir(parents=True, exist_ok=True)
    # the space as this run runs it: --trials and --jobs in (MLflow showed the file's values)
    # trials at once. Ray: --concurrency, else --jobs or the space's search.jobs, else (None)
    # as many as fit; locally --jobs, else search.jobs, else 1
    ran_jobs = ((ray_options or {}).get("concurrency") or jobs or space.search.jobs
                if backend == "ray" else jobs or space.search.jobs or 1)
    ran = space.replace(search=_replace(space.search, trials=total, jobs=ran_jobs,
                                        timeout=limit.seconds))
    dump_space(ran, out / "space.yaml")
    tracker = Tracker(space.tracking_uri, space.experiment_name, name,
                      default_artifact_dir(space.runs_dir))
    old_parent = study.user_attrs.get("parent_run_id")
    parent = tracker.start_parent(ran, ctx.base, old_parent, out / "space.yaml")
    recorder = Recorder(space, study, tracker, out)
    status, timed_out, ended = "FAILED", False, False
    df = pd.DataFrame()
    # from here the parent run is RUNNING: a SIGTERM or SIGHUP ends the search as Ctrl-C does
    # (the controllers hold them back around each record), and the run is closed whatever ends
    # it, the final tables' remaking cut short included
    with stop_as_interrupt():
        try:
            study.set_user_attr("parent_run_id", parent)
            if old_parent and parent != old_parent:
                _warn(f"autoprune: the study's MLflow parent run {old_parent} is not in "
                      f"experiment {space.experiment_name!r} of {space.tracking_uri} (tracking "
                      f"changed, or the store was moved or deleted): started parent run "
                      f"{parent} there, and the finished trials are logged to it")
            made_with = study.user_attrs.get("space") or {}
            if made_with and made_with.get("tracking") != space.to_dict()["tracking"]:
                # tracking may change on resume: export and pareto look runs up where they are
                study.set_user_attr("space", {**made_with,
                                              "tracking": space.to_dict()["tracking"]})
            if sens is not None:
                from autoprune.sensitivity import plot_heatmap

                (out / "sensitivity.json").write_text(json.dumps(sens.to_dict(), indent=1))
                tracker.log_artifacts([plot_heatmap(sens, out / "sensitivity.png"),
                                       out / "sensitivity.json"])
            already = done_count(study)
            if already >= total:  # --trials is the study's total, not a number to add
                log(f"autoprune: study {name!r} already holds {already} finished trials, as "
                    f"many as --trials {total} asks for (the study's total): nothing to run")
            # shown with --quiet too: it changes what the search runs (the baselines may not)
            _warn_seeds_left(study, points if backend == "ray" and not resume else None,
                             already, total, space.search.population_size,
                             lambda msg: print(msg, file=sys.stderr),
                             space.search.warm_start.sensitivity)
            # a bar on a terminal; a line per trial where output goes to a file or a pipe
            tty = sys.stderr.isatty()
            recorder.progress = None if quiet or not tty else tqdm(
                total=total, initial=min(already, total), unit="trial", desc=f"search {name}",
                file=sys.stderr)
            recorder.lines, recorder.total = not quiet and not tty, total
            recorder.reconcile()
            with recorder.watch:  # a line for a trial that runs long
                if backend == "ray":
                    from autoprune.controllers.ray_tune import run_ray

                    opts = {**(ray_options or {}), "concurrency": ran_jobs}
                    run_ray(ctx, study, total, dists, recorder, points=points, resume=resume,
                            limit=limit, **opts)
                else:
                    from autoprune.controllers import run_local

                    run_local(ctx, study, total, ran_jobs or 1, dists, recorder,
                              space.search.keep_models, on_start=recorder.start, limit=limit,
                              on_requeue=recorder.requeued)
            timed_out = limit.reached() and done_count(study) < total
            if timed_out:  # shown with --quiet: the study is short of what was asked
                before = ("; preparing the base model (and the sensitivity scan) spent it, "
                          "and both are cached for the next run" if done_count(study) == already
                          else "")
                print(f"autoprune: time limit reached ({duration(limit.seconds or 0)}, counted "
                      f"from this run's start): {done_count(study)} of {total} trials finished; "
                      f"no trial started after it and the running ones finished{before}. The "
                      "same command with --resume runs the rest, with a new time budget",
                      file=sys.stderr)
            # a search whose every trial failed is one (the CLI exits 1): not FINISHED in MLflow
            failed = recorder.failed()
            status = "FAILED" if failed and failed == done_count(study) else "FINISHED"
            ended = True
        except KeyboardInterrupt:
            status = "KILLED"
            if backend != "ray":  # Optuna would show them RUNNING until the next --resume
                cut = recover_interrupted(study)
                if cut:
                    log(f"autoprune: interrupted trials {cut} are queued to run again with "
                        "--resume")
            raise
        finally:
            recorder.ending = not ended
            try:
                if recorder.progress is not None:
                    recorder.progress.close()
                recorder.catch_up()
                try:
                    df = recorder.report(final=True)
                except Exception as e:  # noqa: BLE001 - an interrupt or error is on its way:
                    if ended:  # the news, which this one must not replace
                        status = "FAILED"  # the command fails: so does the parent run
                        raise
                    what = "interrupt" if status == "KILLED" else "error below"
                    print(f"autoprune: the tables and plots were not remade after the {what} "
                          f"({type(e).__name__}: {str(e)[:300]}); --resume remakes them",
                          file=sys.stderr)
            except KeyboardInterrupt:  # while the tables were remade: they are not all there
                status = "KILLED"
                raise
            finally:
                recorder.track("closing the interrupted trials' runs", tracker.close_open)
                recorder.track("closing the search's run", tracker.finish_parent, status,
                               "time limit" if timed_out else None)
    front = df[df["pareto"]].sort_values("accuracy", ascending=False) if not df.empty else df
    return SearchSummary(name, done_count(study), recorder.failed(), front, parent, out,
                         recorder.errors(), study.user_attrs["base"].get("accuracy"),
                         sum(t.user_attrs.get("duplicate_of") is not None
                             for t in study.get_trials(deepcopy=False)), timed_out)


def _warn_older_rounding(study: optuna.Study, ctx: TrialContext) -> None:
    """A study an older autoprune began rounds some ratios to other channel counts than its
    new trials will (sweep V: 0.35 of 40 kept 24 in the old trials, 28 in the new, without a
    word). Said once: the study is stamped with today's rule after."""
    from autoprune.study import older_rounding, stamp_rounding

    older = older_rounding(study, ctx.groups, ctx.space.pruning.round_to)
    if older:
        _warn(f"autoprune: warning: --resume: {len(older)} trial(s) of study "
              f"{study.study_name!r} were pruned by an older autoprune, which rounded some "
              f"half-way channel counts down ({older[0]}): they keep the channels recorded "
              "(kept.<group> in trials.csv; export re-makes them so), and trials from now on "
              "round half-way counts up, so one ratio may keep two counts in this study")
    stamp_rounding(study)


def _warn_seeds_left(study: optuna.Study, ray_points: Sequence[Any] | None, done: int,
                     total: int, generation: int, log: Callable[[str], None],
                     warm_start: bool = True) -> None:
    """Say so when the trials left are no more than the queued seed points (warm starts,
    uniform baselines): they run first, so the sampler would propose nothing."""
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    queued = len(ray_points) if ray_points is not None else len(waiting)
    # a sampler's trial cut by an interrupt waits in the queue too: it is no seed
    again = 0 if ray_points is not None else \
        sum(seed_role(t.user_attrs) is None for t in waiting)
    left = total - done
    if 0 < left <= queued:
        kinds = "sensitivity warm starts, uniform baselines" if warm_start else \
            "uniform baselines"
        rest = "" if queued == left else (
            f"; the other {queued - left} wait for a later --resume" if ray_points is None
            else f"; the other {queued - left} do not run")
        what = (f"{queued} seed configs ({kinds})" if not again else
                f"{queued} queued configs ({again} interrupted trial(s) to run again, "
                f"{queued - again} seed configs: {kinds})")
        log(f"autoprune: {what} run before any proposal, and the trial count (--trials or "
            f"search.trials) leaves {left} to run: {left} of them run and the sampler "
            f"proposes none{rest}. "
            f"{done + queued + generation} trials or more also run a generation of proposals")


def _models(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """``columns`` of the complete trials, each model once: a trial that reused an earlier
    trial's model (``duplicate_of``) repeats its (proxy, accuracy) pair, and counted again it
    moved the Kendall tau by 0.11 in a 13-trial study with 4 such trials."""
    done = df[df["state"] == "complete"]
    if "duplicate_of" in done:
        done = done[done["duplicate_of"].isna()]
    return done[columns].dropna()


def proxy_kendall_tau(df: pd.DataFrame) -> float | None:
    """Rank correlation between the adaptive-BN proxy and the final accuracy (complete trials):
    how far a user can trust the proxy to stop trials early on this model."""
    from scipy.stats import kendalltau

    done = _models(df, ["proxy_accuracy", "accuracy"])
    if len(done) < 3 or done["proxy_accuracy"].nunique() < 2 or done["accuracy"].nunique() < 2:
        return None
    return float(kendalltau(done["proxy_accuracy"], done["accuracy"]).statistic)


def proxy_partial_rho(df: pd.DataFrame) -> float | None:
    """What the proxy knows beyond the MACs: partial Spearman correlation of (proxy, final
    accuracy | MACs ratio) over complete trials (near 0: it only repeats the cost)."""
    from autoprune.fidelity import partial_spearman

    done = _models(df, ["proxy_accuracy", "accuracy", "macs_ratio"])
    if len(done) < 4:
        return None
    return partial_spearman(done["proxy_accuracy"], done["accuracy"], done["macs_ratio"])


def _replace(obj: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **changes)
