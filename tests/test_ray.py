"""The Ray backend on a real multi-node Ray cluster started on this machine."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from _helpers import (
    beyond_loopback,
    clock_ticks_per_trial_start,
    kill_when_finished,
    listening_addresses,
    tiny_space,
)
from mlflow import MlflowClient
from ray.cluster_utils import Cluster

from autoprune.config import parse_space
from autoprune.errors import AutopruneError
from autoprune.search import run_search
from autoprune.study import front_numbers, load_study, origin


def ray_space(runs: Path, name: str, trials: int) -> dict[str, Any]:
    return tiny_space(runs, name, **{"search.trials": trials, "finetune.steps": 6})


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A head and one worker node, one CPU each, on this machine (127.0.0.1, see conftest)."""
    c = Cluster(initialize_head=True, connect=False,
                head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    try:
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()


def ray_opts(cluster: Cluster, concurrency: int = 2) -> dict[str, Any]:
    return {"address": cluster.address, "concurrency": concurrency, "cpus_per_trial": 1.0}


def trial_runs(space: Any, name: str) -> list[Any]:
    client = MlflowClient(space.tracking_uri)
    exp = client.get_experiment_by_name(name)
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000)
            if r.data.tags.get("autoprune.role") == "trial"]


def test_an_unreachable_address_fails_in_seconds_before_any_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from _helpers import free_port

    from autoprune.controllers.ray_tune import check_address

    runs = tmp_path / "runs"
    t0 = time.time()
    with pytest.raises(AutopruneError, match=r"--address 127.0.0.1:\d+: cannot reach a Ray "
                                             "cluster there"):
        run_search(parse_space(ray_space(runs, "nowhere", trials=2)), backend="ray",
                   ray_options={"address": f"127.0.0.1:{free_port()}"}, quiet=True)
    assert time.time() - t0 < 30
    assert not (runs / "base").exists() and not (runs / "optuna.db").exists()
    with pytest.raises(AutopruneError, match="--address: got 'headnode'; allowed: auto"):
        check_address("headnode")
    # auto is looked up as Ray looks it up, and checked as fast: not minutes of ray.init
    # retries after the base model and the scan
    gone = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", gone)
    t0 = time.time()
    with pytest.raises(AutopruneError, match=rf"--address auto: cannot reach a Ray cluster "
                                             rf"there \(found at {gone}: RAY_ADDRESS"):
        check_address("auto")
    assert time.time() - t0 < 30
    monkeypatch.delenv("RAY_ADDRESS")

    # the same command plus an address runs on Ray: --address alone selects the Ray backend
    # (it used to be ignored, and the search ran on this machine)
    from autoprune.cli import main as cli

    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(ray_space(runs, "nowhere", trials=2)))
    port = free_port()
    proc = subprocess.run([sys.executable, "-m", "autoprune.cli", "search", str(path),
                           "--address", f"127.0.0.1:{port}"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert f"--address 127.0.0.1:{port}: cannot reach a Ray cluster there" in proc.stderr
    assert cli(["search", str(path), "--backend", "local", "--gpus-per-trial", "1"]) == 2
    assert not (runs / "base").exists()


@pytest.fixture
def listeners_before() -> set[tuple[str, int]]:
    return listening_addresses()


def test_search_on_a_two_node_cluster(listeners_before: set[tuple[str, int]], cluster: Cluster,
                                      tmp_path: Path) -> None:
    before = listeners_before
    space = parse_space(ray_space(tmp_path / "runs", "ray2", trials=6))
    seen: dict[str, dict[str, str]] = {}  # run id -> tags, of runs seen while their trial ran
    stop = threading.Event()

    def watch() -> None:  # a user watching MLflow during the search
        while not stop.is_set():
            time.sleep(0.2)
            try:
                client = MlflowClient(space.tracking_uri)
                exp = client.get_experiment_by_name("ray2")
                if exp is None:
                    continue
                for r in client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'"):
                    # its ratios are logged just after the run is made: look again
                    if r.data.tags.get("autoprune.role") == "running" and any(
                            k.startswith("ratio.") for k in r.data.params):
                        seen.setdefault(r.info.run_id, dict(r.data.tags) | {
                            "ratios": str(sorted(k for k in r.data.params
                                                 if k.startswith("ratio.")))})
            except Exception:  # noqa: BLE001 - the store is being made; look again
                continue

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run_search(space, backend="ray", ray_options=ray_opts(cluster), quiet=True)
    finally:
        stop.set()
        watcher.join(timeout=10)

    study = load_study("ray2", space.storage_url)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 6
    assert len({t.user_attrs["ray_node_id"] for t in finished}) == 2, "trials ran on one node"
    assert sorted(t.user_attrs["baseline_ratio"] for t in finished  # 0.75 runs at 0.7
                  if t.user_attrs.get("baseline")) == [0.25, 0.5, 0.7]
    runs = trial_runs(space, "ray2")
    assert sorted(int(r.data.tags["autoprune.trial"]) for r in runs) == list(range(6))
    # a running trial showed in MLflow with its ratios, and the same run ended with its number
    assert seen, "no trial's run showed while it ran"
    ended = {r.info.run_id: r for r in runs}
    for run_id, tags in seen.items():
        assert tags["state"] == "running" and tags["autoprune.ray_trial"]
        assert tags["ratios"] != "[]"
        if run_id in ended:  # (one started past the trials needed is deleted)
            assert ended[run_id].info.status == "FINISHED"
            assert ended[run_id].data.tags["autoprune.ray_trial"] == tags["autoprune.ray_trial"]
    assert sum(run_id in ended for run_id in seen) >= 1
    for r in runs:
        assert {"accuracy", "macs_ratio", "latency_ms", "proxy_accuracy"} <= set(r.data.metrics)
    tagged = {int(r.data.tags["autoprune.trial"]) for r in runs
              if r.data.tags["pareto"] == "true"}
    assert tagged == front_numbers(study) and tagged
    # every trial on the front had the whole fine-tune budget (no early stopping on Ray)
    assert all(study.trials[n].user_attrs["finetune_steps"] == 6 for n in tagged)
    # nothing the cluster or the search opened listens beyond 127.0.0.1
    assert not beyond_loopback(listening_addresses() - before)


def test_losing_a_worker_node_mid_search(cluster: Cluster, tmp_path: Path) -> None:
    space = parse_space(ray_space(tmp_path / "runs", "raykill", trials=8))
    worker = [n for n in cluster.list_all_nodes() if not n.head][0]
    storage = space.storage_url

    def kill_worker_after_two_trials() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if sum(t.state.is_finished() for t in load_study("raykill", storage).trials) >= 2:
                    cluster.remove_node(worker, allow_graceful=False)
                    return
            except AutopruneError:
                pass
            time.sleep(0.5)

    killer = threading.Thread(target=kill_worker_after_two_trials, daemon=True)
    killer.start()
    run_search(space, backend="ray", ray_options=ray_opts(cluster), quiet=True)
    killer.join(timeout=5)
    assert not any(n is worker for n in cluster.list_all_nodes()), "the node was never killed"

    study = load_study("raykill", storage)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 8  # complete, or failed with its error: none lost
    assert sum(t.user_attrs.get("state") in ("complete", "infeasible") for t in finished) >= 6
    numbers = [int(r.data.tags["autoprune.trial"]) for r in trial_runs(space, "raykill")]
    assert sorted(numbers) == sorted(t.number for t in finished)


def driver(cluster: Cluster, tmp_path: Path, name: str, trials: int) -> tuple[Any, list[str]]:
    """A space file and the command of a search driver on ``cluster`` (one trial at a time),
    with the base model trained first, so the driver reaches its trials quickly."""
    runs = tmp_path / "runs"
    spec = ray_space(runs, name, trials=trials)
    space_file = tmp_path / f"{name}.yaml"
    space_file.write_text(yaml.safe_dump(spec))
    run_search(parse_space(ray_space(runs, f"{name}-warm", trials=1)), quiet=True)
    cmd = [sys.executable, "-m", "autoprune.cli", "search", str(space_file), "--quiet",
           "--backend", "ray", "--address", cluster.address, "--concurrency", "1"]
    return parse_space(spec), cmd


def resume_to_the_end(cluster: Cluster, space: Any, trials: int) -> None:
    """``--resume`` on the cluster reaches ``trials`` finished trials, none recorded twice."""
    run_search(space, resume=True, backend="ray", ray_options=ray_opts(cluster, 1), quiet=True)
    study = load_study(space.name, space.storage_url)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == trials
    ray_ids = [t.user_attrs["ray_trial_id"] for t in finished]
    assert len(ray_ids) == len(set(ray_ids)), "a Tune trial was recorded twice"


def test_driver_killed_then_resumed(cluster: Cluster, tmp_path: Path) -> None:
    space, cmd = driver(cluster, tmp_path, "raydrv", trials=7)
    kill_when_finished(cmd, "raydrv", space.storage_url, finished=2)

    resume_to_the_end(cluster, space, 7)
    numbers = [int(r.data.tags["autoprune.trial"]) for r in trial_runs(space, "raydrv")]
    assert len(numbers) == len(set(numbers)) == 7


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_a_ray_search_and_resume_finishes_it(cluster: Cluster, tmp_path: Path,
                                                         stop: str) -> None:
    """Tune catches the first Ctrl-C and returns as if done; the search must stop there (it
    used to take the short study for lost nodes and run every trial again) and resume.
    SIGTERM to the driver alone (a scheduler, ``docker stop``) killed it at once, its MLflow
    parent run left RUNNING: it now stops as a Ctrl-C does."""
    import signal

    name = f"rayint-{stop.lower()}"
    space, cmd = driver(cluster, tmp_path, name, trials=7)
    outcome: dict[str, Any] = {}
    sig = getattr(signal, stop)
    kill_when_finished(cmd, name, space.storage_url, finished=2, sig=sig,
                       outcome=outcome, group=stop == "SIGINT")
    assert outcome["rc"] == 128 + sig, outcome["stderr"][-2000:]
    by = "" if stop == "SIGINT" else f" by {stop}"
    assert f"interrupted{by} (finished trials are kept" in outcome["stderr"]
    assert "short of" not in outcome["stderr"]
    study = load_study(name, space.storage_url)
    assert sum(t.state.is_finished() for t in study.trials) < 7
    parent = MlflowClient(space.tracking_uri).get_run(study.user_attrs["parent_run_id"])
    assert parent.info.status == "KILLED"

    resume_to_the_end(cluster, space, 7)
    # the restored searcher still tells which proposals filled the front (after a resume,
    # fills were recorded as the sampler's)
    study = load_study(name, space.storage_url)
    assert "front_fill" in {origin(t.user_attrs) for t in study.trials}


def test_a_time_limit_on_ray_starts_no_trial_after_it_and_resume_runs_the_rest(
        cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On Ray the searcher proposes nothing once the budget is spent: Tune ends when the
    running trial finishes, and no further round runs the missing trials. The resume (its
    Tune experiment had ended, not been cut) runs the rest."""
    space = parse_space(ray_space(tmp_path / "runs", "raytime", trials=5))
    clock_ticks_per_trial_start(monkeypatch, "start_ray")  # 100 s a trial start
    summary = run_search(space, backend="ray", ray_options=ray_opts(cluster, 1), quiet=True,
                         timeout=150)  # spent once 2 trials started
    assert summary.timed_out and summary.trials == 2
    study = load_study("raytime", space.storage_url)
    assert sum(t.state.is_finished() for t in study.trials) == 2
    assert sorted(r.info.status for r in trial_runs(space, "raytime")) == ["FINISHED"] * 2
    parent = MlflowClient(space.tracking_uri).get_run(summary.parent_run_id)
    assert parent.data.tags["autoprune.stopped_by"] == "time limit"

    resume_to_the_end(cluster, space, 5)
    assert len(trial_runs(space, "raytime")) == 5


def test_a_local_ray_listens_on_loopback_only() -> None:
    """`--backend ray` with no address starts Ray on this machine: none of its processes may
    listen where another machine can reach them. Run without the tests' loopback setting
    (conftest), as a user's process would."""
    script = (
        "import json, ray\n"
        "from autoprune.controllers.ray_tune import connect\n"
        "connect(None, num_cpus=1)\n"
        "@ray.remote\n"
        "def node_ip():\n"
        "    return ray.util.get_node_ip_address()\n"
        "print(json.dumps(ray.get(node_ip.remote())), flush=True)\n"
        "input()\n"  # hold the instance until the test has looked
        "ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    before = listening_addresses()
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        assert line.strip() == '"127.0.0.1"', line
        opened = listening_addresses() - before
        assert opened, "found no listener of the local Ray"
        assert not beyond_loopback(opened), sorted(beyond_loopback(opened))
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_submit_to_no_cluster_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    from _helpers import free_port

    from autoprune.cli import main as cli

    dash = f"http://127.0.0.1:{free_port()}"
    assert cli(["submit", "search_spaces/digits_resnet.yaml", "--address", dash]) == 2
    assert f"--address {dash}: no Ray dashboard answers there" in capsys.readouterr().err


def test_submit_runs_the_search_as_a_ray_job(tmp_path: Path) -> None:
    """`autoprune submit` against a head started with `ray start` (dashboard on 127.0.0.1)."""
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    port, dash = "6391", "8266"
    start = [str(bindir / "ray"), "start", "--head", "--port", port, "--num-cpus", "2",
             "--dashboard-host", "127.0.0.1", "--dashboard-port", dash,
             "--disable-usage-stats"]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
    try:
        space_file = Path("search_spaces") / f"_test_submit_{os.getpid()}.yaml"
        spec = ray_space(tmp_path / "runs", "submitted", trials=3)
        spec["search"]["baselines"] = [0.25, 0.5]
        space_file.write_text(yaml.safe_dump(spec))
        runtime_env = tmp_path / "runtime_env.yaml"
        # the nodes share this machine's virtualenv: upload the code only, install nothing
        runtime_env.write_text(yaml.safe_dump({"working_dir": ".",
                                               "excludes": [".venv/", "runs/", ".git/"]}))
        try:
            out = subprocess.run(
                [str(bindir / "autoprune"), "submit", str(space_file), "--wait",
                 "--address", f"http://127.0.0.1:{dash}", "--runtime-env", str(runtime_env),
                 "--runs-dir", str(tmp_path / "runs")],
                env=env, capture_output=True, text=True, timeout=400)
        finally:
            space_file.unlink()
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "succeeded" in out.stdout + out.stderr
        study = load_study("submitted", f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}")
        assert sum(t.state.is_finished() for t in study.trials) == 3
        assert all("ray_trial_id" in t.user_attrs for t in study.trials)
    finally:
        subprocess.run([str(bindir / "ray"), "stop", "--force"], env=env, capture_output=True,
                       timeout=120)


def test_same_seed_gives_fronts_of_the_same_quality_on_both_controllers(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from autoprune.pareto import hypervolume_2d

    volumes = {}
    for backend in ("local", "ray"):
        spec = ray_space(tmp_path / backend, f"same-{backend}", trials=8)
        spec["objectives"] = ["accuracy", "macs"]
        space = parse_space(spec)
        run_search(space, backend=backend, quiet=True,
                   ray_options={"concurrency": 1} if backend == "ray" else None)
        front = load_study(space.name, space.storage_url).best_trials
        volumes[backend] = hypervolume_2d([t.values[0] for t in front],
                                          [t.values[1] for t in front])
    assert volumes["local"] > 0.3
    assert abs(volumes["local"] - volumes["ray"]) <= 0.05 * volumes["local"]
    # stdout is the search's: Tune's experiment box goes to stderr
    out = capsys.readouterr()
    assert "Configuration for experiment" not in out.out
    assert "Configuration for experiment" in out.err


def test_ray_trials_run_the_user_s_code_as_local_trials_do(
        cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tune started each trial in a folder of its own: a user's data function that opens a
    file by a relative path failed in every Ray trial and ran locally. The space's
    ``search.jobs`` was ignored on Ray, and a worker's error reached the user as Ray's banner
    (actor, pid, colour codes) instead of the user's message."""
    import textwrap
    import uuid

    import numpy as np
    from sklearn.datasets import load_digits

    project = tmp_path / "project"
    project.mkdir()
    digits = load_digits()
    np.savez(project / "digits.npz", x=digits.data, y=digits.target)
    mod = f"udata_{uuid.uuid4().hex[:8]}"
    (project / f"{mod}.py").write_text(textwrap.dedent("""
        import os

        import numpy as np
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        def make(root, driver_pid=0):
            if driver_pid and os.getpid() != driver_pid:
                raise RuntimeError("/data/scans is not mounted on this node")
            d = np.load(root)  # relative to where the search was started
            x = torch.tensor(d["x"], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
            y = torch.tensor(d["y"])
            return (DataLoader(TensorDataset(x[:1400], y[:1400]), batch_size=64,
                               shuffle=True, drop_last=True),
                    DataLoader(TensorDataset(x[1400:], y[1400:]), batch_size=128))
    """))
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(project))
    spec = ray_space(tmp_path / "runs", "ray-user", trials=4)
    spec["data"] = {"source": f"{mod}:make", "kwargs": {"root": "digits.npz"}}
    spec["search"]["jobs"] = 1
    space = parse_space(spec)
    summary = run_search(space, backend="ray", quiet=True,
                         ray_options={"address": cluster.address, "cpus_per_trial": 1.0})
    study = load_study("ray-user", space.storage_url)
    assert summary.failed == 0, summary.errors
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    # search.jobs: 1 runs one trial at a time, in one reused actor (two CPUs were free)
    assert len({t.user_attrs["ray_node_id"] for t in study.trials}) == 1

    spec["name"] = "ray-user-fails"
    spec["data"]["kwargs"]["driver_pid"] = os.getpid()
    space = parse_space(spec)
    summary = run_search(space, backend="ray", quiet=True,
                         ray_options={"address": cluster.address, "concurrency": 2})
    assert summary.failed == summary.trials == 4
    first, = summary.errors  # one error, grouped across trials and processes
    assert first.startswith(f"SourceError: data.source: '{mod}:make' raised RuntimeError: "
                            "/data/scans is not mounted on this node"), first
    study = load_study("ray-user-fails", space.storage_url)
    assert all("\x1b" not in t.user_attrs["error"] for t in study.trials)


def test_a_sampler_s_repeat_of_a_seed_point_is_no_seed_point() -> None:
    """Seed points were recognised by their config: on Ray, a proposal that repeated a uniform
    baseline was recorded as one (and never stopped at a rung, never inherited), where the
    local controller records it as the sampler's."""
    import optuna
    from optuna.distributions import FloatDistribution

    from autoprune.controllers.ray_tune import SEED_KEY, AutopruneSearch, role_of

    searcher = AutopruneSearch(space={"g": FloatDistribution(0.5, 0.5)},
                               metric=["accuracy", "macs_ratio"], mode=["max", "min"],
                               points_to_evaluate=[{"g": 0.5}],
                               sampler=optuna.samplers.RandomSampler(seed=0))
    seed, repeat = searcher.suggest("t0"), searcher.suggest("t1")
    assert seed == {"g": 0.5, SEED_KEY: True} and repeat == {"g": 0.5}
    seeds = [({"g": 0.5}, "baseline")]
    assert role_of(seed, seeds) == "baseline" and role_of(repeat, seeds) is None
