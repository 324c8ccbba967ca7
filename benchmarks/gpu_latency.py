"""GPU latency of pruned torchvision models (torch eager on CUDA), uniform ratios, and how
repeatable one measurement is (``gpu_latency_repeats``).

Skips (exit 0) without a CUDA device (``--device cpu`` runs it on the CPU). On an H100
(2026-11-25) resnet18 at 224x224 stayed near 2 ms from ratio 0 to 0.75 at batch 1 and 32:
eager execution there is bound by kernel launches, not MACs, so the latency objective, not
MACs, tells whether pruning pays on such a GPU. The repeats table times a small ResNet (the
builtin resnet14, 28x28, batch 1) and its half-pruned copy several times, the GPU idle 1 s
before each, as a study's base and trials are timed: on an H100 (2026-11-27, a throwaway
script doing the same) one measurement's median ranged 0.8-1.7 ms, the pruned copy's the same.

    python benchmarks/gpu_latency.py [--quick] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch
from _common import DEFAULT_OUT, save_table

from autoprune.groups import describe_groups
from autoprune.measure import count_cost, measure_latency
from autoprune.prune import prune_model
from autoprune.sources import build_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_latency: no CUDA device here, skipped")
        return 0
    device = args.device
    where = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    shape = (1, 3, 224, 224)
    repeats, warmup = (20, 5) if args.quick else (100, 20)
    rows = []
    for name in ("resnet18", "mobilenet_v2"):
        model = build_model(f"torchvision:{name}", shape, 1000).eval()
        example = torch.zeros(shape)
        groups = describe_groups(model, example)
        for ratio in (0.0, 0.25, 0.5, 0.75):
            pruned = model if ratio == 0 else prune_model(
                model, example, {g.name: ratio for g in groups})[0]
            macs = count_cost(pruned, shape).macs
            for batch in (1, 32):
                lat = measure_latency(pruned, shape, "torch", batch_size=batch, warmup=warmup,
                                      repeats=repeats, device=device)
                rows.append({"model": name, "ratio": ratio, "batch": batch, "macs": macs,
                             "median_ms": lat.median_ms, "p90_ms": lat.p90_ms})
    df = pd.DataFrame(rows)
    base = df[df["ratio"] == 0].set_index(["model", "batch"])
    df["macs_ratio"] = [r.macs / base.loc[(r.model, r.batch), "macs"] for r in df.itertuples()]
    df["speedup"] = [base.loc[(r.model, r.batch), "median_ms"] / r.median_ms
                     for r in df.itertuples()]
    print(save_table(df, "gpu_latency", args.out_dir,
                     f"GPU latency (torch eager, {where})",
                     f"median of {repeats} timed runs after {warmup} warm-up runs; "
                     "speedup = base median / median at the same batch"))
    print(save_table(repeatability(device, 4 if args.quick else 8), "gpu_latency_repeats",
                     args.out_dir, f"Repeated latency measurements (torch eager, {where})",
                     "builtin resnet14 (width 16, 28x28, batch 1) and its copy with every group "
                     "pruned by half; each measurement: 10 warm-up and 50 timed runs after the "
                     "device idled 1 s, as a trial's; spread = slowest / fastest median"))
    return 0


def repeatability(device: str, measurements: int) -> pd.DataFrame:
    """One model timed ``measurements`` times: how far apart the medians fall."""
    import time

    shape = (1, 1, 28, 28)
    base = build_model("builtin:resnet14", shape, 10, {"width": 16}).eval()
    example = torch.zeros(shape)
    half = prune_model(base, example, {g.name: 0.5 for g in describe_groups(base, example)})[0]
    rows = []
    for name, model in (("resnet14", base), ("resnet14 pruned 0.5", half)):
        medians = []
        for _ in range(measurements):
            time.sleep(1.0)
            medians.append(measure_latency(model, shape, "torch", 1, 1, 10, 50,
                                           device).median_ms)
        rows.append({"model": name, "macs": count_cost(model, shape).macs,
                     "measurements": measurements, "fastest_ms": min(medians),
                     "slowest_ms": max(medians), "spread": max(medians) / min(medians),
                     "medians_ms": " ".join(f"{m:.3f}" for m in medians)})
    return pd.DataFrame(rows)


if __name__ == "__main__":
    sys.exit(main())
