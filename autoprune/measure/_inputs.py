"""The synthetic inputs a model is traced, counted, timed and exported with."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from autoprune.config import INPUT_DTYPE_NAMES

#: ``model.input_dtype`` values: float inputs, or integer ones (token ids, raw uint8 pixels).
INPUT_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in INPUT_DTYPE_NAMES}


def example_input(shape: Sequence[int], dtype: str = "float32", random: bool = False,
                  batch: int | None = None, device: torch.device | str = "cpu",
                  seed: int = 0) -> torch.Tensor:
    """A batch of ``shape`` (its batch dim replaced by ``batch``): zeros, or N(0, 1) floats
    with ``random``. Integer inputs are always zeros: id 0 is valid for any vocabulary, where
    a random id might be out of an embedding's range (the cost of a lookup does not depend on
    the id)."""
    size = (shape[0] if batch is None else batch, *shape[1:])
    torch_dtype = INPUT_DTYPES[dtype]
    if random and torch_dtype.is_floating_point:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(size, generator=g, dtype=torch_dtype).to(device)
    return torch.zeros(size, dtype=torch_dtype, device=device)
