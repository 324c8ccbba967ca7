"""The GPU check's spaces (``check.sh``), made from the shipped mnist5k space.

    DEV=cuda TRIALS=16 EPOCHS=6 python examples/gpu_check/spaces.py OUT_DIR

a: torch latency on DEV, multi-fidelity, sensitivity warm start, distillation;
b: Taylor importance, inheritance, --jobs 2 on one device, ONNX Runtime latency (auto);
c: b with ONNX Runtime latency on cuda (an error where onnxruntime has no CUDA provider);
e: a without kept weights (export re-runs the trial).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any

import yaml


def main(out: Path) -> None:
    dev = os.environ.get("DEV", "cuda")
    trials = int(os.environ.get("TRIALS", "12"))
    shipped = Path(__file__).resolve().parents[2] / "search_spaces" / "mnist5k_resnet.yaml"
    base: dict[str, Any] = yaml.safe_load(shipped.read_text())

    def write(name: str, space: dict[str, Any]) -> dict[str, Any]:
        space.update(name=f"gpu-{name}", runs_dir=str(out / f"runs_{name}"),
                     tracking={"experiment": f"gpu-{name}"})
        (out / f"{name}.yaml").write_text(yaml.safe_dump(space))
        return space

    a = copy.deepcopy(base)
    a["model"]["train"]["epochs"] = int(os.environ.get("EPOCHS", "6"))
    a["latency"] = {"runtime": "torch", "device": dev, "threads": 1, "batch_size": 1,
                    "warmup": 10, "repeats": 50}
    a["search"].update(trials=trials, population_size=6, device=dev)
    a = write("a", a)
    b = copy.deepcopy(a)
    b["pruning"]["importance"] = "taylor"
    b["latency"].update(runtime="onnxruntime", device="auto")
    b["search"].update(trials=max(trials // 2, 6), inherit=True, jobs=2)
    b = write("b", b)
    c = copy.deepcopy(b)
    c["latency"]["device"] = "cuda"
    write("c", c)
    e = copy.deepcopy(a)
    e["search"].update(trials=4, keep_models=False, warm_start={"sensitivity": False},
                       fidelity={"enabled": False})
    write("e", e)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
