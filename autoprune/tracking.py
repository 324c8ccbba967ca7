"""MLflow: one experiment per study, a parent run per search, a child run per trial.

The controller process is the single writer; trials only return results. Child runs are written
when a trial has finished (so a killed search never leaves a half-written trial) and are looked
up by their ``autoprune.trial`` tag, which makes re-logging after a resume idempotent.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from autoprune.base import BaseMetrics
from autoprune.config import SpaceConfig, flat_items
from autoprune.errors import AutopruneError, first_line
from autoprune.locks import sqlite_setup
from autoprune.quiet import quieter
from autoprune.study import origin, tidy_number

TRIAL_TAG = "autoprune.trial"
STUDY_TAG = "autoprune.study"
RAY_TRIAL_TAG = "autoprune.ray_trial"  # a running Ray trial's Tune id, before its number
RUNNING_ROLE = "running"  # the role of a running Ray trial's run (``trial`` once it ends)
_PARAM_MAX = 6000  # MLflow's param value length limit (chars)


# MLflow retries a failed HTTP request 7 times with a doubling back-off (minutes in all) before
# it gives up. A search that loses its server goes on without it (see search.Recorder.track),
# so a shorter wait serves better; an environment setting of the user's wins.
HTTP_RETRIES = "4"


def check_server(uri: str, timeout: float = 10.0) -> None:
    """An ``http(s)://`` tracking URI must answer MLflow's ``/health`` before a search starts.

    Raises:
        AutopruneError: the server does not answer, naming ``tracking.uri``.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return
    except urllib.error.HTTPError:  # it answered (auth, or no /health route): a server
        return
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise AutopruneError(f"tracking.uri: got {uri!r}, which does not answer ({reason}); "
                             "allowed: a running MLflow server, or null for the local store "
                             "under runs_dir") from None


def _open_store(uri: str, name: str) -> tuple[MlflowClient, Any]:
    """A client of the store, and its experiment ``name`` (None: not there yet). A SQLite
    store that cannot be read is named, with what to do: one whose creation a full disk cut
    was left half-migrated, and every later search in that runs dir failed on "table
    _alembic_tmp_experiments already exists" with no word of the store."""
    try:
        client = MlflowClient(tracking_uri=uri)
        return client, client.get_experiment_by_name(name)
    except Exception as e:
        if not uri.startswith("sqlite:///"):
            raise
        from autoprune.errors import environment_error

        if environment_error(e) and "cannot be written" not in str(environment_error(e)):
            raise  # a full disk, a lock: said as such
        first = first_line(e)
        raise AutopruneError(
            f"tracking.uri: the MLflow store {uri.removeprefix('sqlite:///')} cannot be read "
            f"({type(e).__name__}: {first}): its creation was cut (a full disk, a kill) or it "
            "is not an MLflow store; allowed: move it away (the Optuna study keeps every "
            "trial, and --resume logs them to a new store), or another tracking.uri") from None


def check_store(uri: str, experiment: str) -> None:
    """A SQLite store that exists must be readable before any work (see :func:`_open_store`):
    a broken one was found after the base model's training and the scan."""
    if uri.startswith("sqlite:///") and Path(uri.removeprefix("sqlite:///")).exists():
        with sqlite_setup(uri), quieter(logging.WARNING, "mlflow.store.db.utils", "alembic"):
            _open_store(uri, experiment)


def _ms(t: float | None = None) -> int:
    return int((time.time() if t is None else t) * 1000)


