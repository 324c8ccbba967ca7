"""Measurements: pure functions returning typed results that say what they measured."""

from autoprune.measure._accuracy import (
    IGNORE_INDEX,
    Tally,
    accuracy_ignoring,
    check_inputs,
    check_labels,
    evaluate,
    top1_accuracy,
)
from autoprune.measure._inputs import INPUT_DTYPES, example_input
from autoprune.measure._latency import (
    LatencyResult,
    check_threads,
    latency_device,
    measure_latency,
    threads_warning,
)
from autoprune.measure._macs import CostResult, count_cost
from autoprune.measure._onnx import export_onnx

__all__ = [
    "IGNORE_INDEX",
    "INPUT_DTYPES",
    "CostResult",
    "LatencyResult",
    "Tally",
    "accuracy_ignoring",
    "check_inputs",
    "check_labels",
    "count_cost",
    "evaluate",
    "example_input",
    "export_onnx",
    "check_threads",
    "latency_device",
    "measure_latency",
    "threads_warning",
    "top1_accuracy",
]
