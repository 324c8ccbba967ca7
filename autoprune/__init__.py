"""autoprune: multi-objective search for per-group structured pruning ratios."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

__all__ = ["__version__", "load_pruned"]

if TYPE_CHECKING:
    from torch import nn


def load_pruned(config_path: Any, weights_path: Any) -> nn.Module:
    """Rebuild an exported pruned model (see :func:`autoprune.rebuild.load_pruned`)."""
    from autoprune.rebuild import load_pruned as _load

    return _load(config_path, weights_path)
