"""Model and data sources: builtin, torchvision, imagefolder and module:function."""

from autoprune.sources._data import DataBundle, build_data
from autoprune.sources._imports import import_object
from autoprune.sources._models import (
    build_model,
    list_models,
    load_checkpoint,
    register_model,
)

__all__ = [
    "DataBundle",
    "build_data",
    "build_model",
    "import_object",
    "list_models",
    "load_checkpoint",
    "register_model",
]
