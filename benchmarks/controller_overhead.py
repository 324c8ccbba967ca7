"""What does a controller cost per trial? Local Optuna (jobs 1 and 2) vs Ray Tune (concurrency
1 and 2) on this machine, for the same N cheap trials.

Every configuration runs ``run_search`` on one cheap space (resnet_tiny width 8 on digits, 4
fine-tune steps, a 3-run torch latency timing) with the random sampler, seed 0 and the default
uniform baselines, so each configuration proposes the same ratios. The base model is trained
once before anything is timed. Ray is started by autoprune (``address=None``: a fresh local Ray,
shut down at the end of each search) with ``cpus_per_trial=1``; its start-up is part of the wall
time, as a user pays it.

Per configuration with parallelism p (jobs or concurrency) and N trials:

* ``trial_s``: the sum of the trials' own ``duration_s`` (prune, measure, fine-tune, evaluate);
* ``overhead_per_trial_s = (wall_s - trial_s / p) / N``: wall time not spent inside a trial,
  per trial (start-up, proposing, recording in Optuna and MLflow, reports, process/actor
  plumbing);
* ``warm_overhead_per_trial_s = (wall_s - N * median_trial_s / p) / N``: the same with every
  trial costed at the median trial. The first trial in a fresh worker process or Ray actor is
  several times slower than the rest (cold code paths, lazy imports); this counts that as the
  controller's overhead, which it is, rather than as trial work. Parallel trials also slow
  each other down on 2 cores, which shows in ``median_trial_s``;
* ``first_done_s``: from the call to the first recorded trial (start-up plus one trial);
* ``speedup``: local jobs=1's wall time over this one's, within the same run.

With ``--repeats R`` the four configurations run R times, interleaved; medians are reported.
Writes ``runs/bench/controller_overhead.{md,csv}``; the studies stay in
``runs/bench/controller_overhead/`` (emptied first)::

    .venv/bin/python benchmarks/controller_overhead.py --quick
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from _common import DEFAULT_OUT, save_table

from autoprune.config import SpaceConfig, parse_space
from autoprune.report import trials_frame
from autoprune.search import run_search
from autoprune.study import load_study
from autoprune.trial import TrialContext

# (label, backend, parallelism): jobs for the local controller, concurrency for Ray
CONFIGS = (("local jobs=1", "local", 1), ("local jobs=2", "local", 2),
           ("ray concurrency=1", "ray", 1), ("ray concurrency=2", "ray", 2))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cheap_space(runs_dir: Path) -> SpaceConfig:
    """Trials of a fraction of a second, so that what is around them shows."""
    return parse_space({
        "name": "overhead",
        "model": {"source": "builtin:resnet_tiny", "input_shape": [1, 1, 8, 8],
                  "kwargs": {"width": 8, "blocks": 1}, "train": {"epochs": 2, "lr": 0.05}},
        "data": {"source": "builtin:digits", "batch_size": 64},
        "groups": {"default": {"low": 0.0, "high": 0.7, "step": 0.1}},
        "finetune": {"steps": 4, "bn_calibration_batches": 2},
        "objectives": ["accuracy", "macs"],
        "latency": {"runtime": "torch", "warmup": 1, "repeats": 3},
        "search": {"sampler": "random", "seed": 0},
        "runs_dir": str(runs_dir),
    })


def run_one(space: SpaceConfig, label: str, backend: str, parallel: int, trials: int,
            study: str) -> dict[str, Any]:
    ray_options = {"address": None, "concurrency": parallel, "cpus_per_trial": 1.0}
    t0 = time.time()
    run_search(space, study_name=study, trials=trials, jobs=parallel, backend=backend,
               ray_options=ray_options if backend == "ray" else None, quiet=True)
    wall = time.time() - t0
    st = load_study(study, space.storage_url)
    df = trials_frame(st)
    done = [t.datetime_complete.timestamp() for t in st.trials if t.datetime_complete]
    n, trial_s, median = len(df), float(df["duration_s"].sum()), float(df["duration_s"].median())
    return {"config": label, "backend": backend, "parallel": parallel, "trials": n,
            "failed": int((df["state"] == "failed").sum()), "wall_s": wall, "trial_s": trial_s,
            "mean_trial_s": trial_s / n, "median_trial_s": median,
            "overhead_per_trial_s": (wall - trial_s / parallel) / n,
            "warm_overhead_per_trial_s": (wall - n * median / parallel) / n,
            "first_done_s": min(done) - t0 if done else float("nan")}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="6 trials, one repeat")
    p.add_argument("--trials", type=int, help="trials per configuration (default 12)")
    p.add_argument("--repeats", type=int, help="interleaved rounds of all configurations "
                   "(default 2, quick 1)")
    p.add_argument("--configs", nargs="+", choices=[c[0] for c in CONFIGS],
                   default=[c[0] for c in CONFIGS])
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    trials = args.trials or (6 if args.quick else 12)
    repeats = args.repeats or (1 if args.quick else 2)
    configs = [c for c in CONFIGS if c[0] in args.configs]

    # The in-process controller (jobs=1) would otherwise use every core for one trial, while
    # worker processes and Ray actors get one thread each: one thread everywhere compares
    # controllers, not thread counts.
    torch.set_num_threads(1)
    work = args.out_dir / "controller_overhead"
    shutil.rmtree(work, ignore_errors=True)
    space = cheap_space(work)
    TrialContext.build(space)  # trains and caches the base model before anything is timed

    rows = []
    for rep in range(repeats):
        for label, backend, parallel in configs:
            study = f"{backend}-p{parallel}-r{rep}"
            rows.append(run_one(space, label, backend, parallel, trials, study) | {"repeat": rep})
            r = rows[-1]
            _log(f"{label} (round {rep}): wall {r['wall_s']:.1f} s, in trials "
                 f"{r['trial_s']:.1f} s, overhead {r['overhead_per_trial_s']:.2f} s/trial")
    raw = pd.DataFrame(rows)
    cols = ["wall_s", "trial_s", "mean_trial_s", "median_trial_s", "overhead_per_trial_s",
            "warm_overhead_per_trial_s", "first_done_s"]
    df = (raw.groupby(["config", "backend", "parallel"], sort=False)
          .agg(trials=("trials", "median"), failed=("failed", "sum"),
               **{c: (c, "median") for c in cols},
               wall_min_s=("wall_s", "min"), wall_max_s=("wall_s", "max"))
          .reset_index())
    df["trials"] = df["trials"].astype(int)
    first = df.loc[df["config"] == CONFIGS[0][0], "wall_s"]
    df["speedup"] = float(first.iloc[0]) / df["wall_s"] if not first.empty else float("nan")
    df.insert(len(df.columns), "repeats", repeats)

    notes = (f"{trials} trials per configuration; {repeats} interleaved round(s), medians "
             "shown (wall_min_s/wall_max_s: spread over rounds). Cheap space: resnet_tiny "
             "width 8, 1 block, on digits; 4 fine-tune steps; random sampler, seed 0, baselines "
             "0.25/0.5/0.75. One torch thread per trial; Ray: local Ray started per search "
             "(address None), cpus_per_trial 1, start-up and shutdown included. overhead per "
             "trial = (wall - sum of trial duration_s / parallelism) / trials; warm overhead "
             "costs every trial at the median trial (a fresh process's slow first trial counts "
             "as overhead); first_done_s: call to first recorded trial; speedup = local jobs=1 "
             "wall / wall, same run."
             + (" Quick run: few trials, expect noise." if args.quick else ""))
    md_cols = ["config", "trials", "failed", "wall_s", "wall_min_s", "wall_max_s",
               "mean_trial_s", "median_trial_s", "overhead_per_trial_s",
               "warm_overhead_per_trial_s", "first_done_s", "speedup"]
    text = save_table(df, "controller_overhead", args.out_dir,
                      "Controller overhead: local Optuna vs Ray Tune", notes, md_cols)
    print(text)
    _log(f"wrote {args.out_dir / 'controller_overhead.md'} and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