class Tracker:
    """Writes a study's runs. Use one per search process.

    Args:
        uri: MLflow tracking URI (``sqlite:///runs/mlflow.db``, ``http://127.0.0.1:5000``, ...).
        experiment: experiment name (one per study).
        study: the Optuna study name, tagged on every run.
        artifact_dir: where a new experiment keeps artifacts when the store is a local file.
    """

    def __init__(self, uri: str, experiment: str, study: str, artifact_dir: str | Path) -> None:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", HTTP_RETRIES)
        # absolute: MLflow keeps one store per URI string in a process, so a relative SQLite
        # URI opened again from another directory wrote into the first directory's store
        uri = absolute_uri(uri)
        # a new store: one process at a time, without MLflow's INFO 'Creating initial MLflow
        # database tables...' and alembic's migrations (shown under --quiet too)
        with sqlite_setup(uri), quieter(logging.WARNING, "mlflow.store.db.utils", "alembic"):
            self.client, exp = _open_store(uri, experiment)
            self.uri, self.study = uri, study
            if exp is None:
                location = (Path(artifact_dir).resolve().as_uri()
                            if not uri.startswith(("http://", "https://")) else None)
                self.experiment_id = self.client.create_experiment(experiment, location)
            else:
                self.experiment_id = exp.experiment_id
                moved = relocate_artifacts(uri, artifact_dir)
                if moved:
                    print(f"autoprune: the runs directory was moved from {Path(moved).parent}: "
                          f"MLflow's artifacts are read and written under {artifact_dir} now",
                          file=sys.stderr)
        self.parent_id: str | None = None
        self._front: set[int] = set()
        self._run_ids: dict[int, str] = {}  # trial number -> child run id, to tag the front
        # running trials' child runs, finished by log_trial: by trial number, or on Ray (where
        # a trial's number is given when it ends) by "ray:<Tune trial id>"
        self._open: dict[str, str] = {}

    # -- parent run ------------------------------------------------------------------------
    def start_parent(self, space: SpaceConfig, base: BaseMetrics, resume_run_id: str | None,
                     config_file: Path) -> str:
        """Start the search's parent run, or reopen it on resume. A parent run this store's
        experiment does not hold (``tracking`` changed on resume, the store was deleted) is
        not reopened: a new one is started, and :meth:`child_runs` finds none, so the
        finished trials are logged to it once (``reconcile``)."""
        if resume_run_id and self.holds(resume_run_id):
            self.parent_id = resume_run_id
            self.client.update_run(resume_run_id, status="RUNNING")
            run = self.client.get_run(resume_run_id)
            resumes = int(run.data.tags.get("autoprune.resumes", "0")) + 1
            self.client.set_tag(resume_run_id, "autoprune.resumes", str(resumes))
            self._log_run_settings(space, config_file)  # params stay the first run's
            children = self.child_runs()
            self._run_ids = {int(r.data.tags[TRIAL_TAG]): r.info.run_id for r in children}
            self._front = {int(r.data.tags[TRIAL_TAG]) for r in children
                           if r.data.tags.get("pareto") == "true"}
            return resume_run_id
        run = self.client.create_run(self.experiment_id, run_name=f"search-{self.study}",
                                     tags={STUDY_TAG: self.study, "autoprune.role": "search"})
        self.parent_id = run.info.run_id
        params = [Param(k, str(v)[:_PARAM_MAX]) for k, v in _flatten(space.to_dict()).items()]
        base_metrics = {"base_accuracy": base.accuracy, "base_macs": base.macs,
                        "base_flops": 2 * base.macs, "base_params": float(base.params),
                        "base_latency_ms": base.latency_ms,
                        "base_latency_p90_ms": base.latency_p90_ms}
        self._log_params(self.parent_id, params)
        self.client.log_batch(self.parent_id, metrics=[Metric(k, float(v), _ms(), 0)
                                       for k, v in base_metrics.items()],
                              tags=[RunTag("base_checkpoint", os.path.abspath(base.checkpoint)),
                                    RunTag("base_checkpoint_sha256", base.checkpoint_sha256),
                                    RunTag("latency_setup", _latency_setup(base.latency))])
        self._log_run_settings(space, config_file)
        return self.parent_id

    def _log_run_settings(self, space: SpaceConfig, config_file: Path) -> None:
        """The latest run's ``space.yaml`` and its trial count and jobs as tags: a resume's
        ``--trials``/``--jobs`` differ from the first run's params, which MLflow keeps."""
        assert self.parent_id
        self.client.log_batch(self.parent_id, tags=[
            RunTag("autoprune.trials", str(space.search.trials)),
            RunTag("autoprune.jobs", str(space.search.jobs))])
        self.client.log_artifact(self.parent_id, str(config_file))

    def holds(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return False
        return run.info.experiment_id == self.experiment_id and \
            run.info.lifecycle_stage != "deleted"

    def current_parent(self) -> str | None:
        """The study's newest parent run not deleted (a reader's view: export, pareto)."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{STUDY_TAG}` = '{self.study}' and "
                                                f"tags.`autoprune.role` = 'search'",
            max_results=1, order_by=["attributes.start_time DESC"])
        return str(runs[0].info.run_id) if runs else None

    def finish_parent(self, status: str = "FINISHED", stopped_by: str | None = None) -> None:
        """End the parent run; ``stopped_by`` (the time limit) is its ``autoprune.stopped_by``
        tag, which each run sets (``-`` when it ran all its trials)."""
        if self.parent_id:
            self.client.set_tag(self.parent_id, "autoprune.stopped_by", stopped_by or "-")
            self.client.set_terminated(self.parent_id, status=status)

    def log_artifacts(self, paths: Iterable[Path], artifact_path: str | None = None) -> None:
        assert self.parent_id, "start_parent() first"  # a bug, not user input
        for p in paths:
            self.client.log_artifact(self.parent_id, str(p), artifact_path)

    def log_parent_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        assert self.parent_id
        self.client.log_batch(self.parent_id, metrics=[Metric(k, float(v), _ms(), step)
                                                       for k, v in metrics.items()])

    # -- child runs ------------------------------------------------------------------------
    def child_runs(self, role: str = "trial") -> list[Any]:
        """The trial runs under this search's parent run (those of a deleted parent are not
        this search's: a resume after it logs its trials again, under the new parent);
        ``role`` :data:`RUNNING_ROLE`: Ray trials running, not numbered yet."""
        under = f" and tags.`mlflow.parentRunId` = '{self.parent_id}'" if self.parent_id else ""
        runs: list[Any] = []
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{STUDY_TAG}` = '{self.study}' and "
                              f"tags.`autoprune.role` = '{role}'" + under,
                max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def start_trial(self, number: int | None, params: Mapping[str, float],
                    settings: Mapping[str, Any], came_from: str, start: float | None = None,
                    ray_trial: str | None = None) -> str:
        """Open a running trial's child run, with its ratios, so the UI shows what runs (a
        30-minute trial was invisible until it ended); :meth:`log_trial` completes it. A Ray
        trial (``number`` None, ``ray_trial`` its Tune id) is named after its Tune id and
        tagged ``autoprune.role: running`` until its number is known."""
        assert self.parent_id, "start_parent() first"
        tags = {"mlflow.parentRunId": self.parent_id, STUDY_TAG: self.study,
                "autoprune.role": "trial" if number is not None else RUNNING_ROLE,
                "state": "running", "origin": came_from}
        if number is not None:
            tags[TRIAL_TAG] = str(number)
        else:
            tags[RAY_TRIAL_TAG] = str(ray_trial)
        name = f"trial-{number}" if number is not None else f"ray-{ray_trial}"
        run = self.client.create_run(self.experiment_id, start_time=_ms(start), tags=tags,
                                     run_name=f"{self.study}/{name}")
        run_id = str(run.info.run_id)
        self._log_params(run_id, _trial_params(params, settings))
        self._open[str(number) if number is not None else f"ray:{ray_trial}"] = run_id
        return run_id

    def drop_open(self, number: int) -> None:
        """Delete the open run of a trial that runs again under a new number (it was cut: a
        worker process died beside it)."""
        run_id = self._open.pop(str(number), None)
        if run_id is not None:
            self.client.delete_run(run_id)

    def close_open(self) -> None:
        """Delete the runs of trials that did not finish (an interrupt): such a trial runs
        again under a new number with --resume (on Ray, Tune's restored trial opens a new
        run), and its run held only its ratios. Deleted runs stay in MLflow's trash (``mlflow
        gc`` empties it)."""
        for key in list(self._open):
            self.client.delete_run(self._open.pop(key))

    def adopt_stale(self, finished: set[int]) -> set[int]:
        """Child runs a killed search left RUNNING: a trial the study holds as finished gets
        its run completed by the next :meth:`log_trial`; any other is deleted as
        :meth:`close_open` does (a Ray trial's always: a new one is logged for it).

        Returns:
            The trials whose run is complete (logged), from the same look at the store.
        """
        logged = set()
        for r in self.child_runs():
            key = r.data.tags[TRIAL_TAG]
            if r.info.status in ("FINISHED", "FAILED"):
                logged.add(int(key))
            if r.info.status != "RUNNING" or key in self._open:
                continue
            if int(key) in finished:
                self._open[key] = r.info.run_id
            else:
                self.client.delete_run(r.info.run_id)
        for r in self.child_runs(RUNNING_ROLE):
            if f"ray:{r.data.tags.get(RAY_TRIAL_TAG)}" not in self._open:
                self.client.delete_run(r.info.run_id)
        return logged

    def log_trial(self, number: int, attrs: Mapping[str, Any], params: Mapping[str, float],
                  settings: Mapping[str, Any], losses: Iterable[tuple[int, float]] = (),
                  start: float | None = None, end: float | None = None,
                  artifacts: Iterable[Path] = ()) -> str:
        """Write one finished trial as a child run (params, metrics, tags, artifacts)."""
        assert self.parent_id, "start_parent() first"
        state = str(attrs.get("state", "failed"))
        tags = {"mlflow.parentRunId": self.parent_id, STUDY_TAG: self.study,
                "autoprune.role": "trial", TRIAL_TAG: str(number), "state": state,
                "baseline": str(bool(attrs.get("baseline", False))).lower(), "pareto": "false",
                "origin": origin(attrs)}
        if attrs.get("error"):
            tags["error"] = str(attrs["error"])[:5000]
        if attrs.get("duplicate_of") is not None:  # the same config ran before: reused
            tags["duplicate_of"] = str(attrs["duplicate_of"])
        if attrs.get("inherits_trial") is not None:  # pruned from that trial's fine-tuned model
            tags["inherits_trial"] = str(attrs["inherits_trial"])
        ray_trial = attrs.get("ray_trial_id")
        run_id = self._open.pop(f"ray:{ray_trial}" if ray_trial else str(number), None)
        logged: Mapping[str, str] = {}
        if run_id is None:
            run_id = self.client.create_run(self.experiment_id, start_time=_ms(start), tags=tags,
                                            run_name=f"{self.study}/trial-{number}").info.run_id
        else:  # opened when the trial started, with its params
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            if ray_trial:  # named now that it has a number
                self.client.update_run(run_id, name=f"{self.study}/trial-{number}")
            logged = self.client.get_run(run_id).data.params
        now = _ms(end)
        metric_keys = ("accuracy", "proxy_accuracy", "macs", "flops", "macs_ratio", "params",
                       "params_ratio", "latency_ms", "latency_p90_ms", "speedup",
                       "finetune_steps", "duration_s")
        values = {k: attrs[k] for k in metric_keys if isinstance(attrs.get(k), (int, float))}
        if "flops" not in values and "macs" in values:
            values["flops"] = 2.0 * float(values["macs"])  # FLOPs = 2 x MACs, as for the base
        if state == "pruned" and "accuracy" in values:  # stopped at a rung: not a final score
            values["accuracy_at_stop"] = values.pop("accuracy")
        if state == "infeasible":  # never fine-tuned: its accuracy is the proxy, logged as such
            values.pop("accuracy", None)
        metrics = [Metric(k, float(v), now, 0) for k, v in values.items()]
        metrics += [Metric(f"constraint.{k}", float(v), now, 0)
                    for k, v in (attrs.get("constraints") or {}).items()]
        metrics += [Metric("finetune_loss", float(v), now, int(s)) for s, v in losses]
        # accuracy at each multi-fidelity rung (step = rung; rung 0 is the proxy)
        metrics += [Metric("rung_accuracy", float(a), now, int(r))
                    for r, a, _c in attrs.get("rungs") or []]
        kept = [Param(f"kept.{g}", str(int(c))) for g, c in
                (attrs.get("kept_channels") or {}).items()]  # the channels, after rounding
        self._log_params(run_id, [p for p in _trial_params(params, settings) + kept
                                  if p.key not in logged])
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[i:i + 1000])
        for path in artifacts:
            self.client.log_artifact(run_id, str(path))
        self.client.set_terminated(run_id, status="FAILED" if state == "failed" else "FINISHED",
                                   end_time=now)
        self._run_ids[number] = str(run_id)
        return str(run_id)

    def _log_params(self, run_id: str, params: list[Param]) -> None:
        for i in range(0, len(params), 100):  # MLflow's batch limits: 100 params, 1000 metrics
            self.client.log_batch(run_id, params=params[i:i + 100])

    def sync_front(self, front: set[int]) -> None:
        """Set the ``pareto`` tag of every child run from the study's front, whatever this
        tracker saw: trials logged late (MLflow was down, or a new parent run) were logged
        ``false`` and :meth:`update_front` only changes what it saw change."""
        for r in self.child_runs():
            n = int(r.data.tags[TRIAL_TAG])
            self._run_ids[n] = r.info.run_id
            want = str(n in front).lower()
            if r.data.tags.get("pareto") != want:
                self.client.set_tag(r.info.run_id, "pareto", want)
        self._front = set(front)

    def update_front(self, front: set[int]) -> None:
        """Keep the ``pareto`` tag true on exactly the current front's trials."""
        changed = front ^ self._front
        if not changed:
            return
        for n in changed:
            if n in self._run_ids:
                self.client.set_tag(self._run_ids[n], "pareto", str(n in front).lower())
        self._front = set(front)


def _trial_params(params: Mapping[str, float], settings: Mapping[str, Any]) -> list[Param]:
    """A trial run's params: ``ratio.<group>`` as the grid gives them (0.6, not Optuna's
    0.6000000000000001) and the pruning settings."""
    values = {f"ratio.{k}": tidy_number(v) for k, v in params.items()} | dict(settings)
    return [Param(k, str(v)[:_PARAM_MAX]) for k, v in values.items()]


def _latency_setup(lat: Mapping[str, Any]) -> str:
    return (f"{lat.get('runtime')} on {lat.get('device')}, threads={lat.get('threads')}, "
            f"batch={lat.get('batch_size')}, warmup={lat.get('warmup')}, "
            f"repeats={lat.get('repeats')}")


#: How the characters MLflow rejects in names read in a parameter key: the glob's own.
_GLOB_WORDS = {"*": "_star_", "?": "_qmark_", "[": "_lbr_", "]": "_rbr_", "!": "_not_"}


def _flatten(d: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys. Characters MLflow rejects in names are spelled out (``layer3.*`` becomes
    ``layer3._star_``): replaced by one ``_``, ``layer3.*`` and ``layer3.?`` made one key
    and one pattern's range was lost."""
    def key(k: str) -> str:
        k = "".join(_GLOB_WORDS.get(c, c) for c in k)
        return re.sub(r"[^\w\-. :/]", lambda m: f"_x{ord(m.group()):x}_", k)

    return {key(k): tidy_number(v) for k, v in flat_items(d).items()}


def absolute_uri(uri: str) -> str:
    """A SQLite tracking URI with an absolute path (a relative one means nothing elsewhere)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri.removeprefix("sqlite:///"))
    return uri


def default_artifact_dir(runs_dir: str) -> Path:
    return Path(os.path.abspath(runs_dir)) / "mlartifacts"


def relocate_artifacts(uri: str, artifact_dir: str | Path) -> str | None:
    """Point a local store's artifact paths at ``artifact_dir`` when the runs directory was
    moved there (a project copied from a cluster to a laptop): MLflow records them as full
    paths, so a resume wrote its tables and plots into the old folder (made again, or a
    traceback where it could not be), and the UI showed no artifact. Only an old folder
    ``.../mlartifacts`` that is gone is replaced, in the experiments and their runs.

    Returns:
        The old folder, when the store was changed; else None.
    """
    if not uri.startswith("sqlite:///"):
        return None
    db, new = Path(uri.removeprefix("sqlite:///")), Path(artifact_dir).resolve()
    if not db.is_file() or not new.is_dir():
        return None
    import contextlib
    import sqlite3
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    with contextlib.closing(sqlite3.connect(db, timeout=60)) as con, con:
        try:
            locations = [r[0] for r in con.execute(
                "SELECT DISTINCT artifact_location FROM experiments "
                "WHERE artifact_location LIKE 'file:%'")]
        except sqlite3.DatabaseError:  # not an MLflow store: opening it says so
            return None
        for location in locations:
            old = Path(url2pathname(urlparse(location).path))
            if old.name != new.name or old == new or old.exists():
                continue
            con.execute("UPDATE experiments SET artifact_location = ? WHERE "
                        "artifact_location = ?", (new.as_uri(), location))
            con.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) WHERE "
                        "substr(artifact_uri, 1, ?) = ?",
                        (new.as_uri(), len(location) + 1, len(location) + 1, location + "/"))
            return str(old)
    return None
