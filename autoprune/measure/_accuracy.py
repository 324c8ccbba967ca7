"""Top-1 accuracy on the validation split, or the user's ``evaluate(model, loader) -> float``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

IGNORE_INDEX = -100  # PyTorch's cross-entropy default: a label to leave out


def check_labels(out: torch.Tensor, labels: torch.Tensor, ignore_index: int, split: str) -> None:
    """Every label of a batch is a class id of the outputs or ``ignore_index``. Checked on
    every batch: a bad label past the first batch crashed the loss mid-training, or was
    silently scored as a wrong answer.

    Raises:
        SourceError: naming the label, the classes and ``data.ignore_index``.
    """
    from autoprune.errors import SourceError

    if labels.is_floating_point() or out.ndim < 2:
        return
    k = out.shape[1]
    bad = labels[(labels != ignore_index) & ((labels < 0) | (labels >= k))]
    if bad.numel():
        now = "not set" if ignore_index == IGNORE_INDEX else f"now {ignore_index}"
        raise SourceError(f"data.source: a {split} batch has the label {int(bad[0])}; allowed: "
                          f"class ids in [0, {k}) for the model's {k} outputs, or "
                          f"data.ignore_index ({now}) for labels to leave out")


def check_inputs(x: torch.Tensor, split: str) -> None:
    """Every input of a floating-point batch is finite. A NaN in validation data was scored
    (its argmax counted as a prediction); in training data it surfaced as a diverged loss.

    Raises:
        SourceError: naming the split and the first sample with a NaN or inf.
    """
    from autoprune.errors import SourceError

    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return
    sample = int((~finite).reshape(len(x), -1).any(1).nonzero()[0]) if x.ndim else 0
    raise SourceError(f"data.source: a {split} batch has a NaN or infinite input (sample "
                      f"{sample} of the batch); allowed: finite inputs (fill or drop missing "
                      f"values before the loader)")


class Tally:
    """How often each class was the label and the answer, over one scoring pass."""

    def __init__(self) -> None:
        self.labels = torch.zeros(0, dtype=torch.long)
        self.answers = torch.zeros(0, dtype=torch.long)

    def add(self, labels: torch.Tensor, answers: torch.Tensor, classes: int) -> None:
        """Count a batch's kept labels and answers (both within ``classes``: the labels
        were checked)."""
        labels = torch.bincount(labels.flatten().cpu(), minlength=classes)[:classes]
        answers = torch.bincount(answers.flatten().cpu(), minlength=classes)
        if len(self.labels) != classes:
            self.labels = torch.zeros(classes, dtype=torch.long)
            self.answers = torch.zeros(classes, dtype=torch.long)
        self.labels += labels
        self.answers += answers

    @property
    def majority(self) -> float:
        """The score of always answering the most common label."""
        total = int(self.labels.sum())
        return int(self.labels.max()) / total if total else 0.0

    @property
    def one_answer(self) -> bool:
        """Whether the model gave the same answer every time."""
        return int((self.answers > 0).sum()) <= 1


@torch.no_grad()
def top1_accuracy(model: nn.Module, loader: Iterable[Any], device: torch.device | str = "cpu",
                  max_batches: int | None = None, ignore_index: int = IGNORE_INDEX,
                  tally: Tally | None = None) -> float:
    """Fraction of correctly classified labels (eval mode; BN uses its running statistics):
    one per sample for (N, K) logits, one per position (pixel) for dense (N, K, ...) logits.
    Labels equal to ``ignore_index`` are left out, as the loss leaves them out. ``tally``
    counts the labels and answers."""
    model.eval()
    correct = total = seen = 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = batch[0].to(device), batch[1].to(device)
        check_inputs(x, "validation")
        out = model(x)
        check_labels(out, y, ignore_index, "validation")
        keep = y != ignore_index
        seen += y.numel()
        answers = out.argmax(1)
        correct += int(((answers == y) & keep).sum())
        total += int(keep.sum())
        if tally is not None:
            tally.add(y[keep], answers[keep], out.shape[1])
    if total == 0 and seen:
        from autoprune.errors import SourceError

        raise SourceError(f"data.source: every one of the {seen} validation labels is "
                          f"{ignore_index}, the label left out (data.ignore_index, or PyTorch's "
                          "-100), so nothing can be scored; allowed: a validation split with "
                          "labelled samples")
    if total == 0:
        raise ValueError("the validation loader yielded no samples")
    return correct / total


def _on_model_device(model: nn.Module, loader: Iterable[Any], ignore_index: int) -> float:
    device = next(iter(model.parameters()), torch.empty(0)).device
    return top1_accuracy(model, loader, device, ignore_index=ignore_index)


def accuracy_ignoring(ignore_index: int) -> Callable[[nn.Module, Iterable[Any]], float]:
    """Top-1 accuracy that leaves out ``ignore_index`` labels, as an ``evaluate`` function
    (picklable, for worker processes and Ray)."""
    return functools.partial(_on_model_device, ignore_index=ignore_index)


def evaluate(model: nn.Module, loader: Iterable[Any], device: torch.device | str = "cpu",
             fn: Callable[[nn.Module, Iterable[Any]], float] | None = None,
             finite: bool = True) -> float:
    """The task score (higher is better): ``fn(model, loader)`` if given, else top-1 accuracy.
    ``finite=False`` lets ``fn`` return NaN or inf (an untrained model's mean IoU may be
    undefined); anything but a number is an error all the same."""
    if fn is None:
        return top1_accuracy(model, loader, device)
    from autoprune.errors import AutopruneError, SourceError, out_of_memory

    model.eval()
    if isinstance(fn, functools.partial):  # autoprune's own (accuracy_ignoring)
        with torch.no_grad():
            return float(fn(model, loader))
    name = (f"{fn.__module__}:{fn.__qualname__}" if hasattr(fn, "__qualname__")
            else repr(fn))  # as data.evaluate names it
    allowed = "allowed: a finite score (one number), higher is better"
    try:
        with torch.no_grad():
            got = fn(model, loader)
    except (AutopruneError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - the user's function: name it, keep the chain
        if out_of_memory(e):  # the machine's limit, not a fault of the function
            raise
        raise SourceError(f"data.evaluate: {name!r} raised {type(e).__name__}"
                          f"{f': {e}' if str(e) else ''}") from e
    try:
        score = float(got)
    except (TypeError, ValueError):
        shown = f"{type(got).__name__} {str(got)[:80]}" if got is not None else "None"
        raise SourceError(f"data.evaluate: {name!r} returned {shown}; {allowed}") from None
    if finite and (score != score or score in (float("inf"), float("-inf"))):
        raise SourceError(f"data.evaluate: {name!r} returned {score}; {allowed}")
    return score
