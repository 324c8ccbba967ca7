"""Write a starter search space for a model: every group searchable, the head left alone."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from autoprune.groups import GroupInfo


def starter_space(source: str, input_shape: Sequence[int], groups: Sequence[GroupInfo],
                  num_classes: int | None, kwargs: Mapping[str, Any] | None = None,
                  checkpoint: str | None = None, ignore: Sequence[str] = (),
                  data: Mapping[str, Any] | None = None, input_dtype: str = "float32") -> str:
    """YAML text of a search space to edit, for the model the groups were listed for (its
    kwargs, checkpoint and ignored modules); without ``data`` the data source is a placeholder
    to fill in."""
    name = source.split(":")[-1].replace(".", "-").replace("_", "-")
    model: dict[str, Any] = {"source": source, "input_shape": list(input_shape),
                             "checkpoint": checkpoint, "num_classes": num_classes}
    if input_dtype != "float32":
        model["input_dtype"] = input_dtype
    if kwargs:
        model["kwargs"] = dict(kwargs)
    space = {
        "name": name,
        "model": model,
        "data": dict(data) if data else {"source": "imagefolder:data/my_dataset",
                                         "batch_size": 64},
        # 0.8 keeps at least a fifth of every group; thin groups (few channels) go less far.
        "groups": {"default": {"low": 0.0, "high": 0.8, "step": 0.05}, "ignore": list(ignore)},
        "pruning": {"importance": "l2", "round_to": 8},
        "finetune": {"epochs": 1, "lr": 0.01, "optimizer": "sgd", "momentum": 0.9},
        "objectives": ["accuracy", "macs", "latency"],
        "constraints": {"max_macs_ratio": None, "max_latency_ms": None, "min_accuracy": None},
        "latency": {"runtime": "onnxruntime", "threads": 1, "batch_size": 1, "warmup": 10,
                    "repeats": 50},
        "search": {"trials": 60, "sampler": "nsga2", "seed": 0},
    }
    header = (f"# Starter search space for {source}, "
              "written by `autoprune layers --write-space`.\n"
              f"# {len(groups)} groups: " + ", ".join(g.name for g in groups[:8])
              + (" ..." if len(groups) > 8 else "") + "\n"
              + ("" if data else "# Set data.source to your data.\n"))
    return header + yaml.safe_dump(space, sort_keys=False)
