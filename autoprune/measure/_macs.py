"""MACs and parameters, counted by Torch-Pruning's op counter."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

COUNTED_OPS = ("conv/linear/multi-head-attention MACs (bias adds included), plus two ops per "
               "element of affine BatchNorm/GroupNorm/LayerNorm (one without affine), one per "
               "output element of ReLU-family activations (ReLU, ReLU6, LeakyReLU, PReLU, ELU; "
               "not GELU/SiLU/Hardswish) and upsampling, one per input element of pooling "
               "(Torch-Pruning op counter); FLOPs = 2 x MACs")


@dataclass(frozen=True)
class CostResult:
    """Compute cost of one forward pass at the stated input shape (batch 1)."""

    macs: float
    params: int
    input_shape: tuple[int, ...]
    counted: str = COUNTED_OPS

    @property
    def flops(self) -> float:
        return 2.0 * self.macs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"flops": self.flops}


def count_cost(model: nn.Module, input_shape: tuple[int, ...]) -> CostResult:
    """Count MACs and parameters for one sample of ``input_shape`` (its batch dim is set to 1)."""
    shape = (1, *input_shape[1:])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        macs, params = tp.utils.count_ops_and_params(model, torch.zeros(shape, device=device))
    finally:
        model.train(was_training)
    return CostResult(macs=float(macs), params=int(params), input_shape=tuple(shape))
