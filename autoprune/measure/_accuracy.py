"""Top-1 accuracy on the validation split, or the user's ``evaluate(model, loader) -> float``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


@torch.no_grad()
def top1_accuracy(model: nn.Module, loader: Iterable[Any], device: torch.device | str = "cpu",
                  max_batches: int | None = None) -> float:
    """Fraction of correctly classified samples (eval mode; BN uses its running statistics)."""
    model.eval()
    correct = total = 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = batch[0].to(device), batch[1].to(device)
        out = model(x)
        correct += int((out.argmax(1) == y).sum())
        total += int(y.numel())
    if total == 0:
        raise ValueError("the validation loader yielded no samples")
    return correct / total


def evaluate(model: nn.Module, loader: Iterable[Any], device: torch.device | str = "cpu",
             fn: Callable[[nn.Module, Iterable[Any]], float] | None = None) -> float:
    """The task score (higher is better): ``fn(model, loader)`` if given, else top-1 accuracy."""
    if fn is None:
        return top1_accuracy(model, loader, device)
    model.eval()
    with torch.no_grad():
        return float(fn(model, loader))
