"""Ray Tune controller: the same trial function, sampler and records, on a Ray cluster.

``OptunaSearch`` wraps the space's sampler with ``metric``/``mode`` lists (multi-objective is
only accepted there, not on ``TuneConfig``); the uniform baselines go in as
``points_to_evaluate``. The driver is the single writer: a Tune callback adds every finished trial
to the autoprune study (SQLite) and to MLflow, so workers need neither. The base weights travel
in Ray's object store, so worker nodes need no shared filesystem.

No Tune scheduler is used: Ray's single-metric schedulers (ASHA) would record early-stopped
trials as complete, with under-trained accuracy, and pollute the front.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import ray
import torch
from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from autoprune.dedup import (
    SeenConfigs,
    mark_twin,
    remember,
    reuser,
    structure_key,
    study_entries,
)
from autoprune.errors import AutopruneError
from autoprune.fidelity import RungBook, book_args, promoter
from autoprune.fill import FILL_ATTR
from autoprune.inherit import ParentModels, inheritor, load_kept, offer
from autoprune.signals import STOP_SIGNALS, STOPPED_BY, handling
from autoprune.sources._models import cpu_state
from autoprune.study import (
    INTERRUPTED,
    SeedPoint,
    TimeLimit,
    directions,
    done_count,
    make_sampler,
    origin,
    rung_history,
    sampler_seed,
    seed_role,
)
from autoprune.trial import OBJECTIVES, TrialContext, TrialResult, run_trial

if TYPE_CHECKING:
    from autoprune.search import Recorder

_CTX: TrialContext | None = None  # one per worker process, reused across trials
SEED_KEY = "autoprune_seed"  # in a Tune config: the trial is one of ``points_to_evaluate``


ADDRESS_FORMS = ("auto (a cluster started on this machine with `ray start`), host:port of a "
                 "head node, or ray://host:10001")


def check_address(address: str | None, timeout: float = 5.0) -> None:
    """The cluster at ``address`` must accept a connection, checked in seconds before any
    work: ``ray.init`` retries an unreachable one for minutes, after the base model and the
    scan. ``auto`` is looked up as Ray looks it up (``RAY_ADDRESS``, then the cluster last
    started on this machine), and a loopback address is checked where Ray will dial it."""
    if address in (None, "", "local"):
        return
    address = str(address)
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if address != "auto" and (not host or not port.isdigit()):
        raise AutopruneError(f"--address: got {address!r}; allowed: {ADDRESS_FORMS}")
    dialled = address.split("://", 1)[-1] if "://" in address else _dialled(address)
    if dialled is None:
        raise AutopruneError(f"--address auto: no Ray cluster runs on this machine (no "
                             "RAY_ADDRESS, and no head started here with `ray start --head`); "
                             f"allowed: {ADDRESS_FORMS}")
    host, _, port = dialled.rpartition(":")
    note = ("" if dialled == address else
            f" (found at {dialled}: RAY_ADDRESS, or the head last started here, which may have "
            "stopped)" if address == "auto" else
            f" (Ray dials it as {dialled}{_loopback_hint(host)})")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise AutopruneError(f"--address {address}: cannot reach a Ray cluster there{note} "
                             f"({e}); allowed: {ADDRESS_FORMS}") from None


def _dialled(address: str) -> str | None:
    """The ``host:port`` that ``ray.init(address)`` connects to: Ray replaces a loopback host
    with this machine's outward address, and finds ``auto``'s cluster; None when it finds
    none. Ray's own resolver, so the check and the connection agree."""
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # a Ray without it: check the address as given
        return None if address == "auto" else address
    try:
        return canonicalize_bootstrap_address(address)
    except ConnectionError:
        return None


