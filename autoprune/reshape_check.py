"""Reshapes that do not follow pruned channels: a width written into the model's code.

A model that reshapes with a width of its own (``x.view(n, self.c, -1)`` with ``self.c = 32``)
still runs once a group of 32 channels is pruned to 16: the view takes the same number of
elements and spreads them differently (two channels per row), so the model computes something
else with the same output shape, and nothing fails. Torch-Pruning maps the channels through
the reshape as traced on the base model and cannot see this.

So every view and reshape is logged on the model before and after pruning. Before, the shapes
fall into blocks: runs of input axes whose product equals that of a run of output axes
(``[n, 32, H, W] -> [n, 32, H*W]``: ``n | 32 | H, W``). A reshape that follows the pruned
channels keeps those blocks (``[n, 16, H, W] -> [n, 16, H*W]``); one with a width written in
moves elements between them (``[n, 16, H, W] -> [n, 32, H*W/2]``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_RESHAPES = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.view_as,
             torch.Tensor.reshape_as, torch.flatten, torch.Tensor.flatten, torch.unflatten,
             torch.Tensor.unflatten}

Shapes = tuple[tuple[int, ...], tuple[int, ...]]


class ReshapeLog(TorchFunctionMode):
    """Logs ``(input shape, output shape)`` of every view and reshape while active."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Shapes] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in _RESHAPES and args and isinstance(args[0], torch.Tensor) \
                and isinstance(out, torch.Tensor):
            self.seen.append((tuple(args[0].shape), tuple(out.shape)))
        return out


def blocks(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[int, int]]:
    """Where runs of ``src`` axes and of ``dst`` axes have equal products: the ends
    ``(i, j)`` of each block (``src[i0:i]`` holds what ``dst[j0:j]`` holds)."""
    ends, i, j, a, b = [], 0, 0, 1, 1
    while i < len(src) or j < len(dst):
        if j == len(dst) or (i < len(src) and a <= b):
            a, i = a * src[i], i + 1
        else:
            b, j = b * dst[j], j + 1
        if a == b and (i, j) != (0, 0):
            ends.append((i, j))
    return ends


def moved(before: list[Shapes], after: list[Shapes]) -> tuple[Shapes, Shapes] | None:
    """The first reshape whose pruned shapes move elements between its blocks, as
    ``(shapes before, shapes after)``; None when every reshape follows the channels (or the
    two runs took other paths through the model, so they cannot be compared)."""
    if len(before) != len(after):
        return None
    for (src, dst), (psrc, pdst) in zip(before, after, strict=True):
        if len(src) != len(psrc) or len(dst) != len(pdst) or 0 in src or 0 in psrc:
            continue
        i0 = j0 = 0
        for i, j in blocks(src, dst):
            if math.prod(psrc[i0:i]) != math.prod(pdst[j0:j]):
                return (src, dst), (psrc, pdst)
            i0, j0 = i, j
    return None
