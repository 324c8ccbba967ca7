"""Latency of one forward pass: PyTorch eager or ONNX Runtime, with the settings stated."""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

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
        device: ``"cpu"`` or ``"cuda"`` (ORT falls back to CPU without its CUDA provider).
        onnx_path: an exported ONNX file to time instead of exporting ``model`` again.
        dtype: the input dtype (``model.input_dtype``).
    """
    shape = (batch_size, *input_shape[1:])
    how = dict(threads=threads, batch_size=batch_size, input_shape=tuple(shape), warmup=warmup,
               repeats=repeats)
    if runtime == "torch":
        dev = torch.device(device if device != "cuda" or torch.cuda.is_available() else "cpu")
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
