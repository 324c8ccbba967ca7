"""Latency of one forward pass: PyTorch eager or ONNX Runtime, with the settings stated."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autoprune.errors import ConfigError
from autoprune.measure._inputs import example_input
from autoprune.measure._onnx import export_onnx


@dataclass(frozen=True)
class LatencyResult:
    """Wall-clock time of one forward pass, in milliseconds, and how it was measured."""

    runtime: str
    device: str
    threads: int
    batch_size: int
    input_shape: tuple[int, ...]
    warmup: int
    repeats: int
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs_ms: list[float] | None = None  # the median of each measurement, where several were made

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _summarise(times_s: list[float], **how: Any) -> LatencyResult:
    ms = np.asarray(times_s) * 1e3
    return LatencyResult(median_ms=float(np.median(ms)), p90_ms=float(np.percentile(ms, 90)),
                         mean_ms=float(ms.mean()), min_ms=float(ms.min()), **how)


def _time_torch(model: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> list[float]:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            model(x)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return times


def _time_onnxruntime(onnx_path: Path, x: np.ndarray, threads: int, device: str, warmup: int,
                      repeats: int) -> tuple[list[float], str]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    sess = ort.InferenceSession(str(onnx_path), opts, providers=providers)
    used = sess.get_providers()[0]
    name = sess.get_inputs()[0].name
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times, used


def latency_device(runtime: str, device: str) -> str:
    """Where ``latency.device`` measures with ``runtime`` here: ``"cpu"`` or ``"cuda"``.

    ``auto`` takes CUDA where the runtime can use it. An explicit ``cuda`` it cannot use is an
    error: it had measured on the CPU, with ``latency.device=cuda`` on the run. The
    ``onnxruntime`` package is CPU-only; ``onnxruntime-gpu`` brings its CUDA provider."""
    if runtime == "onnxruntime":
        import onnxruntime as ort

        can = torch.cuda.is_available() and \
            "CUDAExecutionProvider" in ort.get_available_providers()
        why = ("no CUDA device is available" if not torch.cuda.is_available() else
               "this onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu has it)")
    else:
        can, why = torch.cuda.is_available(), "no CUDA device is available"
    if device == "auto":
        return "cuda" if can else "cpu"
    if device == "cuda" and not can:
        raise ConfigError("latency.device", device,
                          f"'cpu' or 'auto' here, with latency.runtime {runtime!r}: {why}")
    return device


#: More timing threads per core than this is no setting, and crashed (100,000 on 2 cores).
MAX_THREADS_PER_CORE = 8


def check_threads(threads: int) -> None:
    """``latency.threads`` this machine can run at all (see :func:`threads_warning` for what
    it can run well)."""
    cores = os.cpu_count() or 1
    if threads > MAX_THREADS_PER_CORE * cores:
        raise ConfigError("latency.threads", threads,
                          f"1 to {MAX_THREADS_PER_CORE * cores} ({MAX_THREADS_PER_CORE} per "
                          f"core of this machine's {cores}; at most {cores} to time the model "
                          "rather than the contention)")


def threads_warning(threads: int, jobs: int = 1) -> str | None:
    """A warning when the timing threads of ``jobs`` trials at once exceed this machine's
    cores: the times then include the contention (a model timed at 1.1 ms took 35 ms with
    64 threads on 2 cores), the base's too. More than it can run at all is an error
    (:func:`check_threads`)."""
    check_threads(threads)
    cores = os.cpu_count() or 1
    if threads * jobs <= cores:
        return None
    at_once = f" x {jobs} trials at once" if jobs > 1 else ""
    return (f"autoprune: warning: latency.threads {threads}{at_once} exceeds this machine's "
            f"{cores} cores: latencies will include the contention; set latency.threads to "
            f"at most {max(cores // max(jobs, 1), 1)} for times of the model alone")


def measure_latency(model: nn.Module, input_shape: tuple[int, ...], runtime: str = "onnxruntime",
                    threads: int = 1, batch_size: int = 1, warmup: int = 10, repeats: int = 50,
                    device: str = "cpu", onnx_path: str | Path | None = None,
                    dtype: str = "float32") -> LatencyResult:
    """Median and p90 latency of ``model`` on a random batch.

    Args:
        model: the model (not modified; copied to ``device`` for torch timing).
        input_shape: the model input shape; its batch dim is replaced by ``batch_size``.
        runtime: ``"torch"`` (eager) or ``"onnxruntime"``.
        threads: intra-op threads (torch.set_num_threads / ORT intra_op_num_threads).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (:func:`latency_device`).
        onnx_path: an exported ONNX file to time instead of exporting ``model`` again.
        dtype: the input dtype (``model.input_dtype``).
    """
    device = latency_device(runtime, device)
    check_threads(threads)
    shape = (batch_size, *input_shape[1:])
    how = dict(threads=threads, batch_size=batch_size, input_shape=tuple(shape), warmup=warmup,
               repeats=repeats)
    if runtime == "torch":
        dev = torch.device(device)
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            m = model.to(dev).eval() if dev.type == "cpu" else _copy_to(model, dev)
            times = _time_torch(m, example_input(shape, dtype, random=True, device=dev), warmup,
                                repeats)
        finally:
            torch.set_num_threads(prev)
        return _summarise(times, runtime="torch", device=str(dev), **how)
    if runtime == "onnxruntime":
        x = example_input(shape, dtype, random=True).numpy()
        if onnx_path is not None:
            times, used = _time_onnxruntime(Path(onnx_path), x, threads, device, warmup, repeats)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = export_onnx(model, input_shape, Path(tmp) / "model.onnx", dtype=dtype)
                times, used = _time_onnxruntime(path, x, threads, device, warmup, repeats)
        return _summarise(times, runtime="onnxruntime", device=used, **how)
    raise ValueError(f"latency.runtime: got {runtime!r}; allowed: 'onnxruntime' | 'torch'")


def _copy_to(model: nn.Module, dev: torch.device) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(dev).eval()
