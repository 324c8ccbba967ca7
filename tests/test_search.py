"""The search end to end: real Optuna (SQLite file), real MLflow store, real model on real data."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from _helpers import (
    clock_ticks_per_trial_start,
    free_port,
    kill_when_finished,
    mlflow_server_process,
    tiny_space,
    wait_for_study,
)
from mlflow import MlflowClient

from autoprune.config import parse_space
from autoprune.errors import AutopruneError, ConfigError, SourceError
from autoprune.search import run_search
from autoprune.study import front_numbers, list_studies, load_study, origin
from autoprune.trial import TrialContext

FRAGILE_MODEL = '''
import torch
from torch import nn


class Fragile(nn.Module):
    """A user model whose forward needs at least 6 channels after its first conv (while it
    trains only, with ``train_only``: out of sight of the check that a group prunes at all,
    which runs the model in eval mode and once in training mode without gradients)."""

    train_only = False

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        trains = self.training and torch.is_grad_enabled()
        if x.shape[1] < 6 and (trains or not self.train_only):
            raise RuntimeError(f"this block needs >= 6 channels, got {x.shape[1]}")
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


def build(train_only=False):
    model = Fragile()
    model.train_only = train_only
    return model
'''


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One runs dir per module: the base checkpoint is trained once and reused by hash."""
    return tmp_path_factory.mktemp("search") / "runs"


def child_runs(space_runs: Path, experiment: str) -> list[Any]:
    client = MlflowClient(f"sqlite:///{space_runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000)
            if r.data.tags.get("autoprune.role") == "trial"]


def test_short_search_records_every_trial_in_mlflow(runs: Path) -> None:
    space = parse_space(tiny_space(runs, "short", **{"constraints.max_macs_ratio": 0.7}))
    summary = run_search(space, quiet=True)

    study = load_study("short", space.storage_url)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 5 and summary.trials == 5
    baselines = [t for t in study.trials if t.user_attrs.get("baseline")]
    # the 0.75 level runs at the groups' upper bound, 0.7, and is labelled so
    assert sorted(t.user_attrs["baseline_ratio"] for t in baselines) == [0.25, 0.5, 0.7]

    runs_ = child_runs(runs, "short")
    assert sorted(int(r.data.tags["autoprune.trial"]) for r in runs_) == [0, 1, 2, 3, 4]
    groups = [g for g in study.trials[0].params]
    kept = {t.number: t.user_attrs["kept_channels"] for t in finished}
    for r in runs_:
        assert {f"ratio.{g}" for g in groups} <= set(r.data.params)
        # the channels each group kept (a ratio asked is rounded: the tables showed only it)
        assert {k: int(v) for k, v in r.data.params.items() if k.startswith("kept.")} == \
            {f"kept.{g}": c for g, c in kept[int(r.data.tags["autoprune.trial"])].items()}
        assert {"importance", "round_to"} <= set(r.data.params)
        assert {"proxy_accuracy", "macs", "flops", "macs_ratio", "params", "latency_ms",
                "latency_p90_ms", "speedup"} <= set(r.data.metrics)
        # only a fine-tuned trial has a final accuracy: an infeasible one has its proxy
        assert ("accuracy" in r.data.metrics) == (r.data.tags["state"] == "complete")
        assert r.data.metrics["flops"] == 2 * r.data.metrics["macs"]
        assert r.info.run_name == f"short/trial-{r.data.tags['autoprune.trial']}"
        assert r.data.tags["state"] in ("complete", "infeasible")
        assert r.data.tags["mlflow.parentRunId"] == summary.parent_run_id
        if r.data.tags["state"] == "complete":
            assert "finetune_loss" in r.data.metrics
            assert r.data.metrics["macs_ratio"] <= 0.7
        else:  # infeasible: skipped fine-tuning, constraint recorded
            assert r.data.metrics["constraint.macs_ratio"] > 0
            assert r.data.metrics["finetune_steps"] == 0

    # the pareto tag is true on exactly Optuna's best_trials (a config that ran twice: once),
    # all of them feasible
    tagged = {int(r.data.tags["autoprune.trial"]) for r in runs_
              if r.data.tags["pareto"] == "true"}
    front = [study.trials[n] for n in front_numbers(study)]
    assert tagged == {t.number for t in front}
    assert {tuple(t.params.values()) for t in front} == \
        {tuple(t.params.values()) for t in study.best_trials}
    assert tagged and all(t.user_attrs["state"] == "complete" for t in front)
    # the uniform 0.25 baseline keeps ~0.56 of the MACs, above the 0.7 limit? It must obey it.
    for t in front:
        assert t.user_attrs["macs_ratio"] <= 0.7

    client = MlflowClient(space.tracking_uri)
    parent = client.get_run(summary.parent_run_id)
    assert parent.data.metrics["base_accuracy"] > 0.5
    names = {a.path for a in client.list_artifacts(summary.parent_run_id)}
    assert {"trials.csv", "pareto.csv", "space.yaml", "plots"} <= names
    import pandas as pd

    table = pd.read_csv(summary.study_dir / "trials.csv")
    for _, row in table.iterrows():
        assert {g: int(row[f"kept.{g}"]) for g in groups} == kept[int(row["trial"])]
    plots = {a.path for a in client.list_artifacts(summary.parent_run_id, "plots")}
    assert "plots/pareto_accuracy_vs_macs.png" in plots
    assert "plots/pareto_accuracy_vs_latency.html" in plots


def test_failed_trial_is_recorded_and_search_goes_on(runs: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fragile_model.py").write_text(FRAGILE_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    space = parse_space(tiny_space(
        runs, "fragile", **{"model.source": "fragile_model:build", "model.kwargs": {},
                            "groups.default": {"low": 0.0, "high": 0.8, "step": 0.05},
                            "search.trials": 5}))
    summary = run_search(space, quiet=True)
    study = load_study("fragile", space.storage_url)
    states = {t.number: t.state for t in study.trials}
    failed_numbers = sorted(n for n, st in states.items() if st == optuna.trial.TrialState.FAIL)
    assert [n for ns in summary.errors.values() for n in ns] == failed_numbers
    assert all("this block needs >= 6 channels" in line for line in summary.errors)
    # 0.75 uniform leaves conv1 with 3 of 12 channels: the user's forward raises
    assert states[2] == optuna.trial.TrialState.FAIL
    assert "needs >= 6 channels" in study.trials[2].user_attrs["error"]
    assert sum(s == optuna.trial.TrialState.COMPLETE for s in states.values()) >= 3
    assert len(states) == 5
    failed = [r for r in child_runs(runs, "fragile") if r.data.tags["state"] == "failed"]
    failed_in_optuna = {n for n, s in states.items() if s == optuna.trial.TrialState.FAIL}
    assert {int(r.data.tags["autoprune.trial"]) for r in failed} == failed_in_optuna
    for r in failed:
        assert r.info.status == "FAILED" and "needs >= 6 channels" in r.data.tags["error"]
        assert "params" not in r.data.metrics  # was 0.0: a "0-parameter model" sorted first
    # trials.csv holds each failed trial's whole traceback, as the summary says
    import pandas as pd

    table = pd.read_csv(runs / "studies" / "fragile" / "trials.csv")
    errors = table.set_index("trial")["error"]
    first, _, rest = errors[2].partition("\n")
    assert first.endswith("RuntimeError: this block needs >= 6 channels, got 3")
    assert rest.startswith("Traceback (most recent call last):") and "fragile_model.py" in rest
    assert errors[[n for n in states if n not in failed_in_optuna]].isna().all()


SHUFFLE_MODEL = '''
import torch
from torch import nn


class Shuffle(nn.Module):
    """A channel shuffle (ShuffleNet's) after conv2, whose channels then cross a reshape, and a
    depthwise conv with a channel multiplier after conv1, whose 8 channels are 8 blocks."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.conv2 = nn.Conv2d(16, 16, 1)
        self.conv3 = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.dw(torch.relu(self.conv1(x))))
        x = torch.relu(self.conv2(x))
        n, c, h, w = x.shape
        x = x.view(n, 4, c // 4, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(torch.relu(self.conv3(x)).mean((2, 3)))


def build():
    return Shuffle()
'''


