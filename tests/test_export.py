"""Export and the deployment contract: files, schema, rebuild, registry, a consumer."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from _helpers import mlflow_server_process, tiny_space
from torch import nn

import autoprune
from autoprune.cli import main as cli
from autoprune.config import parse_space
from autoprune.errors import AutopruneError, CheckpointError
from autoprune.export import export_trial
from autoprune.pareto import knee_index, pick
from autoprune.rebuild import read_config, rebuild, validate_config
from autoprune.search import run_search
from autoprune.study import front_numbers, load_study

REPO = Path(__file__).resolve().parent.parent


def space_dict(runs: Path, name: str, tracking_uri: str | None = None) -> dict[str, Any]:
    return tiny_space(runs, name, objectives=["accuracy", "macs"], tracking={"uri": tracking_uri},
                      **{"finetune.steps": 6, "search.baselines": [0.25, 0.5, 0.75]})


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    runs = tmp_path_factory.mktemp("export") / "runs"
    space = parse_space(space_dict(runs, "exp"))
    run_search(space, quiet=True)
    return space, runs


@pytest.fixture(scope="module")
def exported(searched: tuple[Any, Path]) -> Path:
    space, runs = searched
    out = runs / "export"
    export_trial("exp", space.storage_url, "knee", out)
    return out


def test_export_writes_a_verified_deployable_model(searched: tuple[Any, Path],
                                                   exported: Path) -> None:
    space, _ = searched
    assert {p.name for p in exported.iterdir()} >= {"prune_config.json", "model.onnx",
                                                    "weights.pt", "model_card.md"}
    config = read_config(exported / "prune_config.json")
    study = load_study("exp", space.storage_url)
    trial = study.trials[config["source"]["trial"]]
    assert trial.number in front_numbers(study)
    assert config["schema_version"] == 1
    assert config["model"]["checkpoint_sha256"] == study.user_attrs["base"]["checkpoint_sha256"]
    assert config["pruning"]["ratios"] == pytest.approx(trial.params)
    assert config["metrics"]["trial"]["accuracy"] == trial.user_attrs["accuracy"]
    assert {"torch", "torch_pruning", "autoprune"} == set(config["versions"])
    # the exported weights are the trial's fine-tuned weights: same accuracy as logged
    assert config["metrics"]["verified"]["accuracy"] == pytest.approx(
        trial.user_attrs["accuracy"], abs=0.002)

    model = autoprune.load_pruned(exported / "prune_config.json", exported / "weights.pt")
    x = torch.randn(7, 1, 8, 8)  # a batch size never seen at export: the axis is dynamic
    sess = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert out.shape == (7, 10)
    assert np.abs(out - ref).max() < 1e-4
    card = (exported / "model_card.md").read_text()
    assert f"trial {trial.number}" in card and "base" in card
    assert "| accuracy (top-1) |" in card and "top-1 accuracy on its validation split" in card
    speedup = config["metrics"]["trial"]["speedup"]
    said = f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"
    assert f"ms ({said}) |" in card  # a model timed slower is not "0.62x faster"
    assert config["files"]["program"] == "model.pt2" and "model.pt2" in card
    assert "## Inputs" in card and "divided by 16" in card
    # each section holds its own: the groups table stays with how the model was made
    assert card.index("## How it was made") < card.index("| group | ratio |") < \
        card.index("## Inputs") < card.index("## Files")


def test_the_recorded_preprocessing_reproduces_the_accuracy_from_raw_data(
        searched: tuple[Any, Path], exported: Path) -> None:
    """A pipeline has raw digits (0-16), the ONNX file and the config: the steps recorded in
    ``data.preprocessing`` must give the reported accuracy (raw inputs scored 0.82 for 0.96)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    space, _ = searched
    config = read_config(exported / "prune_config.json")
    pre = config["data"]["preprocessing"]
    assert config["data"]["source"] == "builtin:digits" and len(pre["steps"]) == 2
    d = load_digits()
    _, xva, _, yva = train_test_split(d.images[:, None].astype(np.float32), d.target,
                                      test_size=0.2, random_state=space.data.seed,
                                      stratify=d.target)
    x = ((xva * pre["scale"] - pre["mean"]) / pre["std"]).astype(np.float32)
    sess = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    acc = float((sess.run(None, {"input": x})[0].argmax(1) == yva).mean())
    assert acc == pytest.approx(config["metrics"]["verified"]["accuracy"], abs=1e-9)


def test_the_exported_program_runs_with_torch_alone(exported: Path) -> None:
    """A deployment box may have torch and nothing else: model.pt2 needs no autoprune,
    Torch-Pruning or model code (both are blocked from importing here)."""
    model = autoprune.load_pruned(exported / "prune_config.json", exported / "weights.pt")
    x = torch.randn(5, 1, 8, 8)
    torch.save(x, exported.parent / "x.pt")
    script = (
        "import sys, torch; sys.modules['autoprune'] = None; sys.modules['torch_pruning'] = None\n"
        f"m = torch.export.load({str(exported / 'model.pt2')!r}).module()\n"
        f"x = torch.load({str(exported.parent / 'x.pt')!r})\n"
        f"torch.save(m(x), {str(exported.parent / 'y.pt')!r})\n"
        "assert m(torch.zeros(5000, 1, 8, 8)).shape == (5000, 10)\n")  # no cap on the batch
    subprocess.run([sys.executable, "-c", script], check=True, cwd=exported.parent)
    with torch.no_grad():
        ref = model(x)
    got = torch.load(exported.parent / "y.pt")
    assert got.shape == (5, 10) and torch.allclose(got, ref, atol=1e-5)


