"""GPU latency of pruned torchvision models (torch eager on CUDA), uniform ratios.

Skips (exit 0) without a CUDA device. On an H100 (2026-11-25) resnet18 at 224x224 stayed near
2 ms from ratio 0 to 0.75 at batch 1 and 32: eager execution there is bound by kernel launches,
not MACs, so the latency objective, not MACs, tells whether pruning pays on such a GPU.

    python benchmarks/gpu_latency.py [--quick]
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
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_latency: no CUDA device here, skipped")
        return 0
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
                                      repeats=repeats, device="cuda")
                rows.append({"model": name, "ratio": ratio, "batch": batch, "macs": macs,
                             "median_ms": lat.median_ms, "p90_ms": lat.p90_ms})
    df = pd.DataFrame(rows)
    base = df[df["ratio"] == 0].set_index(["model", "batch"])
    df["macs_ratio"] = [r.macs / base.loc[(r.model, r.batch), "macs"] for r in df.itertuples()]
    df["speedup"] = [base.loc[(r.model, r.batch), "median_ms"] / r.median_ms
                     for r in df.itertuples()]
    print(save_table(df, "gpu_latency", args.out_dir,
                     f"GPU latency (torch eager, {torch.cuda.get_device_name(0)})",
                     f"median of {repeats} timed runs after {warmup} warm-up runs; "
                     "speedup = base median / median at the same batch"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