def test_a_search_names_the_groups_its_model_keeps_out(
        runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`autoprune layers` listed the groups a model's structure keeps out of the search; the
    search itself said nothing, so a user who never ran `layers` did not know that a layer
    (a channel shuffle's) was never pruned."""
    import yaml

    from autoprune.cli import main as cli

    (tmp_path / "shuffle_model.py").write_text(SHUFFLE_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "space.yaml"
    spec = tiny_space(runs, "kept-out", **{"model.source": "shuffle_model:build",
                                           "model.kwargs": {}, "search.baselines": [],
                                           "search.trials": 1})
    path.write_text(yaml.safe_dump(spec))
    assert cli(["search", str(path), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: 2 group(s) of this model cannot be searched, and keep their width" in err
    assert "  conv2: its channels cross a reshape that does not keep them whole" in err
    assert "  conv1: its 8 channels are 8 blocks of one" in err
    study = load_study("kept-out", f"sqlite:///{runs / 'optuna.db'}")
    assert set(study.trials[0].params) == {"dw", "conv3"}

    # ignored, they are not named again
    spec["groups"]["ignore"] = ["conv1", "conv2"]
    path.write_text(yaml.safe_dump({**spec, "name": "kept-out-ignored"}))
    assert cli(["search", str(path), "--quiet"]) == 0
    assert "cannot be searched" not in capsys.readouterr().err


def test_a_base_model_no_better_than_its_most_common_class_is_said(
        runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A base at chance (0.087 on 10 classes) was searched, put on the front and exported
    without a word, and the search's summary never showed the base accuracy."""
    import torch

    from autoprune.cli import main as cli
    from autoprune.sources import build_model

    model = build_model("builtin:resnet_tiny", (1, 1, 8, 8), 10, {"width": 8})
    with torch.no_grad():
        model.fc.weight.zero_()  # the same logits for every input: one answer
        model.fc.bias.copy_(torch.arange(10.0))
    ckpt = tmp_path / "constant.pt"
    torch.save(model.state_dict(), ckpt)
    path = tmp_path / "space.yaml"
    import yaml

    path.write_text(yaml.safe_dump(tiny_space(runs, "chance", **{
        "model.checkpoint": str(ckpt), "search.baselines": [], "search.trials": 1})))
    assert cli(["search", str(path), "--quiet"]) == 0
    out = capsys.readouterr()
    study = load_study("chance", f"sqlite:///{runs / 'optuna.db'}")
    acc = study.user_attrs["base"]["accuracy"]
    assert 0.05 < acc < 0.2  # class 9's share of the validation split
    assert (f"warning: the base model scores {acc:.4f} on the validation data, no better than "
            "always answering its most common class (") in out.err
    assert "it gave the same answer every time" in out.err
    assert f"is model.checkpoint ({ckpt}) this model's weights" in out.err
    assert f"study chance: 1 trials (0 failed); base accuracy {acc:.4f}; Pareto front" in out.out

    # a trained base says nothing of the kind
    path.write_text(yaml.safe_dump(tiny_space(runs, "trained", **{
        "search.baselines": [], "search.trials": 1})))
    assert cli(["search", str(path), "--quiet"]) == 0
    assert "no better than always answering" not in capsys.readouterr().err


def test_a_search_whose_output_goes_to_a_file_logs_a_line_per_trial(
        runs: Path, tmp_path: Path) -> None:
    """Sent to a file (nohup, a batch job, a Ray job), the progress bar's redraws made one
    line of 85 KB after 400 trials, with no trial in it, and --quiet left nothing at all."""
    import subprocess

    import yaml

    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(tiny_space(runs, "logged", **{
        "search.trials": 3, "search.baselines": [0.5],
        "search.warm_start.sensitivity": True})))
    cmd = [sys.executable, "-m", "autoprune.cli", "search", str(path)]
    with open(tmp_path / "log.txt", "w") as log:
        assert subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                              timeout=600).returncode == 0
    raw = (tmp_path / "log.txt").read_bytes()
    assert b"\r" not in raw  # no bar redrawn (read as text, \r would read as \n)
    text = raw.decode()
    lines = [x for x in text.splitlines() if x.startswith("autoprune: trial ")]
    assert [x.split(" complete")[0] for x in lines] == [
        f"autoprune: trial {n}" for n in range(3)], lines
    assert lines[0].startswith("autoprune: trial 0 complete (warm start): accuracy 0.")
    assert lines[0].endswith("[1/3; failed 0, pruned 0, front 1]")
    assert "accuracy 0." in lines[0] and "macs_ratio 0." in lines[0]
    scanned = [x for x in text.splitlines() if x.startswith("autoprune: sensitivity ")]
    assert any(x.startswith("autoprune: sensitivity 1/") for x in scanned), text

    quiet = subprocess.run([*cmd, "--trials", "4", "--resume", "--quiet"], capture_output=True,
                           timeout=600)
    assert quiet.returncode == 0, quiet.stderr
    assert b"autoprune: trial" not in quiet.stderr and b"\r" not in quiet.stderr
    assert b"study logged: 4 trials" in quiet.stdout


def test_a_running_trial_shows_in_mlflow_with_its_ratios(runs: Path, tmp_path: Path) -> None:
    """A trial's child run was made when it ended: a 30-minute trial was invisible in the UI,
    its ratios included, until then. It opens when the trial starts and the same run ends."""
    import subprocess
    import time

    import yaml

    name = "live"
    path = tmp_path / "live.yaml"
    path.write_text(yaml.safe_dump(tiny_space(runs, name, **{
        "search.trials": 2, "search.baselines": [0.5], "finetune.steps": 1000})))
    run_search(parse_space(tiny_space(runs, "live-warm", **{"search.trials": 1})), quiet=True)
    proc = subprocess.Popen([sys.executable, "-m", "autoprune.cli", "search", str(path),
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen: dict[str, Any] = {}
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not seen:
            time.sleep(0.2)
            if not (runs / "mlflow.db").exists():
                continue
            try:
                running = [r for r in child_runs(runs, name) if r.info.status == "RUNNING"]
            except AssertionError:  # no experiment yet
                continue
            if running:
                seen = {"id": running[0].info.run_id, "tags": running[0].data.tags,
                        "params": running[0].data.params}
        _out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert seen, "no child run showed while a trial ran"
    assert seen["tags"]["state"] == "running" and seen["tags"]["autoprune.trial"] == "0"
    assert seen["params"]["ratio.stem.0"] == "0.5"  # the uniform baseline's ratios, at its start
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    done = client.get_run(seen["id"])  # the same run, finished
    assert done.info.status == "FINISHED" and done.data.tags["state"] == "complete"
    assert "accuracy" in done.data.metrics
    # the params it opened with, and the channels each group kept (known once it is pruned)
    assert {k: v for k, v in done.data.params.items() if not k.startswith("kept.")} == \
        seen["params"] and "kept.stem.0" in done.data.params
    assert sorted(int(r.data.tags["autoprune.trial"]) for r in child_runs(runs, name)) == [0, 1]


def test_a_trial_s_log_line_says_what_became_of_it() -> None:
    from optuna.distributions import FloatDistribution

    from autoprune.search import trial_line

    def line(**attrs: Any) -> str:
        frozen = optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE, values=[0.9, 0.5],
            params={"a": 0.5}, distributions={"a": FloatDistribution(0.0, 0.9)},
            user_attrs={"duration_s": 1.25, **attrs})
        frozen.number = 0  # (a trial made outside a study has none)
        return trial_line(frozen, 3, 10, {"failed": 0, "pruned": 1, "front": 2})

    assert line(state="complete", accuracy=0.91, macs_ratio=0.5, speedup=1.5) == (
        "autoprune: trial 0 complete: accuracy 0.9100, macs_ratio 0.500, 1.50x faster, 1.2 s "
        "[3/10; failed 0, pruned 1, front 2]")
    assert line(state="infeasible", accuracy=0.8, macs_ratio=0.567, baseline=True,
                baseline_ratio=0.25, constraints={"macs_ratio": 0.267, "params_ratio": -0.1}
                ).startswith("autoprune: trial 0 infeasible (baseline): proxy accuracy 0.8000, "
                             "macs_ratio 0.567, 0.267 over constraints.max_macs_ratio, 1.2 s")
    assert line(state="pruned", accuracy=0.7).startswith(
        "autoprune: trial 0 stopped at a rung: accuracy at the stop 0.7000")
    assert line(state="failed", error="ValueError: boom\nTraceback ...").startswith(
        "autoprune: trial 0 failed: ValueError: boom, 1.2 s [3/10;")
    assert "the model of trial 2, reused" in line(state="complete", duplicate_of=2)
    # a trial timed slower than the base: not "0.80x faster" (the model card says slower)
    assert "macs_ratio 0.784, 1.25x slower, 1.2 s" in line(state="complete", accuracy=0.99,
                                                           macs_ratio=0.784, speedup=0.8)


def test_a_search_whose_every_trial_fails_says_why_and_exits_non_zero(
        runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from autoprune.cli import main as cli

    (tmp_path / "fragile_model.py").write_text(FRAGILE_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "space.yaml"
    spec = tiny_space(runs, "all-fail", **{"model.source": "fragile_model:build",
                                           "model.kwargs": {"train_only": True},
                                           "groups.default": {"low": 0.75, "high": 0.8,
                                                              "step": 0.05},
                                           "search.baselines": [], "search.trials": 2})
    path.write_text(yaml.safe_dump(spec))
    assert cli(["search", str(path), "--quiet"]) == 1
    out = capsys.readouterr()
    assert "2 trials (2 failed)" in out.out
    line = next(x for x in out.out.splitlines() if x.startswith("  2 trial(s) [0, 1]: "))
    assert "this block needs >= 6 channels" in line
    assert "every trial failed" in out.err
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    parent = client.get_run(load_study("all-fail", parse_space(spec).storage_url)
                            .user_attrs["parent_run_id"])
    assert parent.info.status == "FAILED"  # was FINISHED, beside the CLI's exit 1

    # failing in eval mode too, conv1's group fails the check that it prunes at all: it is
    # left out, with a warning, and the search runs over the groups that prune
    spec["model"]["kwargs"] = {}
    path.write_text(yaml.safe_dump({**spec, "name": "left-out"}))
    assert cli(["search", str(path), "--quiet"]) == 0
    out = capsys.readouterr()
    assert ("warning: 1 group(s) left out of the search, because Torch-Pruning cannot prune "
            "them") in out.err
    assert "  conv1: pruning it to ratio 0.75 fails (RuntimeError: this block needs >= 6 " \
           "channels, got 3)" in out.err
    assert "2 trials (0 failed" in out.out  # (the second repeats the first's model)
    study = load_study("left-out", f"sqlite:///{runs / 'optuna.db'}")
    assert all(set(t.params) == {"conv2"} for t in study.trials)

    # with conv2 ignored too, nothing is left: the search ran every trial on the unpruned
    # model and exited 0 (its export was the base model); now it is an error, before a study
    # and before the base model is trained
    spec["groups"]["ignore"] = ["conv2"]
    spec["model"]["train"]["epochs"] = 1  # another base model than the one cached above
    path.write_text(yaml.safe_dump({**spec, "name": "none-left"}))
    bases = set((runs / "base").glob("*.pt"))
    assert cli(["search", str(path), "--quiet"]) == 2
    assert set((runs / "base").glob("*.pt")) == bases
    err = capsys.readouterr().err
    assert "conv1: pruning it to ratio 0.75 fails" in err
    assert ("error: model.source: got 'fragile_model:build'; allowed: a model with a channel "
            "group Torch-Pruning can prune") in err
    assert "none-left" not in list_studies(f"sqlite:///{runs / 'optuna.db'}")


def test_kill_then_resume_loses_and_duplicates_nothing(runs: Path, tmp_path: Path) -> None:
    import yaml

    space_file = tmp_path / "resume.yaml"
    space_file.write_text(yaml.safe_dump(tiny_space(runs, "resume", **{"search.trials": 7})))
    space = parse_space(yaml.safe_load(space_file.read_text()))
    # warm the base checkpoint cache so the subprocess starts trials quickly
    run_search(parse_space(tiny_space(runs, "resume-warm", **{"search.trials": 1})), quiet=True)
    cmd = [sys.executable, "-m", "autoprune.cli", "search", str(space_file), "--quiet"]
    kill_when_finished(cmd, "resume", space.storage_url, finished=2, timeout=240)

    study = load_study("resume", space.storage_url)
    before = {t.number for t in study.trials if t.state.is_finished()}
    with pytest.raises(AutopruneError, match="--resume"):
        run_search(space, quiet=True)
    run_search(space, resume=True, quiet=True)

    study = load_study("resume", space.storage_url)
    counted = [t for t in study.trials if t.state.is_finished()
               and not t.user_attrs.get("interrupted")]
    assert len(counted) == 7
    assert before <= {t.number for t in study.trials}
    logged = [int(r.data.tags["autoprune.trial"]) for r in child_runs(runs, "resume")]
    assert len(logged) == len(set(logged)), "a trial was logged twice"
    assert set(logged) == {t.number for t in counted}
    baselines = sorted(t.user_attrs["baseline_ratio"] for t in counted
                       if t.user_attrs.get("baseline"))
    assert baselines == [0.25, 0.5, 0.7]  # 0.75 runs at the groups' 0.7


@pytest.mark.parametrize("jobs", [1, 2])
def test_ctrl_c_leaves_no_trial_running_and_resume_finishes(runs: Path, tmp_path: Path,
                                                            jobs: int) -> None:
    """After Ctrl-C a trial that was running showed as RUNNING in Optuna (a phantom for any
    Optuna tool) until the next --resume; it is now marked interrupted and queued at once.
    With --jobs 2, waiting workers printed their KeyboardInterrupt tracebacks, and a Ctrl-C
    inside a trial's record left the SQLite storage locked (a traceback, exit 1)."""
    import signal

    import yaml

    name = f"ctrlc{jobs}"
    space_file = tmp_path / "ctrlc.yaml"
    space_file.write_text(yaml.safe_dump(tiny_space(runs, name, **{"search.trials": 7})))
    space = parse_space(yaml.safe_load(space_file.read_text()))
    run_search(parse_space(tiny_space(runs, f"{name}-warm", **{"search.trials": 1})),
               quiet=True)  # the base model trained before the clock starts
    cmd = [sys.executable, "-m", "autoprune.cli", "search", str(space_file), "--jobs", str(jobs)]
    outcome: dict[str, Any] = {}
    kill_when_finished(cmd, name, space.storage_url, finished=2, timeout=240,
                       sig=signal.SIGINT, outcome=outcome)
    assert outcome["rc"] == 130, outcome["stderr"][-2000:]
    assert "Traceback" not in outcome["stderr"], outcome["stderr"][-3000:]
    study = load_study(name, space.storage_url)
    assert not [t.number for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    cut = [t for t in study.trials if t.user_attrs.get("interrupted")]
    if cut:  # the signal came during a trial (not between two): its copy waits in the queue
        assert f"interrupted trials {[t.number for t in cut]} are queued" in outcome["stderr"]
        waiting = [t.system_attrs["fixed_params"] for t in study.trials
                   if t.state == optuna.trial.TrialState.WAITING]
        assert all(t.params in waiting for t in cut)
    # no trial's run left RUNNING: the cut trial's run (open since it started) is deleted
    counted = {t.number for t in study.trials if t.state.is_finished()
               and not t.user_attrs.get("interrupted")}
    children = child_runs(runs, name)
    assert {r.info.status for r in children} <= {"FINISHED", "FAILED"}
    assert sorted(int(r.data.tags["autoprune.trial"]) for r in children) == sorted(counted)
    run_search(space, resume=True, quiet=True)
    study = load_study(name, space.storage_url)
    counted = {t.number for t in study.trials if t.state.is_finished()
               and not t.user_attrs.get("interrupted")}
    assert len(counted) == 7
    children = child_runs(runs, name)
    assert sorted(int(r.data.tags["autoprune.trial"]) for r in children) == sorted(counted)


def _alive_children(pid: int) -> set[int]:
    """Processes whose parent is ``pid`` and that have not ended (zombies count as ended)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(stat.parent.name))
    return out


def _still_alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
def test_workers_end_when_the_search_is_killed(runs: Path, tmp_path: Path) -> None:
    """After a kill -9 (or an out-of-memory kill) of a --jobs 2 search, its worker processes
    and their manager lived on, idle and holding memory, until killed by hand."""
    import signal
    import subprocess
    import time

    import yaml

    space_file = tmp_path / "orphans.yaml"
    space_file.write_text(yaml.safe_dump(tiny_space(runs, "orphans", **{
        "search.trials": 6, "finetune.steps": 200})))
    space = parse_space(yaml.safe_load(space_file.read_text()))
    run_search(parse_space(tiny_space(runs, "orphans-warm", **{"search.trials": 1})),
               quiet=True)
    proc = subprocess.Popen([sys.executable, "-m", "autoprune.cli", "search", str(space_file),
                             "--jobs", "2", "--quiet"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    children: set[int] = set()

    def all_started(study: optuna.Study) -> bool:  # the manager and two workers
        nonlocal children
        if any(t.state == optuna.trial.TrialState.RUNNING for t in study.trials):
            children = _alive_children(proc.pid)
        return len(children) >= 3

    try:
        wait_for_study(proc, "orphans", space.storage_url, all_started, every=0.3)
        assert proc.poll() is None and len(children) >= 3, children
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.time() + 30
        while time.time() < deadline and _still_alive(children):
            time.sleep(0.3)
        assert not _still_alive(children), "the search's processes outlived it"
    finally:
        for pid in _still_alive(children):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return -1
    return int(fields[11]) + int(fields[12])  # utime + stime


def _trials_by_outcome(study: optuna.Study) -> tuple[list[Any], list[Any]]:
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL
              and not t.user_attrs.get("interrupted")]
    cut = [t for t in study.trials if t.user_attrs.get("interrupted")]
    return failed, cut


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_a_worker_killed_fails_its_trial_alone_and_the_search_goes_on(
        runs: Path, tmp_path: Path) -> None:
    """kill -9 of one --jobs 2 worker (the out-of-memory killer): both trials in flight were
    failed with the same words, so the healthy one (a uniform baseline) never ran again. Now
    only the killed worker's trial fails, saying how; the other runs again."""
    import signal

    import yaml

    space_file = tmp_path / "oom.yaml"
    space_file.write_text(yaml.safe_dump(tiny_space(runs, "oom", **{
        "search.trials": 5, "finetune.steps": 300})))
    space = parse_space(yaml.safe_load(space_file.read_text()))
    run_search(parse_space(tiny_space(runs, "oom-warm", **{"search.trials": 1})), quiet=True)
    proc = subprocess.Popen([sys.executable, "-m", "autoprune.cli", "search", str(space_file),
                             "--jobs", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        # one trial finished (both workers have started), the next two running
        assert wait_for_study(proc, "oom", space.storage_url, lambda study: [
            t.state for t in study.trials].count(optuna.trial.TrialState.RUNNING) == 2 and any(
            t.state == optuna.trial.TrialState.COMPLETE for t in study.trials), every=0.2)
        time.sleep(0.5)
        busiest = max(_alive_children(proc.pid), key=_cpu_ticks)  # a worker, not the manager
        os.kill(busiest, signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    study = load_study("oom", space.storage_url)
    failed, cut = _trials_by_outcome(study)
    assert len(failed) == 1 and "killed by SIGKILL" in failed[0].user_attrs["error"], \
        [t.user_attrs.get("error") for t in failed]
    assert len(cut) == 1 and f"trial(s) [{cut[0].number}] ran beside the worker" in err
    # the trial cut beside it ran again with its ratios (a uniform baseline keeps its role)
    again = [t for t in study.trials if t.number > cut[0].number and t.params == cut[0].params
             and t.state == optuna.trial.TrialState.COMPLETE]
    assert again and again[0].user_attrs.get("baseline") == cut[0].user_attrs.get("baseline")
    runs_now = child_runs(runs, "oom")
    assert sorted(int(r.data.tags["autoprune.trial"]) for r in runs_now) == sorted(
        t.number for t in study.trials if not t.user_attrs.get("interrupted"))
    assert "RUNNING" not in {r.info.status for r in runs_now}


def test_a_second_search_of_a_running_study_is_refused(runs: Path, tmp_path: Path) -> None:
    """A --resume started while the study's search ran took its running trial for one a dead
    process left (re-queued it, marked it failed), and the first search then crashed recording
    it (UpdateFinishedTrialError): its work was lost. The second now stops before any work."""
    import yaml

    space_file = tmp_path / "busy.yaml"
    space_file.write_text(yaml.safe_dump(tiny_space(runs, "busy", **{
        "search.trials": 3, "finetune.steps": 150})))
    space = parse_space(yaml.safe_load(space_file.read_text()))
    run_search(parse_space(tiny_space(runs, "busy-warm", **{"search.trials": 1})), quiet=True)
    proc = subprocess.Popen([sys.executable, "-m", "autoprune.cli", "search", str(space_file),
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert wait_for_study(proc, "busy", space.storage_url, lambda study: any(
            t.state == optuna.trial.TrialState.RUNNING for t in study.trials), every=0.2)
        with pytest.raises(AutopruneError, match=r"--study: study 'busy' is being searched by "
                                                 r"another process on this machine; allowed: "
                                                 rf"wait .*\(held by pid {proc.pid} since"):
            run_search(space, resume=True, quiet=True)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    study = load_study("busy", space.storage_url)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert not any(t.user_attrs.get("interrupted") for t in study.trials)
    # once it has ended, the study is free again
    assert run_search(space, resume=True, trials=4, quiet=True).trials == 4


def test_a_worker_that_dies_while_the_search_records_does_not_end_it(
        runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker killed while the controller recorded a trial or asked the next one broke the
    pool there: the next submit raised BrokenProcessPool, uncaught, and the search ended in a
    traceback (2 of 2 tries)."""
    import multiprocessing as mp
    import signal

    from autoprune.search import Recorder

    space = parse_space(tiny_space(runs, "broke", **{"search.trials": 5, "search.jobs": 2}))
    starts = [0]
    start = Recorder.start

    def start_and_kill(self: Any, trial: Any, ratios: Any) -> None:
        starts[0] += 1
        if starts[0] == 3:  # after the first trial's record, before the next submit
            for child in mp.active_children():
                if child.name.startswith("SpawnProcess"):  # the pool's workers
                    os.kill(child.pid, signal.SIGKILL)
            time.sleep(2)  # the pool sees it broken
        start(self, trial, ratios)

    monkeypatch.setattr(Recorder, "start", start_and_kill)
    summary = run_search(space, quiet=True)
    assert summary.trials == 5
    study = load_study("broke", space.storage_url)
    failed, cut = _trials_by_outcome(study)
    assert cut  # the trial asked when the pool broke never ran: it runs again
    assert all("killed by SIGKILL" in t.user_attrs["error"] for t in failed)
    runs_now = child_runs(runs, "broke")
    assert "RUNNING" not in {r.info.status for r in runs_now}
    assert len(runs_now) == 5


def test_sigterm_to_the_search_alone_ends_it_as_ctrl_c_does(runs: Path, tmp_path: Path) -> None:
    """SIGTERM (``timeout``, a batch scheduler, ``docker stop``) killed the search at once: its
    MLflow parent run stayed RUNNING for good, its trial RUNNING in Optuna, its tables stale.
    Sent to the search's process alone, its workers (--jobs 2) never heard of it."""
    import signal

    import yaml

    space_file = tmp_path / "term.yaml"
    space_file.write_text(yaml.safe_dump(tiny_space(runs, "term", **{"search.trials": 9})))
    space = parse_space(yaml.safe_load(space_file.read_text()))
    run_search(parse_space(tiny_space(runs, "term-warm", **{"search.trials": 1})), quiet=True)
    cmd = [sys.executable, "-m", "autoprune.cli", "search", str(space_file), "--jobs", "2"]
    outcome: dict[str, Any] = {}
    kill_when_finished(cmd, "term", space.storage_url, finished=2, timeout=240,
                       sig=signal.SIGTERM, outcome=outcome, group=False)
    assert outcome["rc"] == 128 + signal.SIGTERM, outcome["stderr"][-2000:]
    assert "autoprune: interrupted by SIGTERM" in outcome["stderr"]
    assert "Traceback" not in outcome["stderr"], outcome["stderr"][-3000:]
    study = load_study("term", space.storage_url)
    assert not [t.number for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    assert client.get_run(study.user_attrs["parent_run_id"]).info.status == "KILLED"
    finished = {t.number for t in study.trials if t.state.is_finished()
                and not t.user_attrs.get("interrupted")}
    table = (runs / "studies" / "term" / "trials.csv").read_text().splitlines()
    assert len(table) - 1 >= len(finished)  # remade at the stop, not at the last 5th trial


@pytest.mark.parametrize("where", ["reconcile", "report"])
def test_a_stop_outside_the_trials_still_closes_the_parent_run(
        runs: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """SIGTERM while a resume logged the finished trials to a new parent run, or while the last
    tables were remade, left the parent RUNNING: the stop handler covered the trials only, and
    an interrupt in the final report skipped closing the run (Ctrl-C too)."""
    import signal
    import time

    from autoprune.search import Recorder
    from autoprune.signals import STOPPED_BY

    real = getattr(Recorder, where)

    def stopped(self: Any, *args: Any, **kwargs: Any) -> Any:
        if where == "reconcile" or kwargs.get("final"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # the handler raises in here
        return real(self, *args, **kwargs)

    spec = tiny_space(runs, f"stop-{where}", **{"search.trials": 1, "search.baselines": [0.5]})
    monkeypatch.setattr(Recorder, where, stopped)
    before = signal.getsignal(signal.SIGTERM)  # Ray's, after a Ray test in this process
    try:
        with pytest.raises(KeyboardInterrupt):
            run_search(parse_space(spec), quiet=True)
        assert STOPPED_BY[-1] == signal.SIGTERM
    finally:
        STOPPED_BY.clear()
    study = load_study(f"stop-{where}", parse_space(spec).storage_url)
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    assert client.get_run(study.user_attrs["parent_run_id"]).info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is before  # put back


def test_a_resume_after_the_parent_run_was_deleted_logs_all_under_the_new_one(
        runs: Path, tmp_path: Path) -> None:
    """The study's parent run deleted in the UI, --resume started a new one but logged none of
    the finished trials to it (their runs, under the deleted parent, counted as logged); a
    trial logged late stayed ``pareto: false`` when no new trial ran after it, had no
    ``prune_record.json``, and export could pick the run under the deleted parent. The
    parent's params showed the file's search.trials, not the run's ``--trials``."""
    from autoprune.export import export_trial

    spec = tiny_space(runs, "reparent", **{"search.trials": 4})
    run_search(parse_space(spec), trials=3, quiet=True)
    storage = parse_space(spec).storage_url
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    old = load_study("reparent", storage).user_attrs["parent_run_id"]
    assert client.get_run(old).data.params["search.trials"] == "3"
    client.delete_run(old)
    run_search(parse_space(spec), trials=3, resume=True, quiet=True)  # no new trial
    study = load_study("reparent", storage)
    new = study.user_attrs["parent_run_id"]
    assert new != old
    under = [r for r in child_runs(runs, "reparent")
             if r.data.tags["mlflow.parentRunId"] == new]
    assert sorted(int(r.data.tags["autoprune.trial"]) for r in under) == [0, 1, 2]
    tagged = {int(r.data.tags["autoprune.trial"]) for r in under
              if r.data.tags["pareto"] == "true"}
    assert tagged == front_numbers(study) and tagged
    for r in under:
        assert [a.path for a in client.list_artifacts(r.info.run_id)] == ["prune_record.json"]
    assert client.get_run(new).data.tags["autoprune.trials"] == "3"
    import json

    export_trial("reparent", storage, "max-accuracy", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "prune_config.json").read_text())
    assert config["source"]["mlflow_run_id"] in {r.info.run_id for r in under}


def test_parent_params_keep_glob_patterns_apart_and_ratios_read_as_set() -> None:
    """``layer3.*`` and ``layer3.?`` became one key (``layer3._``): one range was lost; ratios
    read 0.6000000000000001."""
    from autoprune.study import tidy_number as _num
    from autoprune.tracking import _flatten

    flat = _flatten({"groups": {"patterns": {"layer3.*": {"low": 0.1}, "layer3.?": {"low": 0.2},
                                             "a[0-9]": {"high": 0.3}}}})
    assert flat == {"groups.patterns.layer3._star_.low": 0.1,
                    "groups.patterns.layer3._qmark_.low": 0.2,
                    "groups.patterns.a_lbr_0-9_rbr_.high": 0.3}
    assert _num(0.6000000000000001) == 0.6 and str(_num(0.35000000000000003)) == "0.35"
    assert _num(3) == 3 and _num("x") == "x"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_python_drops_still_stops_the_search(runs: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C that lands while a ``__del__`` or weakref callback runs: Python prints
    "Exception ignored in ..." and drops the KeyboardInterrupt (seen once in a test: the search
    ran on to the end). The search still stops, after the trial it was in."""
    import os
    import signal
    import time

    from autoprune.controllers import optuna_local

    class PressesCtrlC:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the handler runs in here: its exception is dropped

    real, calls = optuna_local.run_trial, []

    def trial_then_ctrl_c(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            PressesCtrlC()  # made and collected at once
        return result

    monkeypatch.setattr(optuna_local, "run_trial", trial_then_ctrl_c)
    space = parse_space(tiny_space(runs, "dropped", **{"search.trials": 5}))
    with pytest.raises(KeyboardInterrupt):
        run_search(space, quiet=True)
    study = load_study("dropped", space.storage_url)
    assert len([t for t in study.trials if t.state.is_finished()]) == 2


def test_bad_run_options_fail_before_any_work(runs: Path, tmp_path: Path) -> None:
    from autoprune.cli import main as cli

    spec = tiny_space(runs, "options")
    space = parse_space(spec)
    with pytest.raises(ConfigError, match=r"--study: got '\.\./escaped'.*without spaces, "
                                          "slashes"):
        run_search(space, study_name="../escaped", quiet=True)
    for flag, bad in (("--trials", "0"), ("--jobs", "-2"), ("--seed", "-1"),
                      ("--timeout", "2 hours"), ("--timeout", "0")):
        with pytest.raises(SystemExit):  # argparse: "got '0'; allowed: an integer > 0"
            cli(["search", "x.yaml", flag, bad])
    with pytest.raises(ConfigError, match="--trials: got 0"):
        run_search(space, trials=0, quiet=True)
    (tmp_path / "afile").write_text("")
    blocked = tmp_path / "afile" / "runs"
    with pytest.raises(ConfigError, match=r"runs_dir: got .*afile/runs'; allowed: a folder "
                                          "autoprune can create and write"):
        run_search(parse_space(tiny_space(blocked, "options")), quiet=True)
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    away = tmp_path / "away"
    with pytest.raises(AutopruneError, match=r"tracking.uri: got 'http://127.0.0.1:\d+', which "
                                             "does not answer"):
        run_search(parse_space(tiny_space(away, "options", tracking={"uri": down})), quiet=True)
    assert not (away / "base").exists()  # nothing trained before the check
    with pytest.raises(SourceError, match=r"model.kwargs: got \['widht'\] for "
                                          r"builtin:resnet_tiny; allowed: its parameters"):
        run_search(parse_space(tiny_space(away, "options", **{"model.kwargs": {"widht": 8}})),
                   quiet=True)


def test_an_mlflow_store_that_cannot_be_read_is_named_before_any_work(tmp_path: Path) -> None:
    """A store whose creation a full disk cut was left half-migrated: every later search in
    that runs dir failed after its base training, on "table _alembic_tmp_experiments already
    exists", with no word of the store."""
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "mlflow.db").write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 8)
    space = parse_space(tiny_space(runs, "cut"))
    with pytest.raises(AutopruneError, match=r"tracking.uri: the MLflow store .*mlflow.db "
                                             r"cannot be read .*allowed: move it away"):
        run_search(space, quiet=True)
    assert not (runs / "base").exists()  # before the base model's training


def test_a_search_outlives_its_mlflow_server(runs: Path, tmp_path: Path) -> None:
    """The server goes away mid-search: the search finishes every trial (kept in Optuna), says
    so, and a --resume with the server back logs what MLflow missed, once each."""
    import os
    import subprocess

    import yaml

    store, port = tmp_path / "server", free_port()
    store.mkdir()
    run_search(parse_space(tiny_space(runs, "outage-warm", **{"search.trials": 1})), quiet=True)
    with mlflow_server_process(store, port) as url:
        spec = tiny_space(runs, "outage", tracking={"uri": url}, **{"search.trials": 6})
        (tmp_path / "outage.yaml").write_text(yaml.safe_dump(spec))
        space = parse_space(spec)
        env = dict(os.environ, MLFLOW_HTTP_REQUEST_MAX_RETRIES="1",
                   MLFLOW_HTTP_REQUEST_TIMEOUT="5")  # the user's setting wins over autoprune's
        proc = subprocess.Popen([sys.executable, "-m", "autoprune.cli", "search",
                                 str(tmp_path / "outage.yaml")], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_study(proc, "outage", space.storage_url,
                       lambda study: sum(t.state.is_finished() for t in study.trials) >= 2)
        assert proc.poll() is None, "the search ended before the server went away"
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "the search goes on without MLflow" in err
    study = load_study("outage", space.storage_url)
    assert sum(t.state.is_finished() for t in study.trials) == 6
    # a line per trial (stderr is a pipe): its front count is the study's, not the one MLflow
    # had when it went away
    last = [line for line in err.splitlines() if line.startswith("autoprune: trial ")][-1]
    assert f"front {len(front_numbers(study))}]" in last, last
    with mlflow_server_process(store, port) as url:
        run_search(space, resume=True, quiet=True)
        client = MlflowClient(url)
        exp = client.get_experiment_by_name("outage")
        assert exp is not None
        logged = [int(r.data.tags["autoprune.trial"])
                  for r in client.search_runs([exp.experiment_id], max_results=1000)
                  if r.data.tags.get("autoprune.role") == "trial"]
    assert sorted(logged) == sorted(t.number for t in study.trials if t.state.is_finished())


def test_resume_keeps_the_space_and_an_empty_study_starts_over(runs: Path) -> None:
    from autoprune.base import BaseMetrics
    from autoprune.study import open_study

    spec = tiny_space(runs, "same-space", **{"search.baselines": [0.5], "search.trials": 1})
    run_search(parse_space(spec), quiet=True)
    changed = tiny_space(runs, "same-space", **{"search.baselines": [0.5],
                                                "finetune.lr": 0.05,
                                                "groups.default.high": 0.5})
    with pytest.raises(AutopruneError, match=r"--resume: the space differs from the one study "
                                             r"'same-space' was created with \(finetune.lr: "
                                             r"0.01 -> 0.05; groups.default.high: 0.7 -> 0.5\); "
                                             r"allowed changes on resume: search.trials"):
        run_search(parse_space(changed), resume=True, quiet=True)
    # more trials, more at once: allowed, and nothing was lost by the refusal
    run_search(parse_space(spec), trials=2, resume=True, quiet=True)
    assert len(load_study("same-space", parse_space(spec).storage_url).trials) == 2

    # a study left empty by a start that failed (e.g. no Ray cluster) does not block a new start
    space = parse_space(tiny_space(runs, "empty-start"))
    base = BaseMetrics.from_dict(load_study("same-space", space.storage_url).user_attrs["base"])
    open_study(space, "empty-start", resume=False, seed=0, base=base)
    again = open_study(parse_space(tiny_space(runs, "empty-start", **{"finetune.lr": 0.05})),
                       "empty-start", resume=False, seed=0, base=base)
    assert again.user_attrs["space"]["finetune"]["lr"] == 0.05


def test_resume_refuses_another_base_model_or_another_pattern_order(
        runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint file replaced at the same path was accepted on --resume: trials of two
    base models on one front, and no export of either. Swapping two overlapping patterns
    (the first match wins) gave new trials other ranges in the same study."""
    import shutil

    import torch

    first = tiny_space(runs, "ckpt-a", **{"search.baselines": [0.5], "search.trials": 1})
    run_search(parse_space(first), quiet=True)
    ckpt = tmp_path / "ckpt.pt"
    storage = parse_space(first).storage_url
    shutil.copy(load_study("ckpt-a", storage).user_attrs["base"]["checkpoint"], ckpt)
    spec = tiny_space(runs, "ckpt-b", **{"search.baselines": [0.5], "search.trials": 1,
                                         "model.checkpoint": str(ckpt)})
    run_search(parse_space(spec), quiet=True)
    original = ckpt.read_bytes()
    state = torch.load(ckpt)
    torch.save({k: v * 1.01 if v.is_floating_point() else v for k, v in state.items()}, ckpt)
    with pytest.raises(AutopruneError, match=r"model.checkpoint: .*ckpt.pt' is not the file "
                                             r"study 'ckpt-b' was made from \(SHA-256 .*; "
                                             r"allowed: that checkpoint, or a new --study"):
        run_search(parse_space(spec), trials=2, resume=True, quiet=True)
    ckpt.write_bytes(original)  # the study's own file again: it goes on
    run_search(parse_space(spec), trials=2, resume=True, quiet=True)
    assert len(load_study("ckpt-b", parse_space(spec).storage_url).trials) == 2
    # the same file spelt another way (from another directory) is the same base (sweep W:
    # the spelling was compared and the resume refused)
    monkeypatch.chdir(tmp_path)
    run_search(parse_space({**spec, "model": {**spec["model"], "checkpoint": "ckpt.pt"}}),
               trials=3, resume=True, quiet=True)
    assert len(load_study("ckpt-b", parse_space(spec).storage_url).trials) == 3
    # a base an older autoprune trained its own way (another cache key for the same built-in
    # sources) blamed the user's code, which had not changed
    study = load_study("ckpt-a", storage)
    study.set_user_attr("base", {**study.user_attrs["base"], "checkpoint": "old-recipe.pt"})
    with pytest.raises(AutopruneError, match=r"'old-recipe.pt'; this space gives .*: the "
                                             r"sources are as they were, so this autoprune "
                                             r"\(.*\) trains its base models another way"):
        run_search(parse_space(first), trials=2, resume=True, quiet=True)
    study.set_user_attr("code", None)  # a study made before the code was stored: the same
    with pytest.raises(AutopruneError, match=r"the sources are as they were, so this autoprune"):
        run_search(parse_space(first), trials=2, resume=True, quiet=True)

    patterns = {"layer1*": {"low": 0.2, "high": 0.6, "step": 0.1},
                "layer*": {"low": 0.0, "high": 0.3, "step": 0.1}}
    ordered = tiny_space(runs, "order", **{"search.baselines": [0.5], "search.trials": 1,
                                           "groups.layer1*": patterns["layer1*"],
                                           "groups.layer*": patterns["layer*"]})
    run_search(parse_space(ordered), quiet=True)
    swapped = tiny_space(runs, "order", **{"search.baselines": [0.5], "search.trials": 1,
                                           "groups.layer*": patterns["layer*"],
                                           "groups.layer1*": patterns["layer1*"]})
    with pytest.raises(AutopruneError, match=r"--resume: groups would be searched in other "
                                             r"ranges than study 'order' drew from \(layer1"
                                             r"\.0\.conv1: \[0\.2, 0\.6\] step 0\.1 -> "
                                             r"\[0, 0\.3\] step 0\.1"):
        run_search(parse_space(swapped), trials=2, resume=True, quiet=True)
    # patterns that match no group in common may swap: no group's range changes
    apart = {"layer1*": patterns["layer1*"], "layer3*": {"low": 0.0, "high": 0.3, "step": 0.1}}
    run_search(parse_space(tiny_space(runs, "apart", **{
        "search.baselines": [0.5], "search.trials": 1, "groups.layer1*": apart["layer1*"],
        "groups.layer3*": apart["layer3*"]})), quiet=True)
    run_search(parse_space(tiny_space(runs, "apart", **{
        "search.baselines": [0.5], "search.trials": 1, "groups.layer3*": apart["layer3*"],
        "groups.layer1*": apart["layer1*"]})), trials=2, resume=True, quiet=True)
    assert len(load_study("apart", parse_space(first).storage_url).trials) == 2


def test_resume_to_another_mlflow_store_or_after_it_was_lost(runs: Path,
                                                              tmp_path: Path) -> None:
    """tracking may change on resume, but the study's parent run was reopened in the new
    store: "Run with id=... not found", on every resume, and so after the store was deleted."""
    import subprocess

    import yaml

    from autoprune.export import export_trial

    spec = tiny_space(runs, "moved", **{"search.baselines": [0.5], "search.trials": 1})
    run_search(parse_space(spec), quiet=True)
    storage = parse_space(spec).storage_url
    first = load_study("moved", storage).user_attrs["parent_run_id"]
    moved = {**spec, "tracking": {"uri": f"sqlite:///{tmp_path / 'other.db'}",
                                  "experiment": "elsewhere"}}
    run_search(parse_space(moved), trials=2, resume=True, quiet=True)
    client = MlflowClient(f"sqlite:///{tmp_path / 'other.db'}")
    exp = client.get_experiment_by_name("elsewhere")
    assert exp is not None
    found = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in found if r.data.tags.get("autoprune.role") == "search"]
    trials = sorted(r.data.tags["autoprune.trial"] for r in found
                    if r.data.tags.get("autoprune.role") == "trial")
    assert len(parents) == 1 and parents[0].info.run_id != first
    assert trials == ["0", "1"]  # the finished trial once, and the new one
    study = load_study("moved", storage)
    assert study.user_attrs["parent_run_id"] == parents[0].info.run_id
    assert study.user_attrs["space"]["tracking"]["experiment"] == "elsewhere"
    # export finds the trial's run where the study now logs
    export_trial("moved", storage, "max-accuracy", tmp_path / "out")

    # the store lost (in another process: this one's MLflow holds the file open)
    (tmp_path / "other.db").unlink()
    path = tmp_path / "moved.yaml"
    path.write_text(yaml.safe_dump(moved))
    proc = subprocess.run([sys.executable, "-m", "autoprune.cli", "search", str(path),
                           "--resume", "--trials", "3", "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "is not in experiment 'elsewhere'" in proc.stderr
    assert len(load_study("moved", storage).trials) == 3


def test_a_disturbed_base_latency_and_a_new_study_on_resume_are_said(
        runs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Every speed-up of a study divides by one base latency, measured once: one taken while
    the cores were busy (90th percentile twice the median) went unsaid. And --resume with a
    mistyped --study started a new study without a word under --quiet."""
    import dataclasses

    import autoprune.base as base_module

    measure = base_module.measure_latency

    def disturbed(*args: Any, **kwargs: Any) -> Any:
        got = measure(*args, **kwargs)
        return dataclasses.replace(got, p90_ms=3 * got.median_ms)

    monkeypatch.setattr(base_module, "measure_latency", disturbed)
    spec = tiny_space(runs, "noisy", **{"search.baselines": [0.5], "search.trials": 1})
    run_search(parse_space(spec), study_name="noisy-typo", resume=True, quiet=True)
    err = capsys.readouterr().err
    assert "--resume: no study 'noisy-typo' in" in err and "yet; starting it" in err
    assert "the base model's latency varied while it was measured (90th percentile" in err
    assert "3.0x the median" in err

    # resumed on a busier machine: the kept base latency is said to compare badly
    monkeypatch.setattr(base_module, "measure_latency", lambda *a, **k: dataclasses.replace(
        measure(*a, **k), median_ms=10 * measure(*a, **k).median_ms))
    run_search(parse_space(spec), study_name="noisy-typo", trials=2, resume=True, quiet=True)
    assert "x the study's" in capsys.readouterr().err
    # resumed where latency.device auto times on CUDA: the study's base was timed on the CPU
    monkeypatch.setattr(base_module, "measure_latency", lambda *a, **k: dataclasses.replace(
        measure(*a, **k), device="cuda:0"))
    with pytest.raises(AutopruneError, match=r"latency.device: study 'noisy-typo' timed its "
                                             r"base model on cpu .* this machine times on cuda"):
        run_search(parse_space(spec), study_name="noisy-typo", trials=3, resume=True,
                   quiet=True)


def test_a_base_latency_that_moves_between_measurements_is_said(
        runs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """On an H100 (torch on CUDA, batch 1) a small ResNet timed 0.8 to 1.7 ms from one
    measurement to the next, and its half-pruned copy 0.8 to 1.5 ms: the study's speed-ups
    (0.84x to 1.76x) and its front were noise, and nothing said so. The base is measured three
    times; its latency is the middle one, and a spread beyond 1.25x is said."""
    import dataclasses
    import itertools

    import autoprune.base as base_module

    measure = base_module.measure_latency
    medians = itertools.cycle([1.0, 1.6, 1.1])

    def jumpy(*args: Any, **kwargs: Any) -> Any:
        got = measure(*args, **kwargs)
        m = next(medians)
        return dataclasses.replace(got, median_ms=m, p90_ms=1.1 * m, device="cuda:0")

    monkeypatch.setattr(base_module, "measure_latency", jumpy)
    spec = tiny_space(runs, "jumpy", **{"search.baselines": [0.5], "search.trials": 1})
    run_search(parse_space(spec), quiet=True)
    err = capsys.readouterr().err
    assert "the base model's latency differed 1.60x between 3 measurements (1.000, 1.100, " \
           "1.600 ms): on CUDA at batch" in err
    base = load_study("jumpy", parse_space(spec).storage_url).user_attrs["base"]
    assert base["latency_ms"] == 1.1 and base["latency"]["runs_ms"] == [1.0, 1.1, 1.6]
    # steady (within 1.25x): nothing said
    medians = itertools.cycle([1.0, 1.2, 1.1])
    run_search(parse_space({**spec, "name": "steady"}), quiet=True)
    assert "differed" not in capsys.readouterr().err


def test_a_trial_that_runs_long_is_named_while_it_runs(
        runs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A trial whose data loader hung showed nothing, for good (a line per trial comes when it
    ends): one running past watch.STILL_RUNNING_S is named, and again as long again after."""
    import autoprune.watch

    monkeypatch.setattr(autoprune.watch, "STILL_RUNNING_S", 0.4)
    spec = tiny_space(runs, "long", **{"search.baselines": [0.5], "search.trials": 1,
                                       "finetune.steps": 400})
    run_search(parse_space(spec))  # stderr is no terminal here: lines
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("autoprune: trial 0 still running after ")]
    assert len(lines) >= 2, lines
    assert lines[0].endswith("s (Ctrl-C stops the search; --resume runs it again)")


def test_a_trial_s_latency_is_the_middle_of_three_measurements(
        runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial was timed once: one measurement that other work on the cores slowed 1.8x (1.35x
    faster where the exported model re-timed 2.42x) put two dominated trials on the front."""
    import dataclasses

    import autoprune.base as base_module

    measure = base_module.measure_latency
    medians = iter([1.0, 1.0, 1.0, 0.5, 5.0, 0.6])  # the base's three, then the trial's

    def timed(*args: Any, **kwargs: Any) -> Any:
        m = next(medians)
        return dataclasses.replace(measure(*args, **kwargs), median_ms=m, p90_ms=m)

    monkeypatch.setattr(base_module, "measure_latency", timed)
    spec = tiny_space(runs, "middle", **{"search.baselines": [0.5], "search.trials": 1})
    run_search(parse_space(spec), quiet=True)
    trial = load_study("middle", parse_space(spec).storage_url).trials[0]
    assert trial.user_attrs["latency_ms"] == 0.6 and trial.user_attrs["speedup"] == 1.0 / 0.6


def test_a_resumed_search_draws_new_configs(runs: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """On resume the sampler moves on: from its seed again, a random search would re-draw the
    configs it ran before, and each would only reuse a finished trial's result."""
    spec = tiny_space(runs, "redraw", **{"search.sampler": "random", "search.baselines": [],
                                         "search.trials": 3})
    run_search(parse_space(spec), quiet=True)
    # the same study again without --resume, or with other objectives: an error before the
    # base model is prepared (it came after, minutes on a large model)
    with monkeypatch.context() as m:
        m.setattr(TrialContext, "build", lambda *a, **k: pytest.fail("prepared the base"))
        with pytest.raises(AutopruneError, match="--study: study 'redraw' already exists in "
                                                 ".*; pass --resume to continue it"):
            run_search(parse_space(spec), quiet=True)
        with pytest.raises(AutopruneError, match=r"objectives: got \['accuracy', 'macs'\] but"):
            run_search(parse_space({**spec, "objectives": ["accuracy", "macs"]}), resume=True,
                       quiet=True)
    run_search(parse_space(spec), trials=6, resume=True, quiet=True)
    study = load_study("redraw", parse_space(spec).storage_url)
    assert len([t for t in study.trials if t.state.is_finished()]) == 6
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 6
    assert not [t.number for t in study.trials if t.user_attrs.get("duplicate_of") is not None]
    # every speed-up is against the base latency the study shows, not one measured again
    base = study.user_attrs["base"]["latency_ms"]
    for t in study.trials:
        assert t.user_attrs["speedup"] == pytest.approx(base / t.user_attrs["latency_ms"])


def test_fewer_trials_than_seeds_says_so_and_the_rest_run_on_resume(
        runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tiny_space(runs, "few-trials", **{"search.trials": 2})  # 3 uniform baselines
    run_search(parse_space(spec), quiet=True)  # a warning, shown with --quiet too
    err = capsys.readouterr().err
    assert ("3 seed configs (uniform baselines) run before any proposal, and the trial count "
            "(--trials or search.trials) leaves 2 to run: 2 of them run and the sampler "
            "proposes none; the other 1 wait for a later --resume. 7 trials or more also run a "
            "generation of proposals") in err
    # a sampler's trial cut by an interrupt, queued again, is not called a seed
    from autoprune.search import _warn_seeds_left

    queue = optuna.create_study(directions=["maximize", "minimize"])
    queue.enqueue_trial({"g": 0.1}, user_attrs={"baseline": True})
    queue.enqueue_trial({"g": 0.2}, user_attrs={})
    said: list[str] = []
    _warn_seeds_left(queue, None, 0, 1, 4, said.append, warm_start=False)
    assert said[0].startswith("autoprune: 2 queued configs (1 interrupted trial(s) to run "
                              "again, 1 seed configs: uniform baselines) run before any "
                              "proposal")
    run_search(parse_space(spec), trials=4, resume=True, quiet=True)
    study = load_study("few-trials", parse_space(spec).storage_url)
    done = [t for t in study.trials if t.state.is_finished()]
    assert len(done) == 4
    assert [origin(t.user_attrs) for t in done] == ["baseline"] * 3 + ["sampler"]


def test_a_space_with_nothing_to_search_or_out_of_reach_limits_fails_before_any_trial(
        runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every group frozen ran identical unpruned trials; a MACs limit below the cheapest
    config made every trial infeasible, the whole budget spent for an empty front."""
    frozen = tiny_space(runs, "frozen", **{"groups.default": {"low": 0.0, "high": 0.0}})
    with pytest.raises(ConfigError, match=r"^groups: got .*; allowed: at least one group with a "
                                          r"range above 0"):
        run_search(parse_space(frozen), quiet=True)
    for key in ("max_macs_ratio", "max_params_ratio"):
        spec = tiny_space(runs, "unreachable", constraints={key: 0.01})
        with pytest.raises(ConfigError, match=rf"^constraints.{key}: got 0.01; allowed: a ratio "
                                              r"of at least 0\.\d+, the lowest this space "
                                              r"reaches"):
            run_search(parse_space(spec), quiet=True)
    assert "unreachable" not in list_studies(f"sqlite:///{runs / 'optuna.db'}")
    # the one group left to search keeps all 16 channels at every ratio with round_to 16
    whole = tiny_space(runs, "whole", groups={"default": {"low": 0.0, "high": 0.0},
                                              "layer2.0.conv1": {"low": 0.1, "high": 0.4}},
                       **{"pruning.round_to": 16})
    with pytest.raises(ConfigError, match=r"^pruning.round_to: got 16; allowed: a multiple that "
                                          r"leaves channels to remove \(1 group\(s\) keep every "
                                          r"channel .*: layer2.0.conv1 \(16\)\)"):
        run_search(parse_space(whole), quiet=True)
    # within reach: it runs, and says which groups round_to leaves whole at every ratio
    spec = tiny_space(runs, "reachable", constraints={"max_macs_ratio": 0.5},
                      **{"search.trials": 2, "pruning.round_to": 16})
    capsys.readouterr()
    assert run_search(parse_space(spec), quiet=True).trials == 2
    assert ("warning: 2 group(s) keep every channel at every ratio of their range with "
            "pruning.round_to 16: layer2.0.shortcut.0 (16), layer2.0.conv1 (16)") in \
        capsys.readouterr().err


def test_bad_sources_fail_before_any_trial(runs: Path) -> None:
    bad_data = parse_space(tiny_space(runs, "bad-data", **{"data.source": "builtin:cifar"}))
    with pytest.raises(SourceError, match="builtin:digits"):
        run_search(bad_data, quiet=True)
    bad_model = parse_space(tiny_space(runs, "bad-model",
                                       **{"model.source": "no_such_pkg.models:build"}))
    with pytest.raises(SourceError, match="no_such_pkg"):
        run_search(bad_model, quiet=True)
    bad_pattern = parse_space(tiny_space(runs, "bad-pattern", groups={
        "default": {"low": 0.0, "high": 0.5}, "layer9.*": {"low": 0.1, "high": 0.5}}))
    with pytest.raises(AutopruneError, match=r"groups.layer9\.\*: matches no group"):
        run_search(bad_pattern, quiet=True)
    storage = f"sqlite:///{runs / 'optuna.db'}"
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    assert not {"bad-data", "bad-model", "bad-pattern"} & set(names)


def test_bad_space_values_name_the_key(runs: Path) -> None:
    with pytest.raises(ConfigError, match=r"search.sampler.*'nsga2'"):
        parse_space(tiny_space(runs, "x", **{"search.sampler": "nsga3"}))
    with pytest.raises(ConfigError, match=r"groups.default.high.*\[0, 1\)"):
        parse_space(tiny_space(runs, "x", **{"groups.default": {"low": 0.0, "high": 1.2}}))
    with pytest.raises(ConfigError, match=r"objectives\[0\]"):
        parse_space(tiny_space(runs, "x", **{"objectives": ["acc"]}))
    # a module pattern that matches nothing: a typo, caught before any trial
    space = parse_space(tiny_space(runs, "ign", **{"groups.ignore": ["layer1.*", "stemm.*"]}))
    with pytest.raises(AutopruneError, match=r"groups.ignore: 'stemm.\*' matches no module of "
                                             r"builtin:resnet_tiny; allowed: glob patterns"):
        run_search(space, quiet=True)
    with pytest.raises(AutopruneError, match="no study 'ign'"):
        load_study("ign", space.storage_url)


def test_parallel_jobs_record_every_trial_once(runs: Path) -> None:
    space = parse_space(tiny_space(runs, "jobs2", **{"search.trials": 5, "search.jobs": 2}))
    summary = run_search(space, quiet=True)
    study = load_study("jobs2", space.storage_url)
    assert summary.trials == 5
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    numbers = sorted(int(r.data.tags["autoprune.trial"]) for r in child_runs(runs, "jobs2"))
    assert numbers == [0, 1, 2, 3, 4]
    # the worker processes ran the same trial function: same metrics as in-process
    assert all(t.user_attrs["finetune_steps"] == 4 for t in study.trials)


WORKER_DATA = '''
import multiprocessing

import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset


def loaders(batch_size=64, only_here=False):
    if only_here and multiprocessing.parent_process() is not None:
        raise RuntimeError("this data lives on the search's machine only")
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    y = torch.tensor(y)
    col = lambda items: (torch.stack([a for a, _ in items]), torch.stack([b for _, b in items]))
    return (DataLoader(TensorDataset(x[:1400], y[:1400]), batch_size=batch_size, shuffle=True,
                       drop_last=True, num_workers=1, collate_fn=col),
            DataLoader(TensorDataset(x[1400:], y[1400:]), batch_size=256, num_workers=1,
                       collate_fn=col))
'''


@pytest.mark.parametrize("only_here", [False, True])
def test_trial_workers_take_the_loaders_jobs_1_takes_or_say_why_not(
        runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, only_here: bool,
        capfd: pytest.CaptureFixture[str]) -> None:
    """--jobs 2 workers are spawned, and a DataLoader's own workers started inside one were
    spawned too, which pickles them: a lambda collate_fn (fine with --jobs 1) failed every
    trial, with "the worker pool broke again before any trial finished". They start as with
    --jobs 1 now; a worker that cannot start at all (here: its data function raises there)
    fails its trials with why (it had broken the pool: a raw traceback per worker, and the
    trials in flight queued again "beside the worker process that died")."""
    (tmp_path / "worker_data.py").write_text(WORKER_DATA)
    monkeypatch.syspath_prepend(str(tmp_path))
    name = f"loaders{int(only_here)}"
    space = parse_space(tiny_space(runs, name, **{
        "data.source": "worker_data:loaders", "data.kwargs": {"only_here": only_here},
        "search.trials": 2, "search.jobs": 2, "search.baselines": [0.5]}))
    summary = run_search(space, quiet=True)
    study = load_study(name, space.storage_url)
    recorded = [t for t in study.trials if "state" in t.user_attrs]
    states = [t.user_attrs["state"] for t in recorded]
    errors = {(t.user_attrs.get("error") or "").partition("\n")[0] for t in recorded}
    if not only_here:
        assert summary.trials == 2 and states == ["complete", "complete"], errors
        return
    assert states == ["failed", "failed"] and len(study.trials) == 2  # none queued again
    err = capfd.readouterr().err
    assert "Exception in initializer" not in err and "died" not in err
    assert errors == {"a worker process could not start: SourceError: data.source: "
                      "'worker_data:loaders' raised RuntimeError: this data lives on the "
                      "search's machine only"}


def test_a_trial_is_the_same_whatever_ran_before_with_a_loader_s_own_generator(
        runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sweep W: a training DataLoader with its own seeded generator went on from trial to
    trial, so a trial's batches hung on the trials run before it, and export's re-run of one
    (weights not kept) failed its verification."""
    from autoprune.trial import TrialContext, run_trial

    (tmp_path / "gen_data.py").write_text(WORKER_DATA.replace(
        "shuffle=True,", "shuffle=True, generator=torch.Generator().manual_seed(0),").replace(
        "num_workers=1, collate_fn=col", "num_workers=0, collate_fn=col"))
    monkeypatch.syspath_prepend(str(tmp_path))
    ctx = TrialContext.build(parse_space(tiny_space(runs, "gen", **{
        "data.source": "gen_data:loaders"})))
    ratios = {g.name: 0.3 for g in ctx.groups}
    first, second = run_trial(ctx, ratios), run_trial(ctx, ratios)
    assert first.state == second.state == "complete"
    assert first.accuracy == second.accuracy and first.finetune_losses == second.finetune_losses


def test_a_resume_of_a_study_an_older_rounding_made_says_so_once(
        runs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Sweep V: a study begun before rounding rule 3, resumed after it, held one ratio at two
    channel counts without a word (and nothing in it said which rule made it)."""
    import autoprune.prune as prune_mod
    from autoprune.prune import ROUNDING_RULE

    today = prune_mod.kept_after_rounding

    def older(channels: int, ratio: float, round_to: int, blocks: int = 1) -> int:
        kept = today(channels, ratio, round_to, blocks)
        return kept - 1 if 0 < ratio and kept > 2 else kept

    space = parse_space(tiny_space(runs, "rule", **{"search.trials": 1,
                                                    "search.baselines": [0.5]}))
    monkeypatch.setattr(prune_mod, "kept_after_rounding", older)
    run_search(space, quiet=True)
    study = load_study("rule", space.storage_url)
    assert study.user_attrs["rounding_rule"] == ROUNDING_RULE
    study.set_user_attr("rounding_rule", None)  # as an older autoprune left it: no stamp
    monkeypatch.setattr(prune_mod, "kept_after_rounding", today)
    capsys.readouterr()
    run_search(space, quiet=True, resume=True, trials=2)
    err = capsys.readouterr().err
    assert "--resume: 1 trial(s) of study 'rule' were pruned by an older autoprune" in err
    assert "(trial 0: layer3.0.shortcut.0 at ratio 0.5 kept 15 of 32 channels (16 now))" in err
    assert load_study("rule", space.storage_url).user_attrs["rounding_rule"] == ROUNDING_RULE
    run_search(space, quiet=True, resume=True, trials=3)
    assert "older autoprune" not in capsys.readouterr().err


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_time_limit_starts_no_trial_after_it_and_resume_runs_the_rest(
        runs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        jobs: int) -> None:
    """``--timeout``: once the budget is spent no trial starts, the running ones finish and are
    recorded (with two jobs, both trials started before it), the search says it stopped short
    and the parent run says why; a resume runs the rest with a new budget."""
    name = f"timed{jobs}"
    space = parse_space(tiny_space(runs, name, **{"search.trials": 6, "search.jobs": jobs}))
    clock_ticks_per_trial_start(monkeypatch, "start")  # 100 s a trial start
    summary = run_search(space, quiet=True, timeout=150)  # spent once 2 trials started
    assert summary.timed_out and summary.trials == 2
    assert "time limit reached (2 min 30 s, counted from this run's start): 2 of 6 trials " \
        "finished" in capsys.readouterr().err
    study = load_study(name, space.storage_url)
    assert [t.state for t in study.trials if t.state != optuna.trial.TrialState.WAITING] == \
        [optuna.trial.TrialState.COMPLETE] * 2
    runs_now = child_runs(runs, name)
    assert sorted(r.info.status for r in runs_now) == ["FINISHED"] * 2
    client = MlflowClient(space.tracking_uri)
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["autoprune.stopped_by"] == "time limit"

    summary = run_search(space, resume=True, quiet=True)  # no budget: runs the other 4
    assert not summary.timed_out and summary.trials == 6
    assert sorted(int(r.data.tags["autoprune.trial"]) for r in child_runs(runs, name)) == \
        list(range(6))
    assert client.get_run(summary.parent_run_id).data.tags["autoprune.stopped_by"] == "-"


def test_a_time_limit_spent_before_the_first_trial_runs_none(
        runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = parse_space(tiny_space(runs, "timed0", **{"search.timeout": 0.001}))
    summary = run_search(space, quiet=True)
    assert summary.timed_out and summary.trials == 0
    assert "0 of 5 trials finished" in capsys.readouterr().err
    assert not child_runs(runs, "timed0")


def test_twins_that_ran_at_once_are_recorded_as_one_model(runs: Path) -> None:
    """With trials at once, two that keep the same channels both ran before either finished,
    and both were listed on the front. The second recorded is a duplicate of the first."""
    space = parse_space(tiny_space(runs, "twins", groups={"default": {"low": 0.5, "high": 0.5}},
                                   **{"search.trials": 4, "search.jobs": 2,
                                      "search.baselines": []}))
    summary = run_search(space, quiet=True)
    study = load_study("twins", space.storage_url)
    attrs = [t.user_attrs for t in study.trials]
    originals = [t.number for t in study.trials if t.user_attrs.get("duplicate_of") is None]
    assert len(originals) == 1 and front_numbers(study) == set(originals)
    assert summary.repeats == 3  # the summary says so (nothing did)
    assert all(a.get("duplicate_of") in (None, originals[0]) for a in attrs)
    # trials 0 and 1 started together and both fine-tuned; the later two reused the result
    assert sorted(a["finetune_steps"] for a in attrs) == [0, 0, 4, 4]
    assert len({a["accuracy"] for a in attrs}) == 1


def _open_stores(root: str, study: str, barrier: Any) -> None:
    from autoprune.study import storage_for
    from autoprune.tracking import Tracker

    barrier.wait()  # all at once, on a runs dir no store exists in yet
    storage_for(f"sqlite:///{root}/optuna.db")
    Tracker(f"sqlite:///{root}/mlflow.db", "shared-space", study, f"{root}/mlartifacts")


def test_searches_started_together_set_up_the_stores_one_at_a_time(tmp_path: Path) -> None:
    """Two searches started together on a fresh runs dir: one crashed in MLflow's table set-up
    ("table _alembic_tmp_experiments already exists"), after its base training and scan."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_open_stores, args=(str(tmp_path), f"s{i}", barrier))
             for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    exps = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_experiments()
    assert [e.name for e in exps].count("shared-space") == 1


def _base_model(runs: str, log: str, barrier: Any) -> None:
    import autoprune.base as base_mod
    from autoprune.base import base_checkpoint, load_sources, resolve_device

    real = base_mod.train_base

    def counted(*args: Any, **kwargs: Any) -> Any:
        with open(log, "a") as f:
            f.write("trained\n")
        return real(*args, **kwargs)

    base_mod.train_base = counted
    space = parse_space(tiny_space(Path(runs), "together"))
    model, data, evaluate_fn = load_sources(space)
    barrier.wait()
    base_checkpoint(space, model, data, resolve_device("cpu"), evaluate_fn)


def test_searches_started_together_train_the_base_model_once(tmp_path: Path) -> None:
    """The second waits for the first's base model and reuses it, instead of training it too."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, log = ctx.Barrier(2), tmp_path / "trained.log"
    procs = [ctx.Process(target=_base_model, args=(str(tmp_path / "runs"), str(log), barrier))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    assert [p.exitcode for p in procs] == [0, 0]
    assert log.read_text() == "trained\n"
    assert len(list((tmp_path / "runs" / "base").glob("*.pt"))) == 1


def test_an_interrupted_seed_runs_again_before_the_seeds_behind_it(tmp_path: Path) -> None:
    """A resumed search ran the interrupted dearest seed after the other seeds, so those
    started from the base model instead of inheriting from it."""
    from autoprune.study import ask, recover_interrupted, storage_for

    study = optuna.create_study(storage=storage_for(f"sqlite:///{tmp_path}/q.db"),
                                directions=["maximize", "minimize"])
    seeds = [({"g": 0.2}, {"warm_start": True, "warm_start_budget": 0.6}),
             ({"g": 0.5}, {"warm_start": True, "warm_start_budget": 0.3}),
             ({"g": 0.25}, {"baseline": True, "baseline_ratio": 0.25})]
    for params, attrs in seeds:
        study.enqueue_trial(params, user_attrs=attrs)
    dist = optuna.distributions.FloatDistribution(0.0, 0.8)
    first = ask(study)
    assert first.suggest_float("g", 0.0, 0.8) == 0.2
    assert recover_interrupted(study) == [first.number]  # the process died during it

    order = []
    for _ in range(3):
        trial = ask(study)
        g = trial.suggest_float("g", dist.low, dist.high)
        order.append((g, origin(trial.user_attrs), trial.user_attrs.get("warm_start_budget"),
                      trial.user_attrs.get("baseline_ratio")))
        study.tell(trial, [0.9, g])
    assert order == [(0.2, "warm_start", 0.6, None), (0.5, "warm_start", 0.3, None),
                     (0.25, "baseline", None, 0.25)]
    assert study.trials[first.number].user_attrs["interrupted"] is True


def test_ui_stopped_by_kill_stops_the_mlflow_server_too(tmp_path: Path) -> None:
    """`autoprune ui` runs MLflow's server (uvicorn, job workers) as children: a `kill` of
    the autoprune process (a supervisor, a closed terminal) must not leave them on the port."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from mlflow import MlflowClient

    (tmp_path / "runs").mkdir()
    MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}").search_experiments()  # a store
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "autoprune.cli", "ui", "--runs-dir",
                             str(tmp_path / "runs"), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/health"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline and proc.poll() is None, "the UI never answered"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        with pytest.raises(OSError):  # nothing answers there any more
            urllib.request.urlopen(url, timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_trials_table_keeps_counts_as_integers_beside_a_gap() -> None:
    """A failed or interrupted trial has no fine-tune steps or parameter count; the column
    beside its gap read 44.0 in trials.csv."""
    from optuna.distributions import FloatDistribution

    from autoprune.report import trials_frame

    study = optuna.create_study(directions=["maximize", "minimize"])
    dist = {"a": FloatDistribution(0.0, 0.5)}
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.COMPLETE, values=[0.9, 0.5], params={"a": 0.2},
        distributions=dist, user_attrs={"accuracy": 0.9, "macs_ratio": 0.5,
                                        "finetune_steps": 44, "params": 1000}))
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.FAIL, params={"a": 0.3}, distributions=dist,
        user_attrs={"error": "boom", "state": "failed"}))
    csv = trials_frame(study)[["trial", "finetune_steps", "params"]].to_csv(index=False)
    assert csv.splitlines() == ["trial,finetune_steps,params", "0,44,1000", "1,,"]


def test_taylor_importance_uses_the_fine_tune_s_loss(runs: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradient importance took a plain cross-entropy: int32 labels (converted for the
    fine-tune) and data.ignore_index labels failed every taylor trial."""
    (tmp_path / "int32_digits.py").write_text(
        "from torch.utils.data import DataLoader, TensorDataset\n"
        "from autoprune.sources import build_data\n"
        "from autoprune.config import DataConfig\n\n"
        "def loaders():\n"
        "    d = build_data(DataConfig(source='builtin:digits'), (1, 1, 8, 8))\n"
        "    out = []\n"
        "    for loader, shuffle in ((d.train, True), (d.val, False)):\n"
        "        x, y = loader.dataset.tensors\n"
        "        y = y.clone()\n"
        "        y[::7] = 255  # unlabelled samples, left out by data.ignore_index\n"
        "        out.append(DataLoader(TensorDataset(x, y.int()), batch_size=64,\n"
        "                              shuffle=shuffle, drop_last=shuffle))\n"
        "    return out[0], out[1], 10\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    space = parse_space(tiny_space(runs, "taylor", **{
        "data.source": "int32_digits:loaders", "data.ignore_index": 255,
        "pruning.importance": "taylor",
        "search.trials": 2, "search.baselines": [0.5]}))
    summary = run_search(space, quiet=True)
    assert summary.trials == 2 and summary.failed == 0


def test_ctrl_c_waits_for_a_trial_s_record_and_an_idle_worker_leaves_quietly() -> None:
    """The pieces behind a clean Ctrl-C, each on its own (a real Ctrl-C lands anywhere)."""
    import signal

    from autoprune.controllers import _worker
    from autoprune.controllers.optuna_local import _ctrl_c_remembered

    with _ctrl_c_remembered() as ctrl_c:
        recorded = []
        with pytest.raises(KeyboardInterrupt), ctrl_c.held():
            os.kill(os.getpid(), signal.SIGINT)  # inside a record: it finishes first
            recorded.append("told")
        assert recorded == ["told"] and ctrl_c
    # a worker waiting for work exits (SystemExit: the queue's lock is freed, no traceback);
    # one running a trial stops it as before
    with pytest.raises(SystemExit):
        _worker._on_ctrl_c(signal.SIGINT, None)
    _worker._BUSY = True
    try:
        with pytest.raises(KeyboardInterrupt):
            _worker._on_ctrl_c(signal.SIGINT, None)
    finally:
        _worker._BUSY = False


def test_a_trial_that_runs_out_of_memory_says_so(tmp_path: Path) -> None:
    """Under a memory cap trials failed as 'RuntimeError: could not create a primitive',
    which reads as a fault of the model or the pruning."""
    import torch

    from autoprune.errors import out_of_memory
    from autoprune.trial import TrialContext, run_trial

    try:
        torch.empty(2**60)  # more than any machine has: the allocator's own error
    except RuntimeError as e:
        assert out_of_memory(e)
    assert out_of_memory(RuntimeError("could not create a primitive"))  # oneDNN's words
    assert not out_of_memory(RuntimeError("this block needs >= 6 channels, got 4"))

    ctx = TrialContext.build(parse_space(tiny_space(tmp_path / "runs", "oom-trial")))

    def hungry(*args: Any, **kwargs: Any) -> Any:
        torch.empty(2**60)

    ctx.evaluate_fn = hungry  # the trial's evaluation asks for too much
    result = run_trial(ctx, {g.name: 0.3 for g in ctx.groups})
    assert result.state == "failed" and result.error.startswith("out of memory: RuntimeError")


def test_tables_that_cannot_be_written_at_the_end_fail_the_parent_run(runs: Path) -> None:
    """The search ended in a traceback (exit 1) while its MLflow parent run said FINISHED."""
    space = parse_space(tiny_space(runs, "blocked-tables", **{"search.trials": 2}))
    (runs / "studies" / "blocked-tables" / "trials.csv").mkdir(parents=True)  # not a file
    with pytest.raises(IsADirectoryError):
        run_search(space, quiet=True)
    study = load_study("blocked-tables", space.storage_url)
    parent = MlflowClient(space.tracking_uri).get_run(study.user_attrs["parent_run_id"])
    assert parent.info.status == "FAILED"
