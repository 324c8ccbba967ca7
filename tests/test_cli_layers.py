"""``autoprune layers``: list the dependency groups, write a starter search space."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from autoprune.base import load_sources
from autoprune.cli import main
from autoprune.config import load_space
from autoprune.groups import describe_groups
from autoprune.sources import build_model


def _layers_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["layers", *args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out, dict)
    return out


def test_resnet18_has_12_groups(capsys: pytest.CaptureFixture[str]) -> None:
    out = _layers_json(capsys, "--model", "torchvision:resnet18", "--input-shape", "1,3,224,224")
    assert out["model"] == "torchvision:resnet18"
    assert out["input_shape"] == [1, 3, 224, 224]
    groups = {g["name"]: g for g in out["groups"]}
    assert len(groups) == 12
    assert "fc" not in groups  # the head is never pruned
    # One group per residual stage (rooted anywhere in the coupled set) and one per block conv1.
    assert {f"layer{s}.{b}.conv1" for s in (1, 2, 3, 4) for b in (0, 1)} <= set(groups)
    assert groups["layer1.0.conv1"]["channels"] == 64
    assert set(groups["layer1.0.conv1"]["members"]) == {"layer1.0.conv1", "layer1.0.bn1",
                                                        "layer1.0.conv2"}
    assert groups["layer4.0.downsample.0"]["channels"] == 512
    assert "fc" in groups["layer4.0.downsample.0"]["members"]
    assert all(0 < g["macs_share"] <= 1 for g in groups.values())


def test_mobilenet_v2_has_25_groups(capsys: pytest.CaptureFixture[str]) -> None:
    out = _layers_json(capsys, "--model", "torchvision:mobilenet_v2", "--input-shape",
                       "1x3x224x224", "--num-classes", "5")
    groups = {g["name"]: g for g in out["groups"]}
    assert len(groups) == 25
    assert "classifier.1" not in groups
    # An expansion conv, its depthwise conv and the projection's input are one group, rooted
    # at the depthwise conv.
    assert "features.2.conv.0.0" not in groups
    assert groups["features.2.conv.1.0"]["channels"] == 96
    assert {"features.2.conv.0.0", "features.2.conv.1.0", "features.2.conv.2"} <= set(
        groups["features.2.conv.1.0"]["members"])
    assert "classifier.1" in groups["features.18.0"]["members"]


def test_table_output_for_a_space_file(capsys: pytest.CaptureFixture[str],
                                       repo_root: Path) -> None:
    path = repo_root / "search_spaces" / "digits_resnet.yaml"
    space = load_space(path)
    model = build_model(space.model.source, space.model.input_shape, 10, space.model.kwargs)
    expected = describe_groups(model, torch.zeros(space.model.input_shape), space.groups.ignore)
    assert main(["layers", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"\n{len(expected)} groups (the head is never pruned; MACs share counts" in out
    assert "MACs share" in out
    assert all(g.name in out for g in expected)


def test_write_space_gives_a_loadable_space(capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    path = tmp_path / "spaces" / "starter.yaml"  # a folder that is not there yet is made
    assert main(["layers", "--model", "builtin:resnet_tiny", "--input-shape", "1,1,8,8",
                 "--write-space", str(path)]) == 0
    captured = capsys.readouterr()
    assert "wrote a starter search space with 6 groups" in captured.err
    text = path.read_text()
    assert text.startswith("# Starter search space for builtin:resnet_tiny")
    assert yaml.safe_load(text)["data"]["source"] == "imagefolder:data/my_dataset"
    space = load_space(path, {"data.source": "builtin:digits", "runs_dir": str(tmp_path)})
    assert space.name == "resnet-tiny"
    assert space.model.input_shape == (1, 1, 8, 8) and space.model.num_classes == 10
    assert space.pruning.round_to == 8
    model, data, _fn = load_sources(space)
    assert data.num_classes == 10 and model.fc.out_features == 10


def test_write_space_from_a_space_keeps_its_model_and_data(capsys: pytest.CaptureFixture[str],
                                                           repo_root: Path,
                                                           tmp_path: Path) -> None:
    """From a space, the starter is for that space's model (kwargs, checkpoint, ignored
    modules) and data, not for the factory's default model."""
    spec = yaml.safe_load((repo_root / "search_spaces" / "digits_resnet.yaml").read_text())
    spec["groups"]["ignore"] = ["stem.*"]
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(spec))
    path = tmp_path / "starter.yaml"
    assert main(["layers", str(tmp_path / "mine.yaml"), "--write-space", str(path)]) == 0
    written = load_space(path, {"runs_dir": str(tmp_path)})
    assert written.model.kwargs == spec["model"]["kwargs"]
    assert written.groups.ignore == ("stem.*",)
    assert written.data.source == spec["data"]["source"]
    assert "Set data.source" not in path.read_text()
    capsys.readouterr()
    listed = _layers_json(capsys, str(tmp_path / "mine.yaml"))
    again = _layers_json(capsys, str(path))
    assert [g["name"] for g in again["groups"]] == [g["name"] for g in listed["groups"]]


