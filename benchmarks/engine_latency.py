"""Does a MACs cut turn into a latency cut? Uniform pruning, measured on two runtimes.

For torchvision ResNet-18 and MobileNetV2 at 1x3x224x224 and the demo model (builtin
resnet_tiny, width 32, 2 blocks, at 1x1x8x8), every dependency group is pruned by the same ratio
(0.25 / 0.5 / 0.75; 0.0 is the base). Each model is timed with PyTorch eager and ONNX Runtime at
1 and 2 intra-op threads, batch 1, by :func:`autoprune.measure.measure_latency`.

``speedup`` is the base model's median latency over the pruned one's (same runtime and
threads); ``macs_speedup`` is ``1 / macs_ratio``, the speed-up MACs promise; ``efficiency`` is
their quotient.

Writes ``runs/bench/engine_latency.md`` and ``.csv``::

    .venv/bin/python benchmarks/engine_latency.py --quick
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from _common import DEFAULT_OUT, markdown_table, save_table
from torch import nn

from autoprune.groups import describe_groups
from autoprune.measure import count_cost, export_onnx, measure_latency
from autoprune.prune import prune_model
from autoprune.sources import build_model


@dataclass(frozen=True)
class Case:
    source: str
    input_shape: tuple[int, ...]
    num_classes: int | None = None
    kwargs: tuple[tuple[str, Any], ...] = ()


CASES = {
    "resnet18": Case("torchvision:resnet18", (1, 3, 224, 224)),
    "mobilenet_v2": Case("torchvision:mobilenet_v2", (1, 3, 224, 224)),
    "resnet_tiny": Case("builtin:resnet_tiny", (1, 1, 8, 8), 10, (("width", 32), ("blocks", 2))),
}
RATIOS = (0.0, 0.25, 0.5, 0.75)
RUNTIMES = ("torch", "onnxruntime")
THREADS = (1, 2)
MD_COLUMNS = ["model", "ratio", "macs_M", "macs_ratio", "params_ratio", "runtime", "threads",
              "median_ms", "p90_ms", "speedup", "macs_speedup", "efficiency"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _variants(case: Case, ratios: Sequence[float], importance: str,
              round_to: int) -> list[tuple[float, nn.Module]]:
    torch.manual_seed(0)
    base = build_model(case.source, case.input_shape, case.num_classes, dict(case.kwargs)).eval()
    example = torch.zeros(case.input_shape)
    names = [g.name for g in describe_groups(base, example)]
    out: list[tuple[float, nn.Module]] = []
    for ratio in ratios:
        if ratio == 0.0:
            out.append((ratio, base))
            continue
        pruned, _record = prune_model(base, example, dict.fromkeys(names, ratio), importance,
                                      round_to)
        out.append((ratio, pruned))
    return out


def run(models: Sequence[str], ratios: Sequence[float], warmup: int, repeats: int,
        importance: str = "l2", round_to: int = 1) -> pd.DataFrame:
    rows: list[dict[str, Any]] = []
    for name in models:
        case = CASES[name]
        t0 = time.perf_counter()
        variants = _variants(case, ratios, importance, round_to)
        _log(f"{name}: pruned {len(variants) - 1} variants in {time.perf_counter() - t0:.1f} s")
        base_cost = count_cost(variants[0][1], case.input_shape)
        with tempfile.TemporaryDirectory() as tmp:
            for ratio, model in variants:
                cost = count_cost(model, case.input_shape)
                onnx_path = export_onnx(model, case.input_shape, Path(tmp) / f"{ratio}.onnx")
                for runtime in RUNTIMES:
                    for threads in THREADS:
                        lat = measure_latency(
                            model, case.input_shape, runtime, threads, batch_size=1,
                            warmup=warmup, repeats=repeats,
                            onnx_path=onnx_path if runtime == "onnxruntime" else None)
                        rows.append({
                            "model": name, "input_shape": "x".join(map(str, case.input_shape)),
                            "ratio": ratio, "macs_M": cost.macs / 1e6,
                            "macs_ratio": cost.macs / base_cost.macs,
                            "params_ratio": cost.params / base_cost.params,
                            "runtime": runtime, "device": lat.device, "threads": threads,
                            "batch_size": lat.batch_size, "warmup": lat.warmup,
                            "repeats": lat.repeats, "median_ms": lat.median_ms,
                            "p90_ms": lat.p90_ms, "min_ms": lat.min_ms,
                        })
                _log(f"  ratio {ratio:.2f}: MACs x{cost.macs / base_cost.macs:.3f}, "
                     + ", ".join(f"{r['runtime']}/{r['threads']}t {r['median_ms']:.3f} ms"
                                 for r in rows[-len(RUNTIMES) * len(THREADS):]))
    df = pd.DataFrame(rows)
    base = df[df["ratio"] == 0.0].set_index(["model", "runtime", "threads"])["median_ms"]
    keys = pd.MultiIndex.from_frame(df[["model", "runtime", "threads"]])
    df["speedup"] = base.reindex(keys).to_numpy() / df["median_ms"]
    df["macs_speedup"] = 1.0 / df["macs_ratio"]
    df["efficiency"] = df["speedup"] / df["macs_speedup"]
    return df


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats (3 warmup, 15 timed)")
    p.add_argument("--warmup", type=int, help="untimed runs (default 10, quick 3)")
    p.add_argument("--repeats", type=int, help="timed runs (default 50, quick 15)")
    p.add_argument("--models", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--importance", default="l2")
    p.add_argument("--round-to", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else (3 if args.quick else 10)
    repeats = args.repeats if args.repeats is not None else (15 if args.quick else 50)

    torch.set_num_threads(1)  # pruning and export; measure_latency sets its own thread count
    df = run(args.models, RATIOS, warmup, repeats, args.importance, args.round_to)
    notes = (f"Uniform ratio over every dependency group ({args.importance} importance, "
             f"round_to {args.round_to}); batch 1, CPU; each latency is the median (and p90) of "
             f"{repeats} timed runs after {warmup} warm-up runs. speedup = base median / median "
             "(same runtime and threads); macs_speedup = 1 / macs_ratio; efficiency = speedup / "
             "macs_speedup." + (" Quick run: few repeats, expect noise." if args.quick else ""))
    save_table(df, "engine_latency", args.out_dir,
               "Engine latency: MACs ratio vs measured speed-up", notes, MD_COLUMNS)
    print(markdown_table(df[MD_COLUMNS]))
    _log(f"wrote {args.out_dir / 'engine_latency.md'} and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