def test_apply_rebuilds_bit_for_bit(searched: tuple[Any, Path], exported: Path,
                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space, _ = searched
    ckpt = load_study("exp", space.storage_url).user_attrs["base"]["checkpoint"]
    rc = cli(["apply", str(exported / "prune_config.json"), "--checkpoint", ckpt,
              "--weights", str(exported / "weights.pt"), "--out", str(tmp_path / "applied")])
    assert rc == 0
    assert str(tmp_path / "applied" / "prune_config.json") in capsys.readouterr().out
    a = torch.load(exported / "weights.pt", weights_only=True)
    b = torch.load(tmp_path / "applied" / "weights.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = np.random.default_rng(1).standard_normal((4, 1, 8, 8)).astype(np.float32)
    outs = [ort.InferenceSession(str(p / "model.onnx")).run(None, {"input": x})[0]
            for p in (exported, tmp_path / "applied")]
    assert np.array_equal(outs[0], outs[1])
    # the folder is an export again: its config, and the torch.export program
    again = autoprune.load_pruned(tmp_path / "applied" / "prune_config.json",
                                  tmp_path / "applied" / "weights.pt")
    assert all(torch.equal(a[k], again.state_dict()[k]) for k in a)
    assert (tmp_path / "applied" / "model.pt2").is_file()
    files = read_config(tmp_path / "applied" / "prune_config.json")["files"]
    assert all((tmp_path / "applied" / f).is_file() for f in files.values())  # no card listed
    # no --checkpoint needed with --weights: the record fixes the architecture
    assert cli(["apply", str(exported / "prune_config.json"), "--weights",
                str(exported / "weights.pt"), "--out", str(tmp_path / "w")]) == 0
    # without weights: an error, unless the untrained architecture is what is asked for
    assert cli(["apply", str(exported / "prune_config.json"), "--checkpoint", ckpt,
                "--out", str(tmp_path / "none")]) == 2
    assert not (tmp_path / "none").exists()
    assert cli(["apply", str(exported / "prune_config.json"), "--checkpoint", ckpt,
                "--untrained", "--out", str(tmp_path / "bare")]) == 0
    bare = torch.load(tmp_path / "bare" / "weights.pt", weights_only=True)
    assert {k: tuple(v.shape) for k, v in bare.items()} == \
        {k: tuple(v.shape) for k, v in a.items()}
    assert not (tmp_path / "bare" / "prune_config.json").exists()  # not the export's model
    assert "no prune_config.json: its metrics are the fine-tuned model's" in \
        capsys.readouterr().out


def test_an_export_replaces_the_one_before_whole_or_not_at_all(
        searched: tuple[Any, Path], exported: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A deployment pipeline reads the folder: it must never find files of two exports side by
    side (a stale model.pt2 next to a new model.onnx), and a failed export keeps the last one."""
    import shutil

    import autoprune.export as export_mod

    space, _ = searched
    out = tmp_path / "deploy"
    shutil.copytree(exported, out)
    (out / "NOTES.txt").write_text("the user's own file")
    # an export killed (kill -9) mid-way left its staging folder; the next export removes it
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    (out / f".autoprune-staging-{dead.pid}-abc").mkdir()
    (out / f".autoprune-staging-{dead.pid}-abc" / "model.onnx").write_text("partial")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    other = next(n for n in front_numbers(load_study("exp", space.storage_url))
                 if n != read_config(out / "prune_config.json")["source"]["trial"])

    def raising(error: Exception) -> Any:
        def fn(*args: Any, **kwargs: Any) -> Any:
            raise error
        return fn

    with monkeypatch.context() as m:
        m.setattr(export_mod, "verify", raising(AutopruneError("ONNX output differs")))
        with pytest.raises(AutopruneError, match="differs"):
            export_trial("exp", space.storage_url, f"trial:{other}", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched, no staging
    assert not list(out.glob(".autoprune-staging-*"))

    with monkeypatch.context() as m:
        m.setattr(export_mod, "export_program", raising(RuntimeError("torch.export cannot")))
        with pytest.warns(UserWarning, match="model.pt2 not written"):
            export_trial("exp", space.storage_url, f"trial:{other}", out)
    assert sorted(p.name for p in out.iterdir()) == [
        "NOTES.txt", "model.onnx", "model_card.md", "prune_config.json", "weights.pt"]
    config = read_config(out / "prune_config.json")
    assert config["source"]["trial"] == other and "program" not in config["files"]
    model = autoprune.load_pruned(out / "prune_config.json", out / "weights.pt")
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(out / "model.onnx")).run(None, {"input": x})[0]
    assert np.abs(got - ref).max() < 1e-4  # the ONNX file is the new trial's model


def test_pick_rules(searched: tuple[Any, Path], tmp_path: Path) -> None:
    space, _ = searched
    study = load_study("exp", space.storage_url)
    front = sorted((study.trials[n] for n in front_numbers(study)),
                   key=lambda t: t.user_attrs["accuracy"])
    best = front[-1]
    res = export_trial("exp", space.storage_url, "max-accuracy", tmp_path / "a")
    assert res.trial == best.number
    cheapest = min(front, key=lambda t: t.user_attrs["macs_ratio"])
    budget = cheapest.user_attrs["macs_ratio"] + 1e-9
    res = export_trial("exp", space.storage_url, f"macs<={budget}", tmp_path / "b")
    assert res.trial == cheapest.number
    res = export_trial("exp", space.storage_url, f"trial:{cheapest.number}", tmp_path / "c")
    assert res.trial == cheapest.number
    with pytest.raises(AutopruneError, match=r"no point of the front meets it[\s\S]*macs_ratio") \
            as info:
        export_trial("exp", space.storage_url, "macs<=0.0001", tmp_path / "d")
    # the front as `autoprune pareto` prints it: 4 decimals
    assert re.search(r"\b0\.\d{4}\b", str(info.value))
    assert not re.search(r"\b0\.\d{6}\b", str(info.value))
    with pytest.raises(AutopruneError, match="allowed: knee, max-accuracy"):
        export_trial("exp", space.storage_url, "smallest", tmp_path / "e")
    with pytest.raises(AutopruneError, match=r"no study 'nope'.*\['exp'\]"):
        export_trial("nope", space.storage_url, "knee", tmp_path / "f")
    with pytest.raises(AutopruneError, match=r"allowed: trial:N"):
        export_trial("exp", space.storage_url, "trial:abc", tmp_path / "h")
    with pytest.raises(AutopruneError, match=r"the study has no trial 999: its trials are 0-"):
        export_trial("exp", space.storage_url, "trial:999", tmp_path / "i")
    off = [t for t in study.trials if t.number not in front_numbers(study)]
    if off:  # a dominated or infeasible trial: the message says which
        with pytest.raises(AutopruneError,
                           match=rf"trial {off[0].number} is not on the front \(it is \w+"):
            export_trial("exp", space.storage_url, f"trial:{off[0].number}", tmp_path / "j")
    for rule in ("macs<=0.5.5", "macs>=0.3", "accuracy<=0.9"):  # a typo, a flipped bound
        with pytest.raises(AutopruneError, match=rf"--pick: got '{re.escape(rule)}'; allowed: "):
            export_trial("exp", space.storage_url, rule, tmp_path / "k")
    (tmp_path / "afile").write_text("")
    with pytest.raises(AutopruneError, match=r"--out: got .*afile', a file"):
        export_trial("exp", space.storage_url, "knee", tmp_path / "afile")
    with pytest.raises(AutopruneError, match=r"--out: got .*afile/sub', inside .*afile', a file"):
        export_trial("exp", space.storage_url, "knee", tmp_path / "afile" / "sub")
    (tmp_path / "locked").mkdir(mode=0o500)
    if not os.access(tmp_path / "locked", os.W_OK):  # root may write anywhere
        with pytest.raises(AutopruneError, match=r"--out: .*cannot be written"):
            export_trial("exp", space.storage_url, "knee", tmp_path / "locked" / "new")
    # names the registry refuses are refused before any work, and no version is made
    for flags, match in (({"register": "a/b"}, r"--register: got 'a/b'.*cannot contain"),
                         ({"register": ""}, r"--register: got ''"),
                         ({"register": "ok", "alias": "latest"},
                          r"--alias: got 'latest'.*reserved"),
                         ({"register": "ok", "alias": "v3"}, r"--alias: got 'v3'.*reserved")):
        with pytest.raises(AutopruneError, match=match):
            export_trial("exp", space.storage_url, "knee", tmp_path / "r", **flags)
    assert not (tmp_path / "r").exists()
    with pytest.raises(AutopruneError, match=r"storage: got 'bogus://x', which cannot be opened"):
        export_trial("exp", "bogus://x", "knee", tmp_path / "s")
    missing = tmp_path / "elsewhere" / "optuna.db"  # e.g. run from another directory
    with pytest.raises(AutopruneError, match="no study 'exp': there is no study store at"):
        export_trial("exp", f"sqlite:///{missing}", "knee", tmp_path / "g")
    assert not missing.exists()


def test_a_terminated_export_removes_its_staging_folder(tmp_path: Path) -> None:
    """A pipeline's timeout sends SIGTERM: the export ends as on an error, with no staging
    folder left in --out, and the signal's handler is the one before afterwards."""
    import signal

    from autoprune.export import staged

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as info, staged(tmp_path) as stage:
        (stage / "model.onnx").write_text("partial")
        os.kill(os.getpid(), signal.SIGTERM)
    assert info.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before


def test_pareto_json_gives_the_study_s_values_exactly(searched: tuple[Any, Path],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A pipeline reads ``pareto --json`` and picks by its figures: rounded to 10 digits,
    ``accuracy>=`` its own value matched no point."""
    from autoprune.report import pareto_frame

    space, _ = searched
    capsys.readouterr()
    assert cli(["pareto", "--study", "exp", "--storage", space.storage_url, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    study = load_study("exp", space.storage_url)
    assert {row["trial"] for row in data["front"]} == set(front_numbers(study))
    for row in data["front"]:
        attrs = study.trials[row["trial"]].user_attrs
        assert row["accuracy"] == attrs["accuracy"] and row["macs_ratio"] == attrs["macs_ratio"]
        assert pick(pareto_frame(study), f"accuracy>={row['accuracy']!r}") in {
            r["trial"] for r in data["front"] if r["accuracy"] >= row["accuracy"]}


def test_export_finds_a_relative_runs_dir_from_another_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The default runs_dir is relative: a pipeline that exports from elsewhere names the runs
    directory (or the study store in it) and gets the base checkpoint, kept weights and MLflow
    run from there, with absolute paths in the config."""
    (tmp_path / "proj").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "proj")
    run_search(parse_space(tiny_space(Path("runs"), "rel", objectives=["accuracy", "macs"],
                                      **{"search.trials": 4})), quiet=True)
    runs = tmp_path / "proj" / "runs"
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert cli(["export", "--study", "rel", "--pick", "knee", "--out", "a"]) == 2  # no store here
    for i, flags in enumerate((["--runs-dir", str(runs)],
                               ["--storage", f"sqlite:///{runs / 'optuna.db'}"])):
        assert cli(["export", "--study", "rel", "--pick", "knee", "--out", f"out{i}",
                    *flags]) == 0
        config = read_config(Path(f"out{i}") / "prune_config.json")
        assert Path(config["model"]["checkpoint"]) == runs / "base" / Path(
            config["model"]["checkpoint"]).name
        assert config["source"]["mlflow_run_id"] is not None
        assert config["source"]["tracking_uri"] == f"sqlite:///{runs / 'mlflow.db'}"
    assert not Path("runs").exists()  # no stray, empty stores made here
    # a copied runs directory: its MLflow store still points at the old artifact folder, so
    # registering from it would write there; refused before any work, export itself works
    import shutil

    shutil.copytree(runs, tmp_path / "copied")
    capsys.readouterr()
    assert cli(["export", "--study", "rel", "--out", "c1", "--runs-dir", str(tmp_path / "copied"),
                "--register", "rel-model"]) == 2
    assert re.search(r"--register: the MLflow store .* keeps this trial's artifacts at .*/proj/"
                     r"runs/mlartifacts/.*, outside .*/copied/mlartifacts",
                     capsys.readouterr().err)
    assert not Path("c1").exists()
    # the same for a trial whose run is gone there: the new run would go to the old folder too
    from mlflow import MlflowClient

    copied_store = MlflowClient(f"sqlite:///{tmp_path / 'copied' / 'mlflow.db'}")
    for run in copied_store.search_runs(
            [copied_store.get_experiment_by_name("rel").experiment_id]):
        if run.data.tags.get("autoprune.role") == "trial":
            copied_store.delete_run(run.info.run_id)
    capsys.readouterr()
    assert cli(["export", "--study", "rel", "--out", "c1", "--runs-dir", str(tmp_path / "copied"),
                "--register", "rel-model"]) == 2
    assert "outside" in capsys.readouterr().err and not Path("c1").exists()
    assert cli(["export", "--study", "rel", "--out", "c2", "--runs-dir",
                str(tmp_path / "copied")]) == 0
    # a runs directory given without its base/: the error names the one in use
    shutil.rmtree(tmp_path / "copied" / "base")
    capsys.readouterr()
    assert cli(["export", "--study", "rel", "--out", "c3", "--runs-dir",
                str(tmp_path / "copied")]) == 2
    assert f"the runs directory in use is {tmp_path / 'copied'}:" in capsys.readouterr().err
    # with the space file too: --runs-dir still names the store (the space's relative runs
    # dir was taken, and the study was looked for in ./runs)
    import yaml

    Path("space.yaml").write_text(yaml.safe_dump(tiny_space(Path("runs"), "rel")))
    assert cli(["pareto", "--study", "rel", "--space", "space.yaml", "--runs-dir",
                str(runs)]) == 0
    assert not Path("runs").exists()
    # a relative model.checkpoint of the user's (as the README writes it) is found from
    # elsewhere too: it was recorded as written, and looked for from the export's directory
    monkeypatch.chdir(tmp_path / "proj")
    (tmp_path / "proj" / "ckpt").mkdir()
    shutil.copy(next((runs / "base").glob("*.pt")), tmp_path / "proj" / "ckpt" / "best.pt")
    spec = tiny_space(Path("runs"), "relck", objectives=["accuracy", "macs"],
                      **{"search.trials": 2})
    spec["model"]["checkpoint"] = "ckpt/best.pt"
    spec["tracking"] = {"uri": "sqlite:///mlf.db"}  # and a relative store of the user's
    run_search(parse_space(spec), quiet=True)
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert cli(["export", "--study", "relck", "--out", "ck", "--runs-dir", str(runs)]) == 0
    config = read_config(Path("ck") / "prune_config.json")
    assert config["model"]["checkpoint"] == str(tmp_path / "proj" / "ckpt" / "best.pt")
    assert config["source"]["tracking_uri"] == f"sqlite:///{tmp_path / 'proj' / 'mlf.db'}"
    assert config["source"]["mlflow_run_id"] is not None


def test_a_rerun_remakes_the_recorded_model_whatever_the_constraints_say(tmp_path: Path) -> None:
    """Export re-runs a trial whose weights were not kept; the latency it measures again may
    come out over a limit the trial met. It must still remake (fine-tune) the model."""
    from autoprune.inherit import rerun
    from autoprune.trial import TrialContext, run_trial

    ctx = TrialContext.build(parse_space(tiny_space(
        tmp_path / "runs", "cons", **{"constraints.max_latency_ms": 1e-9})))
    ratios = {g.name: 0.3 for g in ctx.groups}
    assert run_trial(ctx, ratios).state == "infeasible"  # the search stops it before fine-tuning
    again = rerun(ctx, {}, {"seed": 0}, ratios)
    assert again.state == "complete" and again.state_dict is not None
    assert again.finetune_steps == 4


def test_a_trial_an_older_rounding_rule_made_is_re_made_as_it_was(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An autoprune before 4db1669 rounded half-way channel counts down at float-error ratios
    (0.35000000000000003 of 40 kept 24, now 28). Export re-ran such a trial (weights not kept)
    by its ratios under today's rule, made another model and refused it ("exported MACs ...
    differ from the trial's"). It re-makes the channels the trial kept."""
    import autoprune.prune as prune_mod

    today = prune_mod.kept_after_rounding

    def older(channels: int, ratio: float, round_to: int, blocks: int = 1) -> int:
        kept = today(channels, ratio, round_to, blocks)  # one channel fewer, where it can
        return kept - 1 if 0 < ratio and kept > 2 else kept

    monkeypatch.setattr(prune_mod, "kept_after_rounding", older)
    space = parse_space(tiny_space(tmp_path / "runs", "older", **{
        "search.trials": 1, "search.baselines": [0.5], "search.keep_models": False}))
    run_search(space, quiet=True)
    monkeypatch.setattr(prune_mod, "kept_after_rounding", today)
    trial = load_study("older", space.storage_url).trials[0]
    kept = trial.user_attrs["kept_channels"]
    assert any(kept[n] != today(8, 0.5, 1) for n in kept)  # today's rule keeps other counts
    res = export_trial("older", space.storage_url, "trial:0", tmp_path / "out")
    assert res.config["pruning"]["kept_channels"] == kept
    assert res.config["metrics"]["trial"]["macs"] == trial.user_attrs["macs"]


def test_a_rerun_runs_with_the_cpu_threads_its_trial_ran_with(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Floating-point sums differ with torch's thread count: a --jobs 2 trial (1 thread each)
    re-made by export with 2 threads scored 0.9917 against its 0.9889, and was refused."""
    import autoprune.trial as trial_mod
    from autoprune.inherit import rerun
    from autoprune.trial import TrialContext

    ctx = TrialContext.build(parse_space(tiny_space(tmp_path / "runs", "threads")))
    ratios = {g.name: 0.3 for g in ctx.groups}
    was = torch.get_num_threads()
    assert trial_mod.run_trial(ctx, ratios, finetune_steps=0).threads == was  # recorded
    seen: list[int] = []
    real = trial_mod.run_trial

    def counting(*args: Any, **kwargs: Any) -> Any:
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(trial_mod, "run_trial", counting)
    again = rerun(ctx, {}, {"seed": 0, "threads": was + 1}, ratios)
    assert seen == [was + 1] and again.threads == was + 1 and again.state == "complete"
    assert torch.get_num_threads() == was  # and back


def test_onnx_check_scales_with_the_outputs_and_catches_a_wrong_model(tmp_path: Path) -> None:
    from torch import nn

    from autoprune.base import load_sources
    from autoprune.export import verify
    from autoprune.measure import count_cost, evaluate, export_onnx

    space = parse_space(tiny_space(tmp_path, "onnx"))
    net, data, evaluate_fn = load_sources(space)

    class Scaled(nn.Module):  # logits of 1e5 and more: float32 rounding alone exceeds 1e-4
        def __init__(self, inner: nn.Module, factor: float) -> None:
            super().__init__()
            self.inner, self.factor = inner, factor

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) * self.factor

    model = Scaled(net, 1e6).eval()
    logged = {"accuracy": evaluate(model, data.val, "cpu", evaluate_fn),
              "macs": count_cost(model, space.model.input_shape).macs}
    path = export_onnx(model, space.model.input_shape, tmp_path / "ok.onnx")
    checked = verify(model, space, data, evaluate_fn, logged, path)
    assert checked["onnx_output_scale"] > 1e5
    assert checked["onnx_max_abs_diff"] <= checked["onnx_tolerance"]
    assert checked["onnx_tolerance"] < 1e-3 * checked["onnx_output_scale"] * 1.01
    with torch.no_grad():  # another model's ONNX file: the check must catch it
        for p in net.parameters():
            p.add_(0.1)
    other = export_onnx(model, space.model.input_shape, tmp_path / "other.onnx")
    with torch.no_grad():
        for p in net.parameters():
            p.sub_(0.1)
    with pytest.raises(AutopruneError, match="ONNX Runtime output differs from PyTorch"):
        verify(model, space, data, evaluate_fn, logged, other)

    # Outputs of about 1e-9 (an untrained mobilenet_v2's are): a fixed absolute tolerance
    # (1e-4) let the other model's file pass; the check scales with PyTorch's own rounding.
    tiny = Scaled(net, 1e-9).eval()
    path = export_onnx(tiny, space.model.input_shape, tmp_path / "tiny.onnx")
    checked = verify(tiny, space, data, evaluate_fn, logged, path)
    assert checked["onnx_output_scale"] < 1e-7 and checked["onnx_tolerance"] < 1e-9
    assert 0 < checked["onnx_float32_noise"] < 1e-13
    before = [p.clone() for p in net.parameters()]
    with torch.no_grad():  # weights 2% larger: outputs off by about 1e-11
        for p in net.parameters():
            p.mul_(1.02)
    other = export_onnx(tiny, space.model.input_shape, tmp_path / "tiny-other.onnx")
    with torch.no_grad():
        for p, b in zip(net.parameters(), before, strict=True):
            p.copy_(b)
    with pytest.raises(AutopruneError, match="float32 rounding"):
        verify(tiny, space, data, evaluate_fn, logged, other)


def test_front_table_shows_parameters_when_they_are_an_objective() -> None:
    import pandas as pd

    from autoprune.report import summary_columns

    front = pd.DataFrame({"trial": [0], "accuracy": [0.9], "macs_ratio": [0.5],
                          "params_ratio": [0.4], "latency_ms": [1.0]})
    assert "params_ratio" not in summary_columns(front, ["accuracy", "macs"]).columns
    shown = summary_columns(front, ["accuracy", "macs", "params"]).columns
    assert list(shown) == ["trial", "accuracy", "macs_ratio", "params_ratio", "latency_ms"]


def test_the_card_names_the_score_a_dense_model_was_judged_by(tmp_path: Path) -> None:
    from autoprune.export import score_meaning

    spec = tiny_space(tmp_path, "card")
    assert score_meaning(parse_space(spec), dense=False)[0] == "accuracy (top-1)"
    spec["data"]["ignore_index"] = 255
    short, long = score_meaning(parse_space(spec), dense=True)
    assert short == "accuracy (per-pixel top-1)"
    assert "labels 255 left out" in long and "per output position" in long
    spec["data"]["evaluate"] = "mymod:miou"
    assert score_meaning(parse_space(spec), dense=True)[0] == "accuracy (`mymod:miou`)"


def test_knee_is_the_best_trade_off_never_a_point_below_the_chord() -> None:
    # (cost, accuracy), normalised: the middle point lies below the chord from (0, 0) to (1, 1)
    cost = np.array([0.1, 0.5, 0.8, 0.9])
    acc = np.array([0.50, 0.60, 0.95, 1.00])
    assert knee_index(acc, cost) == 2  # above the chord: the knee
    assert knee_index(np.array([0.5, 0.6, 1.0]), np.array([0.1, 0.7, 0.9])) == 2  # none above
    assert knee_index(np.array([0.5, 0.95, 1.0]), np.array([0.1, 0.3, 0.9])) == 1


def test_bad_configs_and_weights_give_clear_errors(searched: tuple[Any, Path], exported: Path,
                                                    tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    space, _ = searched
    config = json.loads((exported / "prune_config.json").read_text())
    broken = json.loads(json.dumps(config))
    broken["pruning"]["ratios"]["stem.0"] = 1.5
    with pytest.raises(AutopruneError, match=r"pruning\.ratios\.stem\.0"):
        validate_config(broken)
    del broken["model"]["source"]
    with pytest.raises(AutopruneError, match=r"model: 'source' is a required property"):
        validate_config(broken)
    future = dict(config, schema_version=99)
    with pytest.raises(AutopruneError, match="schema_version 99 is not supported"):
        validate_config(future)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AutopruneError, match="not valid JSON"):
        read_config(tmp_path / "bad.json")

    state = torch.load(exported / "weights.pt", weights_only=True)
    state["extra.weight"] = torch.zeros(1)
    state.pop(next(iter(state)))
    torch.save(state, tmp_path / "bad_weights.pt")
    with pytest.raises(CheckpointError, match=r"missing keys.*unexpected keys.*extra\.weight"):
        rebuild(config, weights=tmp_path / "bad_weights.pt")
    # a mistyped or wrong file is said, naming the flag (it was a raw traceback)
    with pytest.raises(CheckpointError, match="--weights: .*weigths.pt: no such file"):
        rebuild(config, weights=tmp_path / "weigths.pt")
    with pytest.raises(CheckpointError, match="--weights: cannot read .*prune_config.json"):
        rebuild(config, weights=exported / "prune_config.json")
    with pytest.raises(CheckpointError, match="--checkpoint: base.pt: no such file"):
        rebuild(config, checkpoint="base.pt")

    ckpt = Path(load_study("exp", space.storage_url).user_attrs["base"]["checkpoint"])
    other = tmp_path / "other.pt"
    sd = torch.load(ckpt, weights_only=True)
    first = next(iter(sd))
    sd[first] = sd[first] + 1.0
    torch.save(sd, other)
    with pytest.raises(CheckpointError, match="--force"):
        rebuild(config, checkpoint=other)
    rebuild(config, checkpoint=other, force=True)  # forced: rebuilds all the same

    # a config edited after export: its figures would be passed on with a model they don't fit
    group, kept = next(iter(config["pruning"]["kept_channels"].items()))
    edited = json.loads(json.dumps(config))
    edited["pruning"]["kept_channels"][group] = kept + 4
    with pytest.raises(AutopruneError, match=rf"contradicts itself.*'{re.escape(group)}': "
                                             rf"\({kept + 4}, {kept}\)"):
        rebuild(edited, weights=exported / "weights.pt")
    edited = json.loads(json.dumps(config))
    edited["model"]["input_shape"] = [1, 1, 16, 16]
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    assert cli(["apply", str(tmp_path / "edited.json"), "--weights",
                str(exported / "weights.pt"), "--out", str(tmp_path / "e")]) == 2
    assert re.search(r"edited.json: metrics.trial says macs [\d,]+ \(rebuilt: [\d,]+\), so "
                     r"model or pruning was changed after export", capsys.readouterr().err)
    assert not (tmp_path / "e").exists()


# ----------------------------------------------------------------------------------------------
# The registry, against a real `mlflow server` on 127.0.0.1.


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    with mlflow_server_process(tmp_path) as url:
        yield url


def test_register_and_consume_from_a_real_mlflow_server(mlflow_server: str,
                                                         tmp_path: Path) -> None:
    from mlflow import MlflowClient

    runs = tmp_path / "runs"
    space = parse_space(space_dict(runs, "reg", tracking_uri=mlflow_server)
                        | {"search": {"trials": 3, "population_size": 4,
                                      "baselines": [0.25, 0.5]}})
    run_search(space, quiet=True)
    res = export_trial("reg", space.storage_url, "max-accuracy", tmp_path / "out",
                       register="digits-pruned", alias="champion")
    assert res.registered_version == "1"
    client = MlflowClient(mlflow_server)
    mv = client.get_model_version_by_alias("digits-pruned", "champion")
    assert mv.version == "1"
    assert mv.tags["autoprune.trial_run"] == res.config["source"]["mlflow_run_id"]
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    info = mlflow.models.get_model_info("models:/digits-pruned@champion")
    assert info.metadata["data"] == res.config["data"]  # the preprocessing travels with it
    assert "divided by 16" in info.metadata["data"]["preprocessing"]["steps"][0]
    assert mv.tags["autoprune.pytorch_flavour"] == "logged"
    # the ONNX flavour takes and returns the graph's names, as the card gives them
    pyfunc = mlflow.pyfunc.load_model("models:/digits-pruned@champion")
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    by_name = pyfunc.predict({"input": x})
    assert set(by_name) == {"output"} and by_name["output"].shape == (3, 10)
    assert np.array_equal(pyfunc.predict(x)["output"], by_name["output"])
    assert [i.name for i in pyfunc.metadata.get_input_schema().inputs] == ["input"]

    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "deploy_from_registry.py"), "--tracking-uri",
         mlflow_server, "--model", "digits-pruned", "--batch", "5"],
        capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["output_shape"] == [5, 10]
    assert len(result["predictions"]) == 5


_BRANCHY = """
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        if x.abs().sum() > 1e9:  # data-dependent: torch.export cannot take it, ONNX can
            x = x * 0
        return self.head(self.body(x).mean((2, 3)))


def build(num_classes=10):
    return Net(num_classes)
"""


def test_register_without_torch_export_a_trial_run_or_a_server(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    """--register had logged the ONNX flavour as a version and then failed on the PyTorch
    flavour (MLflow's is a torch.export program): a version without its alias, and a
    traceback. A trial whose run was deleted was logged into MLflow's Default experiment. And
    an export without --register needed the study's MLflow server (a traceback)."""
    import uuid

    import mlflow
    from mlflow import MlflowClient

    from autoprune.tracking import STUDY_TAG

    mod = f"branchy_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{mod}.py").write_text(_BRANCHY)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = space_dict(tmp_path / "runs", "branchy", tracking_uri="x")
    spec["model"] = {"source": f"{mod}:build", "input_shape": [1, 1, 8, 8],
                     "train": {"epochs": 2}}
    spec["search"].update({"trials": 3, "baselines": [0.25, 0.5]})
    with mlflow_server_process(tmp_path / "store") as url:
        spec["tracking"] = {"uri": url}
        space = parse_space(spec)
        run_search(space, quiet=True)
        study = load_study("branchy", space.storage_url)
        capfd.readouterr()
        # MLflow's registry variable is not read: with it set, the version went to that
        # store and its alias and tags to the study's (sweep W)
        monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{tmp_path / 'other.db'}")
        with pytest.warns(UserWarning, match="the ONNX flavour alone was logged"):
            res = export_trial("branchy", space.storage_url, "max-accuracy", tmp_path / "a",
                               register="branchy-model")
        assert "def forward" not in capfd.readouterr().err  # torch.export's graph dump
        assert not (tmp_path / "other.db").exists()
        monkeypatch.delenv("MLFLOW_REGISTRY_URI")
        client = MlflowClient(url)
        mv = client.get_model_version_by_alias("branchy-model", "champion")
        assert mv.version == res.registered_version == "1"
        assert mv.tags["autoprune.pytorch_flavour"].startswith("not logged: torch.export")
        mlflow.set_tracking_uri(url)
        assert mlflow.onnx.load_model("models:/branchy-model@champion") is not None
        # a trial whose run is gone: logged on a run of the study's own experiment
        other = next(t.number for t in study.trials if t.number != res.trial and
                     t.user_attrs.get("state") == "complete")
        run_id = next(r.info.run_id for r in client.search_runs(
            [client.get_experiment_by_name("branchy").experiment_id])
            if r.data.tags.get("autoprune.trial") == str(other))
        client.delete_run(run_id)
        with pytest.warns(UserWarning, match=f"trial {other} .* has no run"):
            res2 = export_trial("branchy", space.storage_url, f"trial:{other}",
                                tmp_path / "b", register="branchy-model")
        run = client.get_run(client.get_model_version("branchy-model",
                                                      res2.registered_version).run_id)
        assert run.info.experiment_id == client.get_experiment_by_name("branchy").experiment_id
        assert run.data.tags[STUDY_TAG] == "branchy"
        assert run.data.tags["autoprune.exported_trial"] == str(other)
    # the server is gone: the files need no MLflow; a registration does
    with pytest.warns(UserWarning, match="MLflow store cannot be reached .* does not answer"):
        res3 = export_trial("branchy", space.storage_url, "max-accuracy", tmp_path / "c")
    assert res3.config["source"]["mlflow_run_id"] is None
    assert (tmp_path / "c" / "model.onnx").exists()
    with pytest.raises(AutopruneError, match="--register: the study.s MLflow store cannot be"):
        export_trial("branchy", space.storage_url, "max-accuracy", tmp_path / "d",
                     register="branchy-model")
    assert not (tmp_path / "d").exists()


_TEXT = """
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TextCNN(nn.Module):
    def __init__(self, num_classes=2, vocab=50, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.conv = nn.Sequential(nn.Conv1d(dim, 32, 3), nn.BatchNorm1d(32), nn.ReLU(),
                                  nn.Conv1d(32, 32, 3), nn.ReLU(), nn.AdaptiveMaxPool1d(1))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, ids):
        return self.fc(self.conv(self.emb(ids).transpose(1, 2)).flatten(1))


def build(num_classes=2):
    return TextCNN(num_classes)


def loaders():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (400, 12), generator=g)
    labels = (ids == 7).any(1).long()  # does the sentence hold token 7?
    train = DataLoader(TensorDataset(ids[:320], labels[:320]), batch_size=32, shuffle=True,
                       drop_last=True)
    return train, DataLoader(TensorDataset(ids[320:], labels[320:]), batch_size=40), 2
"""


def test_a_model_of_token_ids_is_searched_and_exported_with_integer_inputs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A text model takes int64 token ids: it is traced, counted, timed and exported with
    them, and the deployable files take token ids too (they took float inputs, or failed)."""
    (tmp_path / "textmods.py").write_text(_TEXT)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = tiny_space(tmp_path / "runs", "text", objectives=["accuracy", "macs"],
                      model={"source": "textmods:build", "input_shape": [1, 12],
                             "input_dtype": "int64", "train": {"epochs": 8, "lr": 0.05}},
                      data={"source": "textmods:loaders", "batch_size": 32},
                      **{"search.trials": 3, "search.baselines": [0.25, 0.5]})
    with pytest.raises(AutopruneError, match=r"model.input_dtype: got 'float32' but "
                                             r"'textmods:loaders' yields int64 validation inputs; "
                                             r"allowed: 'int64'"):
        run_search(parse_space({**spec, "model": {**spec["model"], "input_dtype": "float32"}}),
                   quiet=True)
    space = parse_space(spec)
    summary = run_search(space, quiet=True)
    assert summary.trials == 3 and summary.failed == 0
    study = load_study("text", space.storage_url)
    assert study.user_attrs["base"]["accuracy"] > 0.8
    assert all(t.user_attrs["macs_ratio"] < 1 for t in study.trials)
    out = tmp_path / "exported"
    export_trial("text", space.storage_url, "max-accuracy", out)
    config = read_config(out / "prune_config.json")
    assert config["model"]["input_dtype"] == "int64"
    assert config["metrics"]["verified"]["onnx_float32_noise"] > 0  # token ids in a float64 run

    ids = torch.randint(0, 50, (5, 12))
    model = autoprune.load_pruned(out / "prune_config.json", out / "weights.pt")
    with torch.no_grad():
        ref = model(ids)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == "tensor(int64)"
    assert np.abs(sess.run(None, {"input": ids.numpy()})[0] - ref.numpy()).max() < 1e-4
    program = torch.export.load(str(out / "model.pt2")).module()
    assert torch.allclose(program(ids), ref, atol=1e-5)
    assert cli(["apply", str(out / "prune_config.json"), "--weights", str(out / "weights.pt"),
                "--out", str(tmp_path / "applied")]) == 0


def test_a_model_that_checks_its_version_on_load_inherits_and_exports(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's MNASNet refuses weights without its module version. Trials kept their
    weights as a plain dict of tensors, which has none: every inheriting trial failed, and so
    did every export."""
    import textwrap
    import uuid

    mod = f"versioned_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{mod}.py").write_text(textwrap.dedent("""
        from torch import nn

        class Versioned(nn.Module):
            _version = 2

            def __init__(self, num_classes=10):
                super().__init__()
                self.body = nn.Sequential(
                    nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                    nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
                self.head = nn.Linear(16, num_classes)

            def forward(self, x):
                return self.head(self.body(x).mean((2, 3)))

            def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
                if local_metadata.get("version") != 2:  # as MNASNet does
                    raise ValueError("version should be set to 1 or 2 instead of "
                                     f"{local_metadata.get('version')}")
                super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

        def build(num_classes=10):
            return Versioned(num_classes)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = tiny_space(tmp_path / "runs", "versioned", **{
        "search.trials": 4, "search.baselines": [0.5, 0.25], "search.inherit": True})
    spec["model"] = {"source": f"{mod}:build", "input_shape": [1, 1, 8, 8],
                     "train": {"epochs": 2}}
    space = parse_space(spec)
    summary = run_search(space, quiet=True)
    study = load_study("versioned", space.storage_url)
    assert summary.failed == 0, summary.errors
    assert any(t.user_attrs.get("inherits_trial") is not None for t in study.trials)
    result = export_trial("versioned", space.storage_url, "max-accuracy", tmp_path / "out",
                          runs_dir=space.runs_dir)
    assert (tmp_path / "out" / "model.onnx").exists() and result.trial in front_numbers(study)


def test_an_export_after_the_model_code_was_edited_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Export rebuilds a trial through the model's code as it is now. After an edit (ReLU to
    Tanh: the same weights, another model) it failed with "exported accuracy ... differs"
    alone, which names no cause."""
    import importlib
    import textwrap
    import uuid

    mod = f"edited_{uuid.uuid4().hex[:8]}"
    code = textwrap.dedent("""
        from torch import nn

        def build(num_classes=10):
            return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
    """)
    (tmp_path / f"{mod}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = tiny_space(tmp_path / "runs", "edited", **{"search.trials": 1,
                                                      "search.baselines": [0.25]})
    spec["model"] = {"source": f"{mod}:build", "input_shape": [1, 1, 8, 8],
                     "train": {"epochs": 2}}
    space = parse_space(spec)
    run_search(space, quiet=True)
    (tmp_path / f"{mod}.py").write_text(code.replace("nn.ReLU()", "nn.Tanh()"))
    importlib.reload(sys.modules[mod])
    # a resume refuses the other base, before training it (it had trained it first)
    with pytest.raises(AutopruneError, match=r"--resume: study 'edited' pruned the base model "
                                             r".*the code or files of model.source"):
        run_search(space, trials=2, resume=True, quiet=True)
    assert len(list((tmp_path / "runs" / "base").glob("*.pt"))) == 1
    with pytest.raises(AutopruneError, match=rf"exported accuracy .* differs .*; the code behind "
                                             rf"model.source \('{mod}:build'\) changed since "
                                             r"the search"):
        export_trial("edited", space.storage_url, "max-accuracy", tmp_path / "out")


def test_a_missing_user_checkpoint_is_not_blamed_on_the_runs_dir() -> None:
    """--runs-dir moves a trained base, never a user's model.checkpoint outside the runs
    directory: the hint for a missing one says to put the file back instead."""
    from autoprune.export import _missing_base

    space = parse_space(tiny_space(Path("runs"), "hint"))
    assert "--runs-dir" in _missing_base(space, "runs/base/resnet_tiny-abc.pt")
    message = _missing_base(space, "/data/ckpt/best.pt")
    assert "--runs-dir" not in message and "model.checkpoint the search was given" in message
    assert "run export from there" in _missing_base(space, "ckpt/best.pt")  # an older study


def test_the_card_says_slower_for_a_speed_up_below_one() -> None:
    from autoprune.report import speed_words

    assert speed_words(2.5) == "2.50x faster"
    assert speed_words(0.62) == "1.61x slower"  # it read "0.62x faster"


#: A user's model module: one conv block and a head.
_SMALL_MODEL = ("from torch import nn\n\n\ndef build(num_classes=10):\n"
                "    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), "
                "nn.ReLU(),\n"
                "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
                "                         nn.Linear(8, num_classes))\n")


def test_export_from_elsewhere_imports_the_user_s_modules_from_the_search_s_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's own model (`model.source: mymodels:build`, a module in the project
    folder) could not be exported from another directory, even with --runs-dir: 'cannot
    import module'. The study records the folder its modules were imported from."""
    import uuid

    mod = f"mymodels_{uuid.uuid4().hex[:8]}"
    proj, elsewhere = tmp_path / "proj", tmp_path / "elsewhere"
    proj.mkdir()
    elsewhere.mkdir()
    (proj / f"{mod}.py").write_text(_SMALL_MODEL)
    monkeypatch.chdir(proj)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the search puts proj on it
    spec = tiny_space(Path("runs"), "own", objectives=["accuracy", "macs"],
                      **{"search.trials": 2, "search.baselines": [0.5]})
    spec["model"] = {"source": f"{mod}:build", "input_shape": [1, 1, 8, 8],
                     "train": {"epochs": 1}}
    run_search(parse_space(spec), quiet=True)
    sys.path[:] = [p for p in sys.path if p not in (str(proj), "")]
    sys.modules.pop(mod, None)
    monkeypatch.chdir(elsewhere)
    assert cli(["export", "--study", "own", "--out", "out", "--runs-dir",
                str(proj / "runs")]) == 0
    assert (elsewhere / "out" / "model.onnx").exists()


def test_a_moved_project_exports_with_its_own_checkpoint_and_modules(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Sweep W: a project copied elsewhere (code, checkpoint and runs/ together, as from a
    cluster to a laptop) had every export refused: the study recorded the checkpoint's full
    old path, though the same file (same SHA-256) was right there, and the folder its modules
    were imported from."""
    import shutil
    import uuid

    import torch

    mod = f"movedmodels_{uuid.uuid4().hex[:8]}"
    proj, moved, elsewhere = tmp_path / "proj", tmp_path / "laptop" / "proj", tmp_path / "x"
    (proj / "ckpt").mkdir(parents=True)
    elsewhere.mkdir()
    (proj / f"{mod}.py").write_text(_SMALL_MODEL)
    monkeypatch.chdir(proj)
    monkeypatch.setattr(sys, "path", [str(proj), *sys.path])
    build = importlib.import_module(mod).build
    torch.save(build().state_dict(), proj / "ckpt" / "best.pt")
    spec = tiny_space(Path("runs"), "moved", objectives=["accuracy", "macs"],
                      **{"search.trials": 2, "search.baselines": [0.5]})
    spec["model"] = {"source": f"{mod}:build", "input_shape": [1, 1, 8, 8],
                     "checkpoint": "ckpt/best.pt"}
    run_search(parse_space(spec), quiet=True)
    sys.path[:] = [p for p in sys.path if p not in (str(proj), "")]
    sys.modules.pop(mod, None)
    moved.parent.mkdir()
    shutil.move(proj, moved)
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert cli(["export", "--study", "moved", "--out", "out", "--runs-dir",
                str(moved / "runs")]) == 0
    err = capsys.readouterr().err
    assert f"using {moved / 'ckpt' / 'best.pt'}, the same file" in err
    # MLflow's full artifact paths follow the runs directory (a resume had written its tables
    # and plots into the old folder, made again; the UI showed no artifact)
    assert "the runs directory was moved from" in err
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{moved / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and all(r.info.artifact_uri.startswith((moved / "runs").as_uri()) for r in runs)
    parent = next(r for r in runs if "trials.csv" in
                  {a.path for a in client.list_artifacts(r.info.run_id)})
    assert (moved / "runs" / "mlartifacts" / parent.info.run_id).is_dir()
    assert not proj.exists()
    # the export records its model code: rebuilt through other code (an edit, or another
    # project's module of that name), it says so (sweep W: outputs 16.9 apart, no word)
    out = elsewhere / "out"
    assert read_config(out / "prune_config.json")["model"]["code_digest"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the code as it was: no word
        autoprune.load_pruned(out / "prune_config.json", out / "weights.pt")
    source = moved / f"{mod}.py"
    source.write_text(source.read_text().replace("nn.ReLU()", "nn.Tanh()"))
    with pytest.warns(UserWarning, match="not the code the model was exported with"):
        autoprune.load_pruned(out / "prune_config.json", out / "weights.pt")
    # another file at that place is not taken for it
    torch.save(build().state_dict(), moved / "ckpt" / "best.pt")
    assert cli(["export", "--study", "moved", "--out", "out2", "--runs-dir",
                str(moved / "runs")]) == 2
    assert "base checkpoint" in capsys.readouterr().err


def test_a_read_only_runs_directory_is_read_by_pareto_and_export(
        searched: tuple[Any, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sweep W: pareto and export of a read-only results folder (an archive, a read-only
    mount) failed making a lock file beside the Optuna store, which they only read."""
    import shutil
    import stat

    import autoprune.locks as locks

    _, runs = searched
    archive = tmp_path / "archive"
    shutil.copytree(runs, archive, ignore=shutil.ignore_patterns("*.lock", "export*"))
    archive.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.geteuid() == 0:  # root writes through modes: a read-only mount stands in
        real = os.access
        monkeypatch.setattr(locks.os, "access", lambda p, mode: False if (
            Path(p) == archive and mode == os.W_OK) else real(p, mode))
    try:
        assert cli(["pareto", "--study", "exp", "--runs-dir", str(archive)]) == 0
        assert cli(["export", "--study", "exp", "--runs-dir", str(archive), "--out",
                    str(tmp_path / "out")]) == 0
        assert not list(archive.glob("*.lock"))
    finally:
        archive.chmod(stat.S_IRWXU)


def test_export_from_elsewhere_finds_a_relative_data_folder_where_the_search_ran(
        searched: tuple[Any, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sweep W: a study of ``imagefolder:data`` (relative) could not be exported from another
    directory, though its modules were found from the directory the search ran in."""
    import copy

    from autoprune.export import space_of

    space, _ = searched
    attrs = copy.deepcopy(load_study("exp", space.storage_url).user_attrs)
    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    attrs["space"]["data"]["source"] = "imagefolder:data"
    attrs["import_dir"] = str(proj)
    monkeypatch.chdir(tmp_path)
    assert space_of(attrs)[0].data.source == f"imagefolder:{proj / 'data'}"
    (tmp_path / "data").mkdir()  # one here is the user's: it comes first, as for modules
    assert space_of(attrs)[0].data.source == "imagefolder:data"


def test_export_takes_the_study_s_own_run_in_a_store_two_projects_share(
        tmp_path: Path) -> None:
    """Sweep W: two projects logging to one team store under one study name: export of the
    first took the newest parent run with that study tag, the second project's, and gave the
    model that project's trial run (its metrics, its registry entry)."""
    from mlflow import MlflowClient

    team = f"sqlite:///{tmp_path / 'team.db'}"
    spaces = [parse_space(space_dict(tmp_path / p / "runs", "proj", tracking_uri=team))
              for p in ("a", "b")]
    for space in spaces:
        run_search(space, quiet=True)
    a = load_study("proj", spaces[0].storage_url)
    res = export_trial("proj", spaces[0].storage_url, "max-accuracy", tmp_path / "out")
    run = MlflowClient(team).get_run(res.config["source"]["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == a.user_attrs["parent_run_id"]
    trial_accuracy = res.config["metrics"]["trial"]["accuracy"]
    assert run.data.metrics["accuracy"] == pytest.approx(trial_accuracy)


def test_an_onnx_file_onnx_runtime_cannot_run_is_a_named_error(tmp_path: Path) -> None:
    """Sweep X: a forward under bfloat16 autocast exports to an ONNX file ONNX Runtime
    refuses to load; export's verification ended in its raw traceback."""
    from autoprune.export import check_formats
    from autoprune.measure import export_onnx

    class Autocast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.net(x).float()

    model = Autocast().eval()
    path = export_onnx(model, (1, 1, 8, 8), tmp_path / "model.onnx")
    with pytest.raises(AutopruneError, match=r"verification: ONNX Runtime cannot run the "
                                             r"exported model.onnx \(\w+: \[ONNXRuntimeError\]"):
        check_formats(model, torch.zeros(2, 1, 8, 8), path)


def test_an_old_study_s_space_is_read_without_today_s_value_rules(
        searched: tuple[Any, Path]) -> None:
    """A value rule added since a study began (strictly increasing rungs, say) stopped its
    export: the stored space, which the user cannot edit, was validated again."""
    import copy

    from autoprune.config import ConfigError
    from autoprune.export import space_of

    space, _ = searched
    attrs = copy.deepcopy(load_study("exp", space.storage_url).user_attrs)
    attrs["space"]["search"]["fidelity"]["rungs"] = [0.3, 0.3]
    assert space_of(attrs)[0].search.fidelity.rungs == (0.3, 0.3)
    with pytest.raises(ConfigError, match="strictly increasing"):
        parse_space(attrs["space"])  # a space file given today still gets the rule


def test_an_export_to_a_full_disk_says_so_and_leaves_nothing(
        searched: tuple[Any, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a disk without room for model.pt2 and weights.pt, torch's zip writer aborted the
    process from a destructor (exit 134), after a warning that blamed torch.export, and the
    staging folder stayed on the full disk. The room is checked once the ONNX file is written
    (a filled disk stands in here: shutil.disk_usage as a nearly full one reports it)."""
    import collections
    import shutil

    space, _ = searched
    full = collections.namedtuple("usage", "total used free")(10**9, 10**9 - 1000, 1000)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: full)
    out = tmp_path / "out"
    with pytest.raises(AutopruneError, match=r"--out: no space left on device for the model "
                                             r"files: 0.0 MB free under .*needed for model.pt2"):
        export_trial("exp", space.storage_url, "knee", out)
    assert not out.exists() or not any(out.iterdir())
