"""Helpers shared by the search tests: a tiny search space, and killing a search mid-way."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna

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


def wait_for_study(proc: subprocess.Popen[Any], study: str, storage_url: str,
                   until: Callable[[optuna.Study], bool], timeout: float = 240,
                   every: float = 0.5) -> bool:
    """Poll ``study`` while ``proc`` (a search) runs, until ``until(study)`` holds: whether it
    did before ``timeout`` or the search's end."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        time.sleep(every)
        try:
            found = load_study(study, storage_url)
        except AutopruneError:  # not made yet
            continue
        if until(found):
            return True
    return False


def kill_when_finished(cmd: list[str], study: str, storage_url: str, finished: int,
                       timeout: float = 300, sig: int = signal.SIGKILL,
                       outcome: dict[str, Any] | None = None, group: bool = True) -> int:
    """Run ``cmd`` (a search) and send ``sig`` (SIGKILL; SIGINT is a Ctrl-C) to its process
    group (``group=False``: to its first process alone, as ``docker stop`` does) once
    ``study`` holds ``finished`` finished trials. Returns how many were finished; fails if the
    search ended first. ``outcome`` gets the exit code and stderr after a signal the search
    may handle."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    done = 0

    def enough(found: optuna.Study) -> bool:
        nonlocal done
        done = sum(t.state.is_finished() for t in found.trials)
        return done >= finished

    try:
        wait_for_study(proc, study, storage_url, enough, timeout)
        assert proc.poll() is None, "the search ended before it could be killed"
        assert done >= finished, f"only {done} trials finished in {timeout} s"
        if group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        if sig != signal.SIGKILL:
            _, err = proc.communicate(timeout=120)
            if outcome is not None:
                outcome.update(rc=proc.returncode, stderr=err)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return done


def listening_addresses() -> set[tuple[str, int]]:
    """Every TCP (address, port) that listens on this machine, read from /proc/net/tcp{,6}.

    Addresses are ``127.0.0.1``, ``0.0.0.0``, ``::``, ``::ffff:127.0.0.1`` or another host;
    a listener on all interfaces shows as ``0.0.0.0`` or ``::``.
    """
    found = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            if state != "0A":  # LISTEN
                continue
            hexaddr, hexport = local.split(":")
            raw = bytes.fromhex(hexaddr)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            addr = socket.inet_ntop(socket.AF_INET6 if v6 else socket.AF_INET, raw)
            found.add((addr, int(hexport, 16)))
    return found


def beyond_loopback(listeners: set[tuple[str, int]]) -> set[tuple[str, int]]:
    """The listeners that another machine could reach: not on 127.0.0.0/8 or ::1."""
    def loopback(addr: str) -> bool:
        addr = addr.removeprefix("::ffff:")
        return addr.startswith("127.") or addr == "::1"
    return {(a, p) for a, p in listeners if not loopback(a)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def mlflow_server_process(store: Path, port: int | None = None) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 with its store in ``store``; yields its URL."""
    port = port or free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin) if mlflow_bin.exists() else shutil.which("mlflow") or "mlflow",
           "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{store / 'server.db'}",
           "--artifacts-destination", str(store / "server-artifacts")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, "mlflow server exited"
            assert time.time() < deadline, "mlflow server did not start in 90 s"
            time.sleep(0.5)
        yield url
    finally:
        # SIGINT, not SIGTERM: SIGTERM was seen to leave the server's workers orphaned
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def clock_ticks_per_trial_start(monkeypatch: Any, start: str, seconds: float = 100.0) -> None:
    """A clock for :class:`autoprune.study.TimeLimit` that moves ``seconds`` each time a trial
    starts (``start``: the ``Recorder`` method the controller calls then), so a time limit
    falls between the same trials on any machine, however fast."""
    import types

    from autoprune.search import Recorder

    starts = [0]
    original = getattr(Recorder, start)

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        starts[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Recorder, start, counted)
    monkeypatch.setattr("autoprune.study.time",
                        types.SimpleNamespace(monotonic=lambda: starts[0] * seconds))