def _loopback_hint(dialled_host: str) -> str:
    """Why a loopback address was dialled elsewhere, and how to keep it on loopback."""
    if dialled_host.strip("[]") in ("127.0.0.1", "localhost", "::1"):
        return ""
    return ("; a cluster that listens on 127.0.0.1 only is reached with "
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 set here too")


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Start a local Ray whose processes all listen on 127.0.0.1.

    On Linux Ray gives even a one-machine instance the machine's outward address, and its
    gRPC servers listen on every interface: an unauthenticated control plane open to the
    network for a search that needs no other machine. On macOS and Windows it uses 127.0.0.1;
    take that path here (``ray_constants.ENABLE_RAY_CLUSTER``, what the
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` variable sets, is read when the address is chosen).
    Once started, the node's address (127.0.0.1) is what Ray reports in every process.
    """
    from ray._private import ray_constants

    before = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if before is None:  # a Ray without the switch: listen where it decides
        yield
        return
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def connect(address: str | None, num_cpus: int | None = None) -> None:
    """Connect to a cluster, or start a local one that ignores stale cluster files.

    ``address=None`` starts a fresh local Ray (``address="local"``): a stale
    ``/tmp/ray/ray_current_cluster`` left by a killed head would otherwise make ``ray.init``
    try to join a cluster that is gone.
    """
    if ray.is_initialized():
        return
    from ray.exceptions import AuthenticationError

    try:
        if address in (None, "", "local"):
            with _loopback_only():
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                         log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except AuthenticationError as e:
        raise AutopruneError(
            f"--address {address}: the cluster refused this client's token ({e}). Ray 2.60 "
            "turns token authentication on by default: copy the cluster's token to "
            "~/.ray/auth_token or set RAY_AUTH_TOKEN, and keep RAY_AUTH_MODE the same on the "
            "head, the workers and this client (see README, 'On a Ray cluster', "
            "Authentication)") from e
    except ConnectionError as e:
        hint = ("" if os.environ.get("RAY_AUTH_MODE") else
                "; if the head was started with token authentication (Ray's default for `ray "
                "start`, shown as InvalidAuthToken warnings above), set RAY_AUTH_MODE=token and "
                "the cluster's token here (see README, 'On a Ray cluster', Authentication)")
        raise AutopruneError(f"--address {address}: cannot reach a Ray cluster there ({e}); "
                             f"allowed: {ADDRESS_FORMS}{hint}") from e


def _trainable(config: dict[str, float], payload: dict[str, Any]) -> None:
    """The Tune function trainable: one :func:`run_trial`, one report."""
    global _CTX
    _enter(payload["cwd"])
    if _CTX is None:
        from autoprune.base import BaseMetrics
        from autoprune.config import parse_space

        torch.set_num_threads(max(1, int(payload["threads"])))
        _CTX = TrialContext.build(parse_space(payload["space"]),
                                  BaseMetrics.from_dict(payload["base"]),
                                  device=payload["device"], base_state=payload["base_state"])
    book = payload.get("book")
    role = role_of(config, payload["seeds"])
    promote = promoter(book, tune.get_context().get_trial_id(), role, _CTX.space.search.inherit) \
        if book is not None else None
    models = payload.get("models")
    inherit = inheritor(models) if models is not None and role != "baseline" else None
    result = run_trial(_CTX, _ratios(config), promote=promote, reuse=reuser(payload["seen"]),
                       keep_model=models is not None, inherit=inherit)
    if models is not None:
        offer(models, result)  # the weights go to the actor, not through Tune
    metrics = result_to_metrics(result)
    metrics["node_id"] = ray.get_runtime_context().get_node_id()
    metrics["pid"] = os.getpid()
    tune.report(metrics)


def _enter(cwd: str) -> None:
    """Run trials where the search was started, as local trials run. Tune starts each in a
    folder of its own, where a relative path in the user's code (a data file, an image
    folder) was not found: every trial failed on Ray that ran locally. On a node without that
    folder the worker stays where Ray started it (a job's uploaded working directory)."""
    if os.path.isdir(cwd) and os.getcwd() != cwd:
        os.chdir(cwd)


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """``name=value`` in this process's environment (unless the user set it) for the block:
    Tune copies it to the trial actors it starts then."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def role_of(config: Mapping[str, Any],
            seeds: Sequence[tuple[dict[str, float], str | None]]) -> str | None:
    """A seed point's role in the rungs (see :func:`autoprune.fidelity.promoter`). Only a
    trial Tune took from ``points_to_evaluate`` has one (the searcher marks it, see
    :meth:`AutopruneSearch.suggest`): a sampler's proposal of the same config is a candidate
    like any other, as on the local controller."""
    if not config.get(SEED_KEY):
        return None
    return next((role for params, role in seeds if params == _ratios(config)), None)


def _ratios(config: Mapping[str, Any]) -> dict[str, float]:
    """A Tune config's ratios, without the searcher's seed mark."""
    return {k: v for k, v in config.items() if k != SEED_KEY}


def error_text(error: BaseException) -> str:
    """A trial's error as the local controller records it: ``Type: message``, then the
    traceback. A worker's exception comes wrapped in a ``RayTaskError``, whose text starts
    with a banner (actor, pid, colour codes) that hid the user's message in the summary."""
    cause = getattr(error, "cause", None)
    first = cause if isinstance(cause, BaseException) else error
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    return f"{type(first).__name__}: {first}\n{text}"


def result_to_metrics(result: TrialResult) -> dict[str, Any]:
    """A flat, picklable result for Tune (failed trials report NaN objectives)."""
    d = result.to_dict()
    for key in ("record", "kept_channels", "constraints", "finetune_losses", "ratios", "rungs",
                "duplicate_of", "inherits"):
        d[key] = json.dumps(d[key])
    return d


def metrics_to_result(metrics: Mapping[str, Any], ratios: Mapping[str, float]) -> TrialResult:
    fields = TrialResult.__dataclass_fields__
    kw = {k: v for k, v in metrics.items() if k in fields and k != "state_dict"}
    for key in ("record", "kept_channels", "constraints", "finetune_losses", "rungs",
                "duplicate_of", "inherits"):
        if isinstance(kw.get(key), str):
            kw[key] = json.loads(kw[key])
    kw["finetune_losses"] = [tuple(x) for x in kw.get("finetune_losses", [])]
    kw["rungs"] = [tuple(x) for x in kw.get("rungs", [])]
    kw["ratios"] = dict(ratios)
    return TrialResult(**kw)


def run_ray(ctx: TrialContext, study: optuna.Study, total: int,
            dists: dict[str, optuna.distributions.FloatDistribution], recorder: Recorder,
            points: list[SeedPoint] | None = None,
            address: str | None = None, concurrency: int | None = None,
            cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0, max_failures: int = 2,
            resume: bool = False, limit: TimeLimit | None = None) -> None:
    """Run the search on Ray Tune until the study holds ``total`` finished trials.

    Fine-tuned weights stay on the workers, except with ``search.inherit``: the parent actor
    holds them, and with ``search.keep_models`` the driver saves them as it records each trial,
    so a resumed search reloads its parents. Export re-makes a trial without kept weights from
    its seed (and its parent chain).

    Args:
        ctx: the trial context built by the driver (base model trained and measured).
        study: the autoprune study; every finished Tune trial is added to it.
        total: trials wanted in the study.
        dists: the ratio distributions.
        recorder: records each finished trial (Optuna study, MLflow, files).
        points: seed points (uniform baselines, warm starts) to evaluate first.
        address: Ray address; None starts a local Ray.
        concurrency: trials at once (``max_concurrent_trials``).
        cpus_per_trial: CPUs per trial; the trial's torch threads follow it.
        gpus_per_trial: GPUs per trial.
        max_failures: retries of a trial whose worker died.
        resume: restore the Tune experiment of an interrupted driver.
        limit: the run's time budget: once reached, the searcher proposes no more trials and
            those running finish.
    """
    limit = limit or TimeLimit()
    args = (ctx, study, total, dists, recorder, points, address, concurrency, cpus_per_trial,
            gpus_per_trial, max_failures, limit)
    for attempt in range(ROUNDS):
        _run_round(*args, resume=resume and attempt == 0)
        short = total - done_count(study)
        if short <= 0 or limit.reached():
            return
        # A trial whose node died before it started can end in Tune with neither a result nor
        # its config, and a restored experiment may have had fewer trials left than the new
        # total asks: either way the study is short. Run that many more.
        then = f"running {short} more" if attempt < ROUNDS - 1 else "giving up"
        why = ("the restored experiment had no more to run" if resume and attempt == 0
               else "trials ended with nothing to record: a node lost before they started")
        print(f"autoprune: the study is {short} trial(s) short of {total} ({why}); {then}",
              file=sys.stderr)


ROUNDS = 3  # Tune experiments per run_ray, when trials are lost before they start


def _run_round(ctx: TrialContext, study: optuna.Study, total: int,
               dists: dict[str, optuna.distributions.FloatDistribution], recorder: Recorder,
               points: list[SeedPoint] | None, address: str | None, concurrency: int | None,
               cpus_per_trial: float, gpus_per_trial: float, max_failures: int,
               limit: TimeLimit, resume: bool) -> None:
    """One Tune experiment (fresh, or restored with ``resume``) towards ``total`` trials."""
    connect(address)
    space = ctx.space
    storage = Path(space.runs_dir).resolve() / "ray"
    exp_path = storage / study.study_name
    base_state = cpu_state(ctx.base_model.state_dict())
    payload = {"space": space.to_dict(), "base": ctx.base.to_dict(), "base_state": base_state,
               "threads": max(1, int(cpus_per_trial)), "cwd": os.getcwd(),
               "device": "cuda" if gpus_per_trial > 0 else "cpu",
               "seeds": [(dict(p), seed_role(a)) for p, a in points or []]}
    fid = space.search.fidelity
    # The bookkeeping actors live on the driver's node: a worker node may die mid-search.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    if fid.enabled:  # the rung book lives in an actor, refilled from the study
        actor: Any = ray.remote(RungBook)
        book = actor.options(num_cpus=0, scheduling_strategy=here).remote(*book_args(fid))
        ray.get(book.load.remote(rung_history(study)))
        payload["book"] = book
    # finished configs, so a config proposed again reuses its result (see autoprune.dedup)
    seen_actor: Any = ray.remote(SeenConfigs)
    seen = seen_actor.options(num_cpus=0, scheduling_strategy=here).remote()
    ray.get(seen.load.remote(study_entries(study)))
    payload["seen"] = seen
    models = None
    if space.search.inherit:  # the front's fine-tuned models, for trials to start from
        from autoprune.search import study_dir

        models_actor: Any = ray.remote(ParentModels)
        models = models_actor.options(num_cpus=0, scheduling_strategy=here).remote()
        load_kept(models, study, study_dir(space, study.study_name) / "trials")  # on resume
        payload["models"] = models
    trainable = tune.with_resources(tune.with_parameters(_trainable, payload=payload),
                                    {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
    points = list(points or [])
    callback = RecordCallback(recorder, dists, points, total, seen,
                              models if space.search.keep_models else None)

    if resume and exp_path.exists() and tune.Tuner.can_restore(str(exp_path)):
        tuner = tune.Tuner.restore(str(exp_path), trainable, resume_unfinished=True,
                                   resume_errored=True)
        # callbacks are not part of the saved state: re-attach the recorder
        if tuner._local_tuner is None:
            raise AutopruneError("--resume on Ray needs a driver on the cluster (use `ray job "
                                 "submit` / `autoprune submit`), not a ray:// client")
        tuner._local_tuner._run_config.callbacks = [callback]
        # and the restored searcher, which Tune refills in place from the experiment: it
        # tells which trials were front fills (they were recorded as the sampler's)
        restored = tuner._local_tuner._tune_config.search_alg
        if isinstance(restored, AutopruneSearch):
            callback.searcher = restored
            restored.limit = limit  # this run's budget, not the saved one's
    else:
        remaining = total - done_count(study)
        if remaining <= 0:
            return
        done_params = [t.params for t in study.get_trials(deepcopy=False)
                       if t.state.is_finished() and not t.user_attrs.get(INTERRUPTED)]
        todo = [p for p, _a in points if p not in done_params][:remaining]
        objectives = list(space.objectives)
        searcher = callback.searcher = AutopruneSearch(
            space=dict(dists), metric=[OBJECTIVES[o][1] for o in objectives],
            mode=[d[:3] for d in directions(objectives)], points_to_evaluate=todo or None,
            sampler=make_sampler(space, sampler_seed(space.search.seed, study)))
        searcher.limit = limit
        # A resumed search's sampler starts from the trials already finished (NSGA-II's
        # population, the front to fill), as the local controller's does from its study.
        searcher.add_finished(study)
        if exp_path.exists():  # an experiment of an earlier, finished or abandoned invocation
            shutil.rmtree(exp_path)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=remaining,
                                        max_concurrent_trials=concurrency, reuse_actors=True),
            run_config=tune.RunConfig(
                name=study.study_name, storage_path=str(storage),
                failure_config=tune.FailureConfig(max_failures=max_failures),
                stop=EnoughTrials(space.storage_url, study.study_name, total),
                callbacks=[callback], verbose=0))
    try:
        # Tune prints its experiment box and paths to stdout whatever the verbosity: keep
        # stdout for the search's result (the front table)
        with _watch_sigint() as ctrl_c, contextlib.redirect_stdout(sys.stderr), \
                _env("RAY_CHDIR_TO_TRIAL_DIR", "0"):  # see _enter
            results = tuner.fit()
        _record_missing(results, callback)
        if ctrl_c["hit"]:  # Tune saved the experiment and returned: stop, for --resume
            raise KeyboardInterrupt
    finally:
        if address in (None, "", "local"):
            ray.shutdown()


@contextlib.contextmanager
def _watch_sigint() -> Iterator[dict[str, bool]]:
    """Whether a Ctrl-C reached ``tuner.fit()``. Tune catches the first SIGINT itself, saves
    the experiment, returns as if done, and puts the handler it found back; that handler is
    ours, so finding it installed again afterwards means Tune caught one. Without that, the
    short study looked like trials lost with a node, and a new round ran them all again."""
    state = {"hit": False}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = signal.getsignal(signal.SIGINT)

    def ours(sig: int, frame: Any) -> None:  # Tune's own handler off: a plain interrupt
        state["hit"] = True
        raise KeyboardInterrupt

    def as_ctrl_c(sig: int, frame: Any) -> None:
        """SIGTERM or SIGHUP (a scheduler, a closed terminal) killed the driver at once, its
        MLflow parent run left RUNNING: it is a Ctrl-C, to whichever handler takes that."""
        STOPPED_BY.append(sig)
        os.kill(os.getpid(), signal.SIGINT)

    signal.signal(signal.SIGINT, ours)
    try:
        with handling(STOP_SIGNALS, as_ctrl_c):
            yield state
    finally:
        tune_catches = not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0"))
        if tune_catches and signal.getsignal(signal.SIGINT) is ours:
            state["hit"] = True
        signal.signal(signal.SIGINT, previous)


class AutopruneSearch(OptunaSearch):
    """``OptunaSearch`` that tells its study what the local controller tells it.

    A trial stopped at a rung is told PRUNED, not COMPLETE with its under-trained accuracy
    (which would make it a parent), and a failed one FAIL; a seed point from
    ``points_to_evaluate`` gets its NSGA-II generation, which Optuna only assigns when it
    samples (see :func:`autoprune.study.ask`), so it can become a parent.
    """

    limit: TimeLimit | None = None  # the run's time budget: spent, no more trials

    def suggest(self, trial_id: str) -> Any:
        if self.limit is not None and self.limit.reached():
            return Searcher.FINISHED  # Tune starts no more, and ends when the running finish
        params = super().suggest(trial_id)
        study: optuna.Study = self._ot_study  # type: ignore[assignment]
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            return params
        frozen = study._storage.get_trial(ot_trial._trial_id)
        if isinstance(study.sampler, optuna.samplers.NSGAIISampler):
            study.sampler.get_trial_generation(study, frozen)
        if isinstance(params, dict) and "fixed_params" in frozen.system_attrs:
            params = {**params, SEED_KEY: True}  # a seed point (enqueued), not a proposal
        return params

    def add_finished(self, study: optuna.Study) -> None:
        """Copy ``study``'s finished trials (not the interrupted ones) into the searcher's own
        in-memory study, with their generations and attributes."""
        ot_study: optuna.Study = self._ot_study  # type: ignore[assignment]
        ot_study.add_trials([t for t in study.get_trials(deepcopy=True)
                             if t.state.is_finished() and not t.user_attrs.get(INTERRUPTED)])

    def is_fill(self, trial_id: str) -> bool:
        """Whether the sampler proposed this trial as a front fill (see autoprune.fill)."""
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            return False
        study: optuna.Study = self._ot_study  # type: ignore[assignment]
        return bool(study._storage.get_trial(ot_trial._trial_id).user_attrs.get(FILL_ATTR))

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        state = (result or {}).get("state")
        if state in ("pruned", "failed") and trial_id in self._ot_trials \
                and trial_id not in self._completed_trials:
            study: optuna.Study = self._ot_study  # type: ignore[assignment]
            study.tell(self._ot_trials[trial_id],
                                state=optuna.trial.TrialState.PRUNED if state == "pruned"
                                else optuna.trial.TrialState.FAIL)
            self._completed_trials.add(trial_id)
            return
        if state == "infeasible" and trial_id in self._ot_trials:  # kept off the front fill
            self._ot_trials[trial_id].set_user_attr("state", state)
        super().on_trial_complete(trial_id, result, error)


class EnoughTrials(tune.Stopper):
    """Stop the experiment once the study holds ``total`` finished trials (also after restore,
    whose search generator may have been saved before the last trials it had started)."""

    def __init__(self, storage_url: str, study: str, total: int) -> None:
        self.storage_url, self.study, self.total = storage_url, study, total
        self._checked, self._enough = 0.0, False

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        from autoprune.study import load_study

        if not self._enough and time.time() - self._checked > 1.0:  # Tune asks every loop
            self._checked = time.time()
            self._enough = done_count(load_study(self.study, self.storage_url)) >= self.total
        return self._enough


class RecordCallback(tune.Callback):
    """Driver-side: add each finished Tune trial to the study and MLflow, once."""

    def __init__(self, recorder: Recorder, dists: dict[str, Any], points: list[SeedPoint],
                 total: int, seen: Any = None, models: Any = None) -> None:
        self.recorder, self.dists, self.points = recorder, dists, points
        self.total, self.seen = total, seen
        self.models = models  # the parent actor, to keep each trial's weights from
        self.searcher: AutopruneSearch | None = None  # tells which trials were front fills
        self.configs: dict[str, dict[str, Any]] = {}  # trial id -> config, as Tune started it
        self.recorded = {t.user_attrs.get("ray_trial_id")
                         for t in recorder.study.get_trials(deepcopy=False)}

    def __getstate__(self) -> dict[str, Any]:
        # Tune saves its run config with the experiment; the recorder (open stores) stays here
        # and a resumed driver attaches a new one.
        return {}

    def record(self, trial_id: str, config: Mapping[str, Any],
               metrics: Mapping[str, Any] | None, error: str | None) -> None:
        if not hasattr(self, "recorder") or trial_id in self.recorded:
            return
        if done_count(self.recorder.study) >= self.total:
            return  # a restored experiment may schedule more trials than it still needs
        if not metrics and not error:
            return  # stopped before it reported: nothing was measured
        if any(n not in config for n in self.dists):
            # a trial that errored for good (its node died) may come back from the result grid
            # without its config: use the one it was started with
            config = self.configs.get(trial_id, config)
        missing = [n for n in self.dists if n not in config]
        if missing:
            print(f"autoprune: Ray trial {trial_id} came back without its ratios for {missing}; "
                  "it cannot be recorded", file=sys.stderr)
            return
        self.recorded.add(trial_id)
        ratios = {n: float(config[n]) for n in self.dists}
        if metrics and "state" in metrics:
            result = metrics_to_result(metrics, ratios)
        else:
            result = TrialResult(ratios=ratios, state="failed",
                                 seed=self.recorder.space.search.seed,
                                 error=error or "the trial reported no result")
        if self.seen is not None:
            mark_twin(self.seen, result)
        if self.models is not None and result.state == "complete" and result.kept_channels \
                and result.duplicate_of is None:  # a reused result has no weights of its own
            held = ray.get(self.models.get.remote(structure_key(result.kept_channels,
                                                                result.seed)))
            result.state_dict = held.state_dict if held is not None else None
        attrs = self._attrs(trial_id, config, ratios)
        if metrics and metrics.get("node_id"):
            attrs["ray_node_id"] = metrics["node_id"]
        frozen = self.recorder.add(result, attrs, self.dists, time.time() - result.duration_s)
        if self.seen is not None:
            remember(self.seen, result, frozen.number)

    def _attrs(self, trial_id: str, config: Mapping[str, Any],
               ratios: Mapping[str, float]) -> dict[str, Any]:
        """The user attrs a Tune trial is recorded with: its id, and what proposed it."""
        attrs: dict[str, Any] = {"ray_trial_id": trial_id}
        for params, seed_attrs in self.points if config.get(SEED_KEY) else ():
            if params == ratios:  # a seed point Tune took from points_to_evaluate
                attrs |= seed_attrs
                break
        if self.searcher is not None and self.searcher.is_fill(trial_id):
            attrs[FILL_ATTR] = True
        return attrs

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any,
                       **info: Any) -> None:
        self.configs[trial.trial_id] = dict(trial.config)
        if not hasattr(self, "recorder") or trial.trial_id in self.recorded \
                or any(n not in trial.config for n in self.dists):
            return
        # its MLflow run opens now, with its ratios (it showed only once it had finished)
        ratios = {n: float(trial.config[n]) for n in self.dists}
        self.recorder.start_ray(trial.trial_id, ratios,
                                origin(self._attrs(trial.trial_id, trial.config, ratios)))

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any,
                          **info: Any) -> None:
        self.record(trial.trial_id, trial.config, trial.last_result, None)


def _record_missing(results: Any, callback: Any) -> None:
    """Trials Tune finished while no driver was recording (or that errored out for good)."""
    for res in results:
        trial_id = (res.metrics or {}).get("trial_id") or res.path.rsplit("/", 1)[-1]
        if trial_id in callback.recorded:
            continue
        error = error_text(res.error) if res.error else None
        metrics = res.metrics if res.metrics and "state" in res.metrics else None
        if metrics is None and error is None:
            continue
        callback.record(trial_id, res.config or {}, metrics, error)
