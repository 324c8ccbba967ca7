"""Shared fixtures: the repository root, a small search space in a temporary runs dir, digits."""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from autoprune.config import DataConfig, SpaceConfig, parse_space
from autoprune.sources import DataBundle, build_data

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_SPACE = REPO_ROOT / "search_spaces" / "digits_resnet.yaml"
DIGITS_SHAPE = (1, 1, 8, 8)

# Ray nodes started by the tests (ray.cluster_utils.Cluster, `ray start`) take 127.0.0.1 as
# their address and listen there only; on Linux Ray would otherwise give them the machine's
# outward address and listen on every interface. Ray reads it at import: before any test's.
assert "ray" not in sys.modules, "ray was imported before conftest could keep it on loopback"
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; on a busy 2-core machine several threads spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    """An empty runs directory under the test's temporary folder."""
    path = tmp_path / "runs"
    path.mkdir()
    return path


@pytest.fixture
def space_dict(runs_dir: Path) -> dict[str, Any]:
    """The demo space (search_spaces/digits_resnet.yaml) as a mapping, with small budgets.

    Every section a test may edit is set here, so the demo file can change without breaking
    tests. ``runs_dir`` points to a temporary folder; a test may change the mapping freely.
    """
    data = copy.deepcopy(yaml.safe_load(DEMO_SPACE.read_text()))
    data["runs_dir"] = str(runs_dir)
    data["model"] = {"source": "builtin:resnet_tiny", "input_shape": list(DIGITS_SHAPE),
                     "kwargs": {"width": 8, "blocks": 1},
                     "train": {"epochs": 1, "lr": 0.05, "optimizer": "sgd"}}
    data["data"] = {"source": "builtin:digits", "batch_size": 32}
    data["groups"] = {"default": {"low": 0.0, "high": 0.8, "step": 0.05},
                      "layer3.*": {"low": 0.2, "high": 0.9, "step": 0.05}}
    data["pruning"] = {"importance": "l2", "round_to": 4}
    data["objectives"] = ["accuracy", "macs", "latency"]
    data["constraints"] = {"max_macs_ratio": 0.8}
    data["finetune"] = {"steps": 2, "lr": 0.01, "bn_calibration_batches": 2}
    data["latency"] = {"runtime": "torch", "threads": 1, "warmup": 1, "repeats": 3}
    data["search"] = {"trials": 2, "sampler": "random", "seed": 0, "population_size": 2,
                      "baselines": [0.5]}
    return data


@pytest.fixture
def space(space_dict: dict[str, Any]) -> SpaceConfig:
    """:func:`space_dict` validated."""
    return parse_space(space_dict, base_dir=REPO_ROOT)


@pytest.fixture(scope="session")
def digits() -> DataBundle:
    """scikit-learn digits at 1x8x8, batch 32 (shared: loaders are re-iterable)."""
    return build_data(DataConfig(source="builtin:digits", batch_size=32), DIGITS_SHAPE)
