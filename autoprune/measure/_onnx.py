"""ONNX export with a dynamic batch axis (used for latency in trials and for export alike)."""

from __future__ import annotations

import contextlib
import copy
import io
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from autoprune.measure._inputs import example_input

Exporter = Literal["auto", "torchscript", "dynamo"]


@contextlib.contextmanager
def _native_output_silenced() -> Iterator[None]:
    """Silence file descriptors 1 and 2 for a moment: the TorchScript exporter's C++ logger
    dumps its whole IR graph (60 lines and more) to stdout when it fails, in the middle of the
    progress bar or of a ``--json`` output, before the dynamo exporter takes over. The
    exception it raises says what failed."""
    streams = []
    for stream in (sys.stdout, sys.stderr):
        try:
            streams.append((stream, stream.fileno()))
        except (AttributeError, OSError, ValueError):  # a captured stream (pytest, notebooks)
            pass
    saved = []
    try:
        with open(os.devnull, "w") as null:
            for stream, fd in streams:
                stream.flush()
                saved.append((fd, os.dup(fd)))
                os.dup2(null.fileno(), fd)
            yield
    finally:
        for fd, copy_of in saved:
            os.dup2(copy_of, fd)
            os.close(copy_of)


def _torchscript(model: nn.Module, example: torch.Tensor, path: Path, dynamic: bool) -> None:
    axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic else None
    torch.onnx.export(model, (example,), str(path), input_names=["input"],
                      output_names=["output"], dynamo=False, dynamic_axes=axes,
                      opset_version=18)


def _dynamo(model: nn.Module, example: torch.Tensor, path: Path, dynamic: bool) -> None:
    dyn = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
    torch.onnx.export(model, (example,), str(path), input_names=["input"],
                      output_names=["output"], dynamo=True, external_data=False,
                      dynamic_shapes=dyn, verbose=False)


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | Path,
                dynamic_batch: bool = True, exporter: Exporter = "auto",
                dtype: str = "float32") -> Path:
    """Export ``model`` (a CPU copy in eval mode) to ONNX: input ``input``, output ``output``.

    ``auto`` tries the TorchScript exporter first (about 0.2 s for a small CNN against about
    2-8 s for the dynamo exporter here, which matters once per trial) and falls back to the
    dynamo exporter (``torch.export``) for models it cannot trace.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).cpu().eval()
    example = example_input(input_shape, dtype, random=True, batch=max(2, input_shape[0]))
    order = {"auto": [_torchscript, _dynamo], "torchscript": [_torchscript],
             "dynamo": [_dynamo]}[exporter]
    errors = []
    for fn in order:
        try:
            with _native_output_silenced(), warnings.catch_warnings(), \
                    contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                fn(model, example, path, dynamic_batch)
            return path
        except Exception as e:  # noqa: BLE001 - try the next exporter, report all if none work
            errors.append(f"{fn.__name__.strip('_')}: {type(e).__name__}: {e}")
    raise RuntimeError("ONNX export failed: " + " | ".join(errors))
