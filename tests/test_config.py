"""Search-space config: every bad value is rejected with its key path and what is allowed."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from autoprune.config import (
    Range,
    SpaceConfig,
    config_hash,
    dump_space,
    load_space,
    parse_space,
)
from autoprune.errors import ConfigError

Mutation = Callable[[dict[str, Any]], None]


def _error(data: dict[str, Any], mutate: Mutation) -> ConfigError:
    data = copy.deepcopy(data)
    mutate(data)
    with pytest.raises(ConfigError) as info:
        parse_space(data)
    return info.value


def test_demo_space_loads(repo_root: Path) -> None:
    path = repo_root / "search_spaces" / "digits_resnet.yaml"
    raw = yaml.safe_load(path.read_text())
    space = load_space(path)
    assert space.name == raw["name"] == "digits-resnet"
    assert space.model.source == raw["model"]["source"]
    assert space.model.input_shape == tuple(raw["model"]["input_shape"])
    assert space.model.kwargs == raw["model"]["kwargs"]
    assert space.groups.default == Range(**raw["groups"]["default"])
    assert space.groups.patterns == {k: Range(**v) for k, v in raw["groups"].items()
                                     if k not in ("default", "ignore", "patterns")}
    assert space.pruning.round_to == raw["pruning"]["round_to"]
    assert list(space.objectives) == raw["objectives"]
    assert space.search.trials == raw["search"]["trials"]
    # Defaults fill every key the file leaves out.
    assert space.data.eval_batch_size == 256
    assert space.latency.device == "cpu"
    assert space.experiment_name == "digits-resnet"
    assert space.storage_url == "sqlite:///runs/optuna.db"


@pytest.mark.parametrize(("mutate", "path", "suggestion"), [
    (lambda d: d.__setitem__("objectivs", ["accuracy"]), "objectivs", "objectives"),
    (lambda d: d["model"].__setitem__("soruce", "x"), "model.soruce", "source"),
    (lambda d: d["model"]["train"].__setitem__("epoch", 3), "model.train.epoch", "epochs"),
    (lambda d: d["groups"]["layer3.*"].__setitem__("hihg", 0.5),
     "groups.layer3.*.hihg", "high"),
    (lambda d: d["latency"].__setitem__("repeat", 5), "latency.repeat", "repeats"),
    (lambda d: d["search"].__setitem__("sampler_name", "tpe"), "search.sampler_name", "sampler"),
])
def test_unknown_key_names_path_and_close_match(space_dict: dict[str, Any], mutate: Mutation,
                                                path: str, suggestion: str) -> None:
    err = _error(space_dict, mutate)
    assert err.path == path
    assert f"did you mean {suggestion!r}?" in str(err)
    assert str(err).startswith(f"{path}: ")


@pytest.mark.parametrize(("mutate", "path", "allowed"), [
    (lambda d: d["pruning"].__setitem__("importance", "tayler"), "pruning.importance",
     ["'l1'", "'l2'", "'taylor'", "'random'", "'lamp'", "'fpgm'"]),
    (lambda d: d["search"].__setitem__("sampler", "nsga"), "search.sampler",
     ["'nsga2'", "'tpe'", "'gp'", "'random'"]),
    (lambda d: d["latency"].__setitem__("runtime", "ort"), "latency.runtime",
     ["'onnxruntime'", "'torch'"]),
    (lambda d: d.__setitem__("objectives", ["accuracy", "flops"]), "objectives[1]",
     ["'accuracy'", "'macs'", "'latency'", "'params'"]),
])
def test_bad_literal_names_allowed_values(space_dict: dict[str, Any], mutate: Mutation,
                                          path: str, allowed: list[str]) -> None:
    err = _error(space_dict, mutate)
    assert err.path == path
    for value in allowed:
        assert value in err.allowed


def test_bad_literal_suggests_close_value(space_dict: dict[str, Any]) -> None:
    err = _error(space_dict, lambda d: d["pruning"].__setitem__("importance", "tayler"))
    assert "did you mean 'taylor'?" in str(err)


@pytest.mark.parametrize(("mutate", "path"), [
    (lambda d: d["groups"]["default"].__setitem__("high", 1.0), "groups.default.high"),
    (lambda d: d["groups"]["default"].__setitem__("low", -0.1), "groups.default.low"),
    (lambda d: d["groups"]["layer3.*"].__setitem__("high", 1.5), "groups.layer3.*.high"),
    (lambda d: d["groups"]["layer3.*"].__setitem__("low", -0.2), "groups.layer3.*.low"),
])
def test_ratio_outside_unit_interval(space_dict: dict[str, Any], mutate: Mutation,
                                     path: str) -> None:
    err = _error(space_dict, mutate)
    assert err.path == path
    assert err.allowed == "a pruning ratio in [0, 1)"


def test_range_low_above_high_and_bad_step(space_dict: dict[str, Any]) -> None:
    err = _error(space_dict, lambda d: d["groups"].__setitem__(
        "default", {"low": 0.6, "high": 0.4}))
    assert err.path == "groups.default.low"
    assert "<= high (0.4)" in err.allowed
    err = _error(space_dict, lambda d: d["groups"]["layer3.*"].__setitem__("step", 0))
    assert err.path == "groups.layer3.*.step"


@pytest.mark.parametrize(("mutate", "path", "allowed"), [
    (lambda d: d["search"].__setitem__("trials", "4"), "search.trials", "an integer"),
    (lambda d: d["search"].__setitem__("trials", 2.5), "search.trials", "an integer"),
    (lambda d: d["search"].__setitem__("trials", True), "search.trials", "an integer"),
    (lambda d: d["finetune"].__setitem__("lr", "fast"), "finetune.lr", "a number"),
    (lambda d: d["search"].__setitem__("keep_models", "yes"), "search.keep_models",
     "true or false"),
    (lambda d: d["model"].__setitem__("source", 3), "model.source", "a string"),
    (lambda d: d["model"].__setitem__("input_shape", "1,1,8,8"), "model.input_shape",
     "a list of integers"),
    (lambda d: d["model"].__setitem__("input_shape", [1, "8", 8]), "model.input_shape[1]",
     "an integer"),
    (lambda d: d["model"].__setitem__("kwargs", [1, 2]), "model.kwargs", "a mapping"),
    (lambda d: d.__setitem__("latency", "fast"), "latency", "a mapping with keys"),
    (lambda d: d["constraints"].__setitem__("max_macs_ratio", "half"),
     "constraints.max_macs_ratio", "a number or null"),
])
def test_wrong_types(space_dict: dict[str, Any], mutate: Mutation, path: str,
                     allowed: str) -> None:
    err = _error(space_dict, mutate)
    assert err.path == path
    assert allowed in err.allowed


@pytest.mark.parametrize(("mutate", "path", "allowed"), [
    (lambda d: d["model"].__setitem__("input_shape", [8, 8, 0]), "model.input_shape", "positive"),
    (lambda d: d["model"].__setitem__("input_shape", [64]), "model.input_shape", "batch dim"),
    (lambda d: d["model"].__setitem__("input_dtype", "long"), "model.input_dtype",
     "'float32' | 'int64' | 'int32' | 'uint8'"),
    (lambda d: d["pruning"].__setitem__("round_to", 0), "pruning.round_to", "> 0"),
    (lambda d: d["latency"].__setitem__("repeats", 0), "latency.repeats", "> 0"),
    (lambda d: d["search"].__setitem__("population_size", 1), "search.population_size", ">= 2"),
    (lambda d: d["search"].__setitem__("baselines", [0.5, 1.0]), "search.baselines[1]",
     "[0, 1)"),
    (lambda d: d.__setitem__("objectives", ["macs", "latency"]), "objectives", "'accuracy'"),
    (lambda d: d.__setitem__("objectives", ["accuracy", "accuracy"]), "objectives",
     "at most once"),
    (lambda d: d.__setitem__("name", "my space"), "name", "without spaces"),
    # sweep W: a quote crashed MLflow's run filter, 240 characters the lock file's name
    (lambda d: d.__setitem__("name", "bob's"), "name", "without spaces, slashes, quotes"),
    (lambda d: d.__setitem__("name", "x" * 121), "name", "at most 120 bytes"),
    (lambda d: d.__setitem__("name", "tab\there"), "name", "control characters"),
    (lambda d: d.__setitem__("runs_dir", "r%20x"), "runs_dir", "without %, ? or #"),
    (lambda d: d.__setitem__("runs_dir", "r?x=1"), "runs_dir", "without %, ? or #"),
    (lambda d: d["finetune"].__setitem__("lr", float("nan")), "finetune.lr", "a finite number"),
    (lambda d: d["finetune"].__setitem__("epochs", float("inf")), "finetune.epochs",
     "a finite number"),
    (lambda d: d["search"].__setitem__("seed", -1), "search.seed", "[0, 4294967295]"),
    (lambda d: d["search"].__setitem__("seed", 2**40), "search.seed", "[0, 4294967295]"),
    (lambda d: d["groups"].__setitem__("default", {"low": 0.0, "high": 0.3, "step": 0.5}),
     "groups.default.step", "at most high - low"),
    (lambda d: d["search"].__setitem__("storage", "notaurl"), "search.storage",
     "an Optuna storage URL"),
    (lambda d: d["search"].__setitem__("timeout", "2 hours"), "search.timeout",
     "a duration such as '45s', '30m', '2h'"),
    (lambda d: d["search"].__setitem__("timeout", 0), "search.timeout", "a number > 0"),
    # checked at load: they had failed every trial (or the base training, with a traceback)
    (lambda d: d["finetune"].__setitem__("momentum", -0.5), "finetune.momentum", "[0, 1)"),
    (lambda d: d["finetune"].__setitem__("weight_decay", -1.0), "finetune.weight_decay",
     ">= 0"),
    (lambda d: d["model"]["train"].__setitem__("momentum", 1.5), "model.train.momentum",
     "[0, 1)"),
    (lambda d: d["model"]["train"].__setitem__("label_smoothing", 2.0),
     "model.train.label_smoothing", "[0, 1)"),
    (lambda d: d["pruning"].__setitem__("taylor_batches", 0), "pruning.taylor_batches", "> 0"),
    (lambda d: d["search"].__setitem__("fidelity", {"rungs": [0.3, 0.3]}),
     "search.fidelity.rungs", "strictly increasing"),
    (lambda d: d.__setitem__("tracking", {"uri": "./mlruns"}), "tracking.uri",
     "MLflow 3 refuses a folder store"),
    (lambda d: d.__setitem__("tracking", {"uri": "file:///tmp/mlruns"}), "tracking.uri",
     "MLflow 3 refuses a folder store"),
    (lambda d: d.__setitem__("tracking", {"uri": "htp://nowhere"}), "tracking.uri",
     "an MLflow tracking URI"),
])
def test_value_checks(space_dict: dict[str, Any], mutate: Mutation, path: str,
                      allowed: str) -> None:
    err = _error(space_dict, mutate)
    assert err.path == path
    assert allowed in err.allowed


@pytest.mark.parametrize(("given", "seconds"), [
    (None, None), (90, 90.0), ("45s", 45.0), ("30m", 1800.0), ("2h", 7200.0),
    ("1h30m", 5400.0), ("1d", 86400.0), ("3600", 3600.0)])
def test_a_time_budget_reads_as_seconds_or_a_duration(space_dict: dict[str, Any], given: Any,
                                                      seconds: float | None) -> None:
    from autoprune.config import duration_seconds

    space_dict["search"]["timeout"] = given
    space = parse_space(space_dict)
    assert duration_seconds(space.search.timeout, "search.timeout") == seconds


def test_missing_model_source(space_dict: dict[str, Any]) -> None:
    err = _error(space_dict, lambda d: d["model"].pop("source"))
    assert err.path == "model.source"
    assert "required" in err.allowed
    err = _error(space_dict, lambda d: d.pop("data"))
    assert err.path == "data"
    assert "required" in err.allowed and "source" in err.allowed


def test_root_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError) as info:
        parse_space(["name", "model"])  # type: ignore[arg-type]
    assert info.value.path == "<root>"


def test_groups_short_form_with_globs(space_dict: dict[str, Any]) -> None:
    space_dict["groups"] = {
        "default": {"low": 0.1, "high": 0.5},
        "layer2.*": {"low": 0.0, "high": 0.3, "step": None},
        "layer3.?.conv1": {"high": 0.7},
        "ignore": ["stem.*"],
    }
    groups = parse_space(space_dict).groups
    assert groups.default == Range(0.1, 0.5, 0.05)
    assert groups.patterns == {"layer2.*": Range(0.0, 0.3, None),
                               "layer3.?.conv1": Range(0.0, 0.7, 0.05)}
    assert groups.ignore == ("stem.*",)


def test_groups_short_form_mixes_with_patterns_key(space_dict: dict[str, Any]) -> None:
    space_dict["groups"] = {"patterns": {"stem.*": {"high": 0.2}}, "layer1.*": {"high": 0.4}}
    groups = parse_space(space_dict).groups
    assert list(groups.patterns) == ["stem.*", "layer1.*"]
    assert groups.patterns["layer1.*"].high == 0.4


def test_groups_short_form_rejects_non_mapping_pattern(space_dict: dict[str, Any]) -> None:
    err = _error(space_dict, lambda d: d["groups"].__setitem__("layer2.*", 0.5))
    assert err.path == "groups.layer2.*"
    assert "glob pattern" in err.allowed


def test_resolved_config_round_trip(space: SpaceConfig) -> None:
    plain = space.to_dict()
    assert plain["groups"]["patterns"]["layer3.*"] == {"low": 0.2, "high": 0.9, "step": 0.05}
    assert plain["model"]["input_shape"] == [1, 1, 8, 8]
    again = parse_space(plain)
    assert again == space
    assert config_hash(again) == config_hash(space)


def test_dump_and_load_round_trip(space: SpaceConfig, tmp_path: Path) -> None:
    path = tmp_path / "resolved.yaml"
    dump_space(space, path)
    assert yaml.safe_load(path.read_text())["finetune"]["steps"] == 2
    assert load_space(path) == space


def test_overrides(repo_root: Path) -> None:
    path = repo_root / "search_spaces" / "digits_resnet.yaml"
    raw = yaml.safe_load(path.read_text())
    space = load_space(path, {"search.trials": 4, "latency.runtime": "torch",
                              "groups.default.high": 0.5, "tracking.uri": "sqlite:///t.db",
                              "model.kwargs.width": 8})
    assert space.search.trials == 4
    assert space.latency.runtime == "torch"
    assert space.groups.default == Range(0.0, 0.5, 0.05)
    assert space.tracking_uri == "sqlite:///t.db"
    assert space.model.kwargs == {**raw["model"]["kwargs"], "width": 8}
    # Overrides are validated like the file itself.
    with pytest.raises(ConfigError) as info:
        load_space(path, {"search.trails": 4})
    assert info.value.path == "search.trails"
    assert "did you mean 'trials'?" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_space(path, {"groups.default.high": 1.2})
    assert info.value.path == "groups.default.high"


def test_override_below_a_scalar_is_a_config_error(space_dict: dict[str, Any],
                                                    tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space_dict))
    with pytest.raises(ConfigError) as info:
        load_space(path, {"search.trials.max": 4})
    assert info.value.path == "search.trials.max"
    assert "search.trials is 2" in info.value.allowed


def test_override_fills_an_empty_section(space_dict: dict[str, Any], tmp_path: Path) -> None:
    space_dict["tracking"] = None
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space_dict))
    assert load_space(path, {"tracking.experiment": "exp"}).experiment_name == "exp"


def test_missing_empty_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_space(tmp_path / "nope.yaml")
    assert info.value.path == "space"
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError) as info:
        load_space(tmp_path / "empty.yaml", {"search.trials": 2})
    assert info.value.path == "<root>"
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_space(tmp_path / "bad.yaml")
    assert "valid YAML" in info.value.allowed
    # plain YAML keeps the last of two equal keys without a word
    (tmp_path / "twice.yaml").write_text("name: a\nmodel: {source: builtin:resnet_tiny, "
                                         "input_shape: [1, 1, 8, 8]}\ndata: {source: "
                                         "builtin:digits}\nname: b\n")
    with pytest.raises(ConfigError, match="the key 'name' is given twice"):
        load_space(tmp_path / "twice.yaml")
    # sweep W: a folder, a Latin-1 comment and a UTF-16 file from a Windows editor ended in
    # raw tracebacks (and a UTF-8 file under LANG=C too: it was read in the locale's encoding)
    with pytest.raises(ConfigError, match="a YAML file, not a folder"):
        load_space(tmp_path)
    (tmp_path / "latin1.yaml").write_bytes("# Größe\nname: a\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"space: .*allowed: a UTF-8 text file \(invalid "):
        load_space(tmp_path / "latin1.yaml")
    text = ("# Größe\nname: a\nmodel: {source: builtin:resnet_tiny, input_shape: [1, 1, 8, 8]}"
            "\ndata: {source: builtin:digits}\n")
    for encoding in ("utf-16", "utf-8-sig", "utf-8"):
        (tmp_path / "s.yaml").write_bytes(text.encode(encoding))
        assert load_space(tmp_path / "s.yaml").name == "a"


def test_a_tilde_is_the_home_folder(space_dict: dict[str, Any], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Sweep W: ``runs_dir: ~/ap_runs`` made a folder named ``~`` in the project, and the
    search crashed at its end where pandas, which expands it, wrote elsewhere."""
    monkeypatch.setenv("HOME", str(tmp_path))
    space_dict.update(runs_dir="~/ap_runs")
    space_dict["model"]["checkpoint"] = "~/best.pt"
    space_dict["data"]["source"] = "imagefolder:~/data"
    space = parse_space(space_dict)
    assert space.runs_dir == str(tmp_path / "ap_runs")
    assert space.model.checkpoint == str(tmp_path / "best.pt")
    assert space.data.source == f"imagefolder:{tmp_path / 'data'}"
    assert space.storage_url == f"sqlite:///{tmp_path / 'ap_runs' / 'optuna.db'}"


def test_relative_checkpoint_resolves_against_the_space_folder(space_dict: dict[str, Any],
                                                               tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    project = tmp_path / "project"
    (project / "search_spaces").mkdir(parents=True)
    (project / "weights.pt").write_bytes(b"")
    space_dict["model"]["checkpoint"] = "weights.pt"
    path = project / "search_spaces" / "space.yaml"
    path.write_text(yaml.safe_dump(space_dict))
    monkeypatch.chdir(tmp_path)
    assert load_space(path).model.checkpoint == str(project / "weights.pt")
