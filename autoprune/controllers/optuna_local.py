"""Local controller: Optuna ask/tell in this process, trials in-process or in worker processes.

This process is the only one that touches the Optuna storage and MLflow; with ``jobs > 1`` each
worker process runs whole trials with ``cpu_count // jobs`` torch threads.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.managers import BaseManager, DictProxy
from typing import Any

import optuna

from autoprune.controllers import _worker
from autoprune.dedup import SeenConfigs, mark_twin, remember, reuser, study_entries
from autoprune.fidelity import RungBook, book_args, promoter
from autoprune.inherit import ParentModels, inheritor, load_kept, offer
from autoprune.signals import STOP_SIGNALS, STOPPED_BY, handling
from autoprune.study import (
    TimeLimit,
    ask,
    done_count,
    recover_interrupted,
    rung_history,
    seed_role,
    suggest_ratios,
)
from autoprune.trial import TrialContext, TrialResult, run_trial

OnResult = Callable[[optuna.Trial, TrialResult], None]
OnStart = Callable[[optuna.Trial, dict[str, float]], None]
OnRequeue = Callable[[list[int]], None]


class _CtrlC:
    """Ctrl-C presses seen (true once there is one), and whether one is held back now."""

    def __init__(self) -> None:
        self.hits: list[int] = []
        self.holding = False

    def __bool__(self) -> bool:
        return bool(self.hits)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Ctrl-C waits for the block's end: a finished trial's record in the Optuna storage
        and MLflow. Cut inside a SQLite transaction, the storage was left locked ('database
        is locked'), and the interrupted search ended in a traceback, not its message."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.hits:
            raise KeyboardInterrupt


@contextlib.contextmanager
def _ctrl_c_remembered() -> Iterator[_CtrlC]:
    """Ctrl-C raises KeyboardInterrupt as usual, and is remembered too: Python drops the
    exception when the signal lands while a weakref callback or a ``__del__`` runs
    ("Exception ignored in ..."), and the search went on as if no key was pressed. The
    controller checks between trials."""
    state = _CtrlC()

    def handler(signum: int, _frame: Any) -> None:
        state.hits.append(signum)
        if signum != signal.SIGINT:
            STOPPED_BY.append(signum)
        if not state.holding:
            raise KeyboardInterrupt

    with handling((signal.SIGINT, *STOP_SIGNALS), handler):
        yield state


def run_local(ctx: TrialContext, study: optuna.Study, total: int, jobs: int,
              dists: dict[str, optuna.distributions.FloatDistribution],
              on_result: OnResult, keep_model: bool, on_start: OnStart | None = None,
              limit: TimeLimit | None = None, on_requeue: OnRequeue | None = None) -> None:
    """See :func:`_run_local`; a Ctrl-C that Python swallowed still stops it after the trial."""
    with _ctrl_c_remembered() as ctrl_c:
        _run_local(ctx, study, total, jobs, dists, on_result, keep_model, ctrl_c,
                   on_start or (lambda trial, ratios: None), limit or TimeLimit(),
                   on_requeue or (lambda numbers: None))


def _run_local(ctx: TrialContext, study: optuna.Study, total: int, jobs: int,
               dists: dict[str, optuna.distributions.FloatDistribution],
               on_result: OnResult, keep_model: bool, ctrl_c: _CtrlC,
               on_start: OnStart, limit: TimeLimit, on_requeue: OnRequeue) -> None:
    """Run trials until ``total`` have finished (completed or failed), or until ``limit`` is
    reached: then no trial starts, and those running finish.

    Args:
        ctx: the trial context (used directly when ``jobs == 1``).
        study: the Optuna study (created before any worker starts).
        total: trials the study should hold when done (resume counts earlier ones).
        jobs: trials at once.
        dists: the ratio distributions, one per group.
        on_result: called in this process with every finished trial (records it).
        on_start: called in this process with every trial as it starts, and its ratios.
        keep_model: ask trials to return their fine-tuned weights.
        limit: the run's time budget.
        on_requeue: called with the trials queued to run again after a worker process died
            beside them (their runs were opened by ``on_start``).
    """
    fid, inherit = ctx.space.search.fidelity, ctx.space.search.inherit
    weights = keep_model or inherit  # inheritance needs every trial's fine-tuned weights
    from autoprune.search import study_dir

    trials_dir = study_dir(ctx.space, study.study_name) / "trials"

    def record(trial: optuna.Trial, result: TrialResult, seen: Any, models: Any) -> None:
        """Record a finished trial, and remember its model for later proposals."""
        mark_twin(seen, result)
        if models is not None:
            offer(models, result)
        if not keep_model:
            result.state_dict = None
        with ctrl_c.held():
            on_result(trial, result)
            remember(seen, result, trial.number)
        if ctrl_c:  # pressed during the trial, and the KeyboardInterrupt was lost
            raise KeyboardInterrupt

    def inherits(models: Any, role: str | None) -> bool:
        return models is not None and role != "baseline"  # a baseline is uniform pruning

    if jobs <= 1:
        seen = SeenConfigs()
        seen.load(study_entries(study))
        models = ParentModels() if inherit else None
        if models is not None:
            load_kept(models, study, trials_dir)
        book = RungBook(*book_args(fid)) if fid.enabled else None
        if book is not None:
            book.load(rung_history(study))
        while done_count(study) < total and not limit.reached():
            with ctrl_c.held():  # storage writes: asked, its ratios suggested, its run open
                trial = ask(study)
                ratios = suggest_ratios(trial, dists)
                on_start(trial, ratios)
            role = seed_role(trial.user_attrs)
            promote = promoter(book, f"t{trial.number}", role, inherit) if book is not None \
                else None
            result = run_trial(ctx, ratios, keep_model=weights,
                               promote=promote, reuse=reuser(seen),
                               inherit=inheritor(models) if inherits(models, role) else None)
            record(trial, result, seen, models)
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    # The rung book and the results seen are shared by all worker processes through a manager.
    manager = _BookManager()
    manager.start(_worker.die_with_parent)
    seen = manager.SeenConfigs()  # type: ignore[attr-defined]
    pids = manager.Pids()  # type: ignore[attr-defined]  # trial label -> the worker running it
    seen.load(study_entries(study))
    models = manager.ParentModels() if inherit else None  # type: ignore[attr-defined]
    if models is not None:
        load_kept(models, study, trials_dir)
    shared = None
    if fid.enabled:
        shared = manager.RungBook(*book_args(fid))  # type: ignore[attr-defined]
        shared.load(rung_history(study))
    pool = _pool(ctx, jobs, threads)
    pending: dict[Future[TrialResult], tuple[optuna.Trial, dict[str, float]]] = {}
    broke_again = False
    try:
        def more() -> bool:
            return done_count(study) + len(pending) < total and not limit.reached()

        while more() or pending:
            while len(pending) < jobs and more():
                with ctrl_c.held():
                    trial = ask(study)
                    ratios = suggest_ratios(trial, dists)
                    on_start(trial, ratios)
                role = seed_role(trial.user_attrs)
                try:
                    fut = pool.submit(_worker.work, ratios, weights, shared, f"t{trial.number}",
                                      seen, role, models if inherits(models, role) else None,
                                      pids)
                except BrokenProcessPool as e:  # a worker died while this process recorded
                    fut = Future()  # or asked: this trial never ran
                    fut.set_exception(e)
                pending[fut] = (trial, ratios)
                if fut.done():
                    break
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            lost: list[tuple[optuna.Trial, dict[str, float]]] = []
            for fut in finished:
                trial, ratios = pending.pop(fut)
                try:
                    result = fut.result()
                except BrokenProcessPool:  # a worker died (killed, out of memory)
                    lost.append((trial, ratios))
                    continue
                record(trial, result, seen, models)
            if lost:  # the pool ends every trial in flight: each running one is lost too
                for fut, (trial, ratios) in list(pending.items()):
                    del pending[fut]
                    if fut.done() and not fut.cancelled() and fut.exception() is None:
                        record(trial, fut.result(), seen, models)  # finished just before
                    else:
                        lost.append((trial, ratios))
                died = _died_alone(pool, pids)
                for trial, ratios in lost:
                    why = died.get(f"t{trial.number}")
                    if why is None and died and not broke_again:
                        continue  # it ran beside the one that died (or never ran): again
                    error = (f"worker process died: {why}" if why else "worker process died "
                             "(a worker of the pool died, which one is not known)" if not died
                             else "the worker pool broke again before any trial finished")
                    with ctrl_c.held():
                        on_result(trial, TrialResult(ratios=ratios, state="failed",
                                                     seed=ctx.space.search.seed, error=error))
                with ctrl_c.held():
                    again = recover_interrupted(study)
                    if again:
                        on_requeue(again)
                pool.shutdown(cancel_futures=True)
                pool = _pool(ctx, jobs, threads)
                broke_again = True  # till a trial finishes: a pool that keeps breaking (a
                # worker that dies as it starts) fails its trials rather than re-run them
            elif finished:
                broke_again = False
    finally:
        # A second Ctrl-C (GNU timeout sends its signal to the child and to the group) landing
        # here cut the manager's shutdown: the manager process lived on and the exit waited on
        # it for good. Presses are only remembered until the pool and manager are down.
        ctrl_c.holding = True
        if any(sig != signal.SIGINT for sig in ctrl_c.hits):
            _interrupt_workers(pool)
        pool.shutdown(wait=False, cancel_futures=True)
        manager.shutdown()


def _died_alone(pool: ProcessPoolExecutor, pids: Any) -> dict[str, str]:
    """The trials whose worker process died of itself, and how (a broken pool then
    terminates the other workers, with SIGTERM): a ``kill -9`` or the out-of-memory killer
    ended one worker, and both trials in flight were failed with the same words, so the
    healthy one (a uniform baseline) never ran again."""
    procs = dict(getattr(pool, "_processes", None) or {})
    for proc in procs.values():
        proc.join(timeout=10)
    codes = {pid: proc.exitcode for pid, proc in procs.items()}
    dead = {}
    for pid, code in codes.items():
        if code is None or code == -signal.SIGTERM:
            continue
        if code < 0:
            name = signal.Signals(-code).name
            dead[pid] = (f"killed by {name} (the out-of-memory killer, or kill -9)"
                         if -code == signal.SIGKILL else f"killed by {name}")
        else:
            dead[pid] = f"exited with status {code}"
    # a worker that died before its first trial (or between trials) fails none: the label
    # "-" stands for it, so the trials in flight run again
    out = {label: dead[pid] for label, pid in dict(pids).items() if pid in dead}
    if dead and not out:
        out["-"] = next(iter(dead.values()))
    return out


def _interrupt_workers(pool: ProcessPoolExecutor) -> None:
    """A SIGTERM or SIGHUP sent to this process alone (``docker stop``, ``kill PID``) does not
    reach the workers, which a Ctrl-C's process group does: they get the Ctrl-C, so running
    trials stop now rather than keep this process from exiting until they finish."""
    for pid in list(getattr(pool, "_processes", None) or {}):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGINT)


class _BookManager(BaseManager):
    pass


_BookManager.register("RungBook", RungBook)
_BookManager.register("SeenConfigs", SeenConfigs)
_BookManager.register("ParentModels", ParentModels)
_BookManager.register("Pids", dict, DictProxy)


def _pool(ctx: TrialContext, jobs: int, threads: int) -> ProcessPoolExecutor:
    # spawn, not fork: forking a process that already runs torch thread pools can deadlock.
    return ProcessPoolExecutor(
        max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_worker.init_worker,
        initargs=(ctx.space.to_dict(), ctx.base.to_dict(), threads))
