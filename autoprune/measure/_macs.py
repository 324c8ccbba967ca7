"""MACs and parameters, counted by Torch-Pruning's op counter."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch_pruning as tp
from torch import nn
from torch_pruning.utils import op_counter
from torch_pruning.utils.op_counter import rnn_flops

from autoprune.measure._inputs import example_input

COUNTED_OPS = ("conv/linear/multi-head-attention MACs (bias adds included), plus two ops per "
               "element of affine BatchNorm/GroupNorm/LayerNorm (one without affine), one per "
               "output element of ReLU-family activations (ReLU, ReLU6, LeakyReLU, PReLU, ELU; "
               "not GELU/SiLU/Hardswish) and upsampling, one per input element of pooling "
               "(Torch-Pruning op counter), and RNN/GRU/LSTM gate MACs per step; FLOPs = 2 x "
               "MACs")


def _rnn_macs_hook(rnn: nn.RNNBase, inputs: tuple[Any, ...], output: Any) -> None:
    """Torch-Pruning's RNN counter with the sequence length read right. Its own hook takes
    batch and length from ``input[0][0]`` (the first sample), so it counts the feature width as
    the length: an LSTM over 25 steps of 32 features was counted 20-35x too high."""
    x = inputs[0]
    if isinstance(x, nn.utils.rnn.PackedSequence):
        steps = int(x.data.shape[0])  # batch x length, summed over the packed sequences
    elif x.dim() == 2:  # unbatched (length, features)
        steps = int(x.shape[0])
    else:
        steps = int(x.shape[0] * x.shape[1])  # (batch, length) or (length, batch)
    per_step = 0
    for i in range(rnn.num_layers):
        w_ih, w_hh = getattr(rnn, f"weight_ih_l{i}"), getattr(rnn, f"weight_hh_l{i}")
        per_step = rnn_flops(per_step, rnn, w_ih, w_hh, w_ih.shape[1])
        if rnn.bias:
            per_step += getattr(rnn, f"bias_ih_l{i}").shape[0] + getattr(
                rnn, f"bias_hh_l{i}").shape[0]
    rnn.__flops__ += int(per_step * steps * (2 if rnn.bidirectional else 1))  # type: ignore[operator]


for _rnn in (nn.RNN, nn.GRU, nn.LSTM):
    op_counter.MODULES_MAPPING[_rnn] = _rnn_macs_hook
# SyncBatchNorm (a model trained with DDP) is a BatchNorm too: it was left out of the count
op_counter.MODULES_MAPPING[nn.SyncBatchNorm] = op_counter.bn_flops_counter_hook


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


def count_cost(model: nn.Module, input_shape: tuple[int, ...],
               dtype: str = "float32") -> CostResult:
    """Count MACs and parameters for one sample of ``input_shape`` (its batch dim is set to 1)."""
    shape = (1, *input_shape[1:])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        macs, params = tp.utils.count_ops_and_params(
            model, example_input(shape, dtype, device=device))
    finally:
        model.train(was_training)
    return CostResult(macs=float(macs), params=int(params), input_shape=tuple(shape))