def test_write_space_and_json_together(capsys: pytest.CaptureFixture[str],
                                       tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    out = _layers_json(capsys, "--model", "builtin:tiny_cnn", "--input-shape", "1,1,8,8",
                       "--write-space", str(path))
    names = [g["name"] for g in out["groups"]]
    assert sorted(names) == ["0.0", "1.0", "2.0"]
    assert "# 3 groups: " in path.read_text()


@pytest.mark.parametrize(("shape", "message"), [
    ("1,3,abc", "comma-separated ints"),
    ("224", "with a batch dim"),
    ("1,3,0,224", "positive ints"),
])
def test_bad_input_shape(capsys: pytest.CaptureFixture[str], shape: str, message: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(["layers", "--model", "torchvision:resnet18", "--input-shape", shape])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"--input-shape: got {shape!r}; allowed:" in err
    assert message in err


def test_input_shape_the_model_rejects(capsys: pytest.CaptureFixture[str]) -> None:
    # A shape argparse accepts but the model does not: an error line, not a traceback.
    assert main(["layers", "--model", "builtin:tiny_cnn", "--input-shape", "1,1,8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autoprune: error: model.input_shape: got [1, 1, 8]; the model "
                          "'builtin:tiny_cnn' rejects float32 inputs of that shape")
    assert "expected 4D input (got 3D input)" in err and "Traceback" not in err


def test_layers_refuses_what_search_refuses_and_lists_groups_that_fail_to_prune(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "layer_mods.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "class Dict(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(64, 10)\n"
        "    def forward(self, x):\n"
        "        return {'logits': self.fc(x.flatten(1))}\n"
        "class Masked(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a = nn.Conv2d(1, 16, 3, padding=1)\n"
        "        self.b = nn.Conv2d(16, 32, 3, padding=1)\n"
        "        self.register_buffer('mask', torch.ones(1, 32, 1, 1))\n"
        "        self.fc = nn.Linear(32, 10)\n"
        "    def forward(self, x):\n"
        "        return self.fc((self.b(self.a(x).relu()) * self.mask).mean((2, 3)))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["layers", "--model", "layer_mods:Dict", "--input-shape", "1,1,8,8"]) == 2
    assert "model.source: 'layer_mods:Dict' returns a dict with keys ['logits']; allowed: one " \
           "tensor of logits" in capsys.readouterr().err
    out = _layers_json(capsys, "--model", "layer_mods:Masked", "--input-shape", "1,1,8,8")
    assert [g["name"] for g in out["groups"]] == ["a"]
    assert out["left_out"]["b"].startswith("pruning it to ratio 0.25 fails (RuntimeError:")


def test_missing_checkpoint(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["layers", "--model", "builtin:tiny_cnn", "--input-shape", "1,1,8,8",
                 "--checkpoint", "/nonexistent/weights.pt"]) == 2
    assert "autoprune: error: model.checkpoint: file '/nonexistent/weights.pt' does not exist" \
        in capsys.readouterr().err


def test_missing_model_or_unknown_source(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["layers", "--model", "torchvision:resnet18"]) == 2
    assert "give a SPACE.yaml, or --model and --input-shape" in capsys.readouterr().err
    assert main(["layers", "--model", "torchvision:resnet_18", "--input-shape", "1,3,32,32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autoprune: error: model.source: got 'torchvision:resnet_18'")
    assert "close matches: ['resnet18'" in err


def test_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("autoprune")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "autoprune.cli"]
    proc = subprocess.run([*cmd, "layers", "--model", "builtin:tiny_cnn", "--input-shape",
                           "1,1,8,8", "--json"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["groups"]) == 3
    bad = subprocess.run([*cmd, "layers", "--model", "builtin:tiny_cnn", "--input-shape", "x"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert bad.returncode == 2
    assert "--input-shape: got 'x'" in bad.stderr


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import autoprune

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"autoprune {autoprune.__version__}"


def test_an_installed_autoprune_finds_its_shipped_spaces_and_runtime_env(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """From a project of the user's own (not a clone), the README's
    `search_spaces/digits_resnet.yaml` was 'not an existing YAML file', and `submit` sent a
    runtime env file that was not there (a Ray traceback) or one whose job could not import
    autoprune on the cluster."""
    import autoprune
    from autoprune.cli import runtime_env

    monkeypatch.chdir(tmp_path)
    assert load_space("search_spaces/digits_resnet.yaml").name == "digits-resnet"
    assert load_space("mnist5k_resnet").model.source.startswith("builtin:")
    assert main(["layers", "search_spaces/nope.yaml"]) == 2
    assert "a space autoprune ships: search_spaces/digits_resnet.yaml" in capsys.readouterr().err
    env = runtime_env(None)
    assert env["working_dir"] == "." and env["pip"]  # the shipped one
    assert env["py_modules"] == [str(Path(autoprune.__file__).resolve().parent)]
    (tmp_path / "mine.yaml").write_text("working_dir: .\npy_modules: [extra]\n")
    assert runtime_env("mine.yaml")["py_modules"] == ["extra", env["py_modules"][0]]
    # a runtime env that is not there is said before Ray is called
    assert main(["submit", "search_spaces/digits_resnet.yaml", "--runtime-env", "gone.yaml",
                 "--address", "http://127.0.0.1:9"]) == 2
    assert "--runtime-env: got 'gone.yaml', which cannot be read" in capsys.readouterr().err
    # in a clone, the repository's own runtime env, autoprune inside its working dir
    repo = Path(autoprune.__file__).resolve().parent.parent
    assert "py_modules" not in runtime_env(None, repo)
    # the project's own virtualenv inside it, autoprune installed there: the package goes as
    # a module (the venv's folder is not uploaded: excluded, or gigabytes)
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages" / "autoprune"
    site.mkdir(parents=True)
    monkeypatch.setattr(autoprune, "__file__", str(site / "__init__.py"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    env = runtime_env(None)
    assert env["py_modules"] == [str(site)] and "venv/" in env["excludes"]


def test_ui_without_a_store_says_so_and_the_search_names_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`autoprune ui` where no search ran made an empty store (and a stray runs/ folder) and
    showed no runs; the search's last line said `autoprune ui` whatever its runs dir."""
    from autoprune.cli import _ui_hint

    monkeypatch.chdir(tmp_path)
    assert main(["ui", "--port", "1"]) == 2
    assert "--runs-dir: no MLflow store at runs/mlflow.db" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    # a port another server holds: said, not a UI that 'starts' and exits 0
    import socket

    from mlflow import MlflowClient

    (tmp_path / "runs").mkdir()
    MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}").search_experiments()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["ui", "--port", str(port)]) == 2
    assert f"--port: got {port}, which is not free" in capsys.readouterr().err
    space = load_space("search_spaces/digits_resnet.yaml")
    assert _ui_hint(space) == "`autoprune ui` to browse"
    assert _ui_hint(space.replace(runs_dir="../elsewhere")) == \
        "`autoprune ui --runs-dir ../elsewhere` to browse"
    # shell-quoted, so that the command pasted as printed runs (sweep W)
    assert _ui_hint(space.replace(runs_dir="my runs")) == \
        "`autoprune ui --runs-dir 'my runs'` to browse"


def test_autoprune_s_warnings_read_as_its_errors_do(capsys: pytest.CaptureFixture[str]) -> None:
    import autoprune
    from autoprune.cli import _autoprune_warnings

    show = _autoprune_warnings()
    ours = str(Path(autoprune.__file__).parent / "export.py")
    show(UserWarning("model.pt2 not written"), UserWarning, ours, 1)
    assert capsys.readouterr().err == "autoprune: warning: model.pt2 not written\n"
    show(UserWarning("theirs"), UserWarning, "/elsewhere/torch/x.py", 1)
    assert "autoprune: warning" not in capsys.readouterr().err


def test_a_data_function_gets_the_space_s_loader_settings_or_a_warning() -> None:
    """data.batch_size and the like went nowhere for a user's data function, silently."""
    from autoprune.config import DataConfig
    from autoprune.sources._data import _loader_settings

    def takes(batch_size: int = 8, seed: int = 0) -> None: ...

    def takes_none() -> None: ...

    cfg = DataConfig(source="m:f", batch_size=32, eval_batch_size=100, seed=3)
    with pytest.warns(UserWarning, match="data.eval_batch_size: 100 not used"):
        assert _loader_settings(takes, cfg) == {"batch_size": 32, "seed": 3}
    with pytest.warns(UserWarning, match="data.batch_size: 32, data.eval_batch_size: 100, "
                      "data.seed: 3 not used: .* takes no batch_size or eval_batch_size or seed"):
        assert _loader_settings(takes_none, cfg) == {}
    assert _loader_settings(takes_none, DataConfig(source="m:f")) == {}  # defaults: no warning


def test_layers_refuses_the_patterns_search_refuses(capsys: pytest.CaptureFixture[str],
                                                    repo_root: Path, tmp_path: Path) -> None:
    """`layers SPACE` said nothing of a pattern matching no group, which `search` then
    refused, pointing back at `autoprune layers`."""
    spec = yaml.safe_load((repo_root / "search_spaces" / "digits_resnet.yaml").read_text())
    spec["groups"]["layer9.*"] = {"low": 0.0, "high": 0.5}
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(spec))
    assert main(["layers", str(tmp_path / "typo.yaml")]) == 2
    assert "groups.layer9.*: matches no group" in capsys.readouterr().err


def test_submit_passes_the_trial_resources_on() -> None:
    """`submit` had no --gpus-per-trial: a cluster job could not ask for GPUs."""
    from autoprune.cli import build_parser, submit_command

    args = build_parser().parse_args(["submit", "search_spaces/digits_resnet.yaml",
                                      "--gpus-per-trial", "0.5", "--cpus-per-trial", "2",
                                      "--timeout", "2h"])
    cmd = submit_command(args, "env.yaml")
    search = cmd[cmd.index("--") + 1:]
    assert search[search.index("--gpus-per-trial") + 1] == "0.5"
    assert search[search.index("--timeout") + 1] == "7200.0"  # the job's search reads seconds
    assert search[search.index("--cpus-per-trial") + 1] == "2.0"
    plain = submit_command(build_parser().parse_args(["submit", "s.yaml"]), "env.yaml")
    assert "--gpus-per-trial" not in plain and "--timeout" not in plain


def test_a_full_disk_or_a_lost_store_reads_as_such() -> None:
    """A full disk ended a search in 100-300 lines of chained traceback whose Optuna layer
    blamed "invalid data in the commit": the chain is read for what went wrong around it."""
    import errno
    import sqlite3

    import optuna
    import sqlalchemy.exc

    from autoprune.errors import environment_error

    def chained(inner: BaseException, outer: BaseException) -> BaseException:
        try:
            try:
                raise inner
            except BaseException as e:
                raise outer from e
        except BaseException as e:  # noqa: BLE001 - the chain is the point
            return e

    full = OSError(errno.ENOSPC, "No space left on device", "/runs/studies/s/trials.csv")
    assert environment_error(chained(full, RuntimeError("while recording"))) == \
        "no space left on device writing /runs/studies/s/trials.csv"
    locked = sqlalchemy.exc.OperationalError("UPDATE trials", {},
                                             sqlite3.OperationalError("database is locked"))
    commit = optuna.exceptions.StorageInternalError("An exception is raised during the commit")
    assert "stayed locked by another process" in str(environment_error(chained(locked, commit)))
    grown = sqlalchemy.exc.OperationalError("INSERT", {},
                                            sqlite3.OperationalError("database or disk is full"))
    assert environment_error(chained(grown, commit)) == \
        "no space left on device (a SQLite store could not grow)"
    gone = sqlite3.OperationalError("attempt to write a readonly database")
    assert "deleted, moved or made read-only" in str(environment_error(gone))
    assert environment_error(ValueError("a bug")) is None
