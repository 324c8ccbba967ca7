"""Helpers shared by the search tests: a tiny search space, and killing a search mid-way."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from autoprune.errors import AutopruneError
from autoprune.study import load_study


def tiny_space(runs: Path, name: str, **changes: Any) -> dict[str, Any]:
    """A search space that runs a trial in about a second: resnet_tiny (width 8) on digits.

    ``changes`` set dotted keys (``**{"search.trials": 7}``); a keyword without dots replaces
    a whole section (``groups={...}``).
    """
    space: dict[str, Any] = {
        "name": name,
        "model": {"source": "builtin:resnet_tiny", "input_shape": [1, 1, 8, 8],
                  "kwargs": {"width": 8}, "train": {"epochs": 3, "lr": 0.05}},
        "data": {"source": "builtin:digits", "batch_size": 64},
        "groups": {"default": {"low": 0.0, "high": 0.7, "step": 0.1}},
        "finetune": {"steps": 4, "bn_calibration_batches": 2},
        "latency": {"runtime": "onnxruntime", "warmup": 2, "repeats": 5},
        "search": {"trials": 5, "population_size": 4, "seed": 0,
                   "baselines": [0.25, 0.5, 0.75]},
        "runs_dir": str(runs),
    }
    for key, value in changes.items():
        node = space
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return space


def kill_when_finished(cmd: list[str], study: str, storage_url: str, finished: int,
                       timeout: float = 300) -> int:
    """Run ``cmd`` (a search) and SIGKILL its process group once ``study`` holds ``finished``
    finished trials. Returns how many were finished; fails if the search ended first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    done = 0
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            try:
                done = sum(t.state.is_finished() for t in load_study(study, storage_url).trials)
            except AutopruneError:
                continue
            if done >= finished:
                break
        assert proc.poll() is None, "the search ended before it could be killed"
        assert done >= finished, f"only {done} trials finished in {timeout} s"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return done
