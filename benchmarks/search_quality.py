"""Does the search beat uniform pruning? Uniform grid vs random search vs autoprune (NSGA-II).

On the demo task (``search_spaces/digits_resnet.yaml``: builtin resnet_tiny on scikit-learn
digits) with objectives [accuracy, macs], every method gets the same number of trials and the
same fine-tune budget per trial (multi-fidelity, where the demo turns it on, may stop a poor
trial before its budget is spent):

* ``uniform``: one ratio for every dependency group, at ``trials`` levels evenly spaced over
  0.1..0.8, each through :func:`autoprune.trial.run_trial` on one shared ``TrialContext``
  (a true uniform ratio: ``layer3.*`` is not clipped to its search range 0.2..0.9);
* ``random``: ``run_search`` with ``search.sampler: random`` and no baselines, warm start or
  early stopping (pure random);
* ``nsga2``: ``run_search`` with the demo space's search settings, as a user gets them (NSGA-II,
  uniform baselines queued first, and whatever multi-fidelity / sensitivity warm start the demo
  file turns on; the table's notes say which).

Per method and seed: the hypervolume of (accuracy, MACs ratio) over the feasible completed
trials with reference point (accuracy 0, MACs ratio 1.0), the best accuracy at MACs ratio
<= 0.3 / 0.5 / 0.7, the fine-tune steps spent (multi-fidelity stops poor trials early:
``pruned`` trials hold no final accuracy and are left out) and the wall time. The seed sets
``search.seed``, which seeds the base model's init and training (all three methods of a seed
share one base checkpoint), the sampler and every trial. Medians and min-max over seeds are
reported.

Writes ``runs/bench/search_quality.{md,csv}`` (per method), ``search_quality_seeds.{md,csv}``
(per seed) and ``search_quality.png`` (the fronts); the studies themselves stay in
``runs/bench/search_quality/`` (emptied first)::

    .venv/bin/python benchmarks/search_quality.py --quick
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from _common import DEFAULT_OUT, REPO_ROOT, markdown_table, save_table

from autoprune.config import SpaceConfig, parse_space
from autoprune.pareto import accuracy_at_cost, hypervolume_2d, pareto_mask
from autoprune.report import trials_frame
from autoprune.search import run_search
from autoprune.study import load_study
from autoprune.trial import TrialContext, run_trial

DEMO_SPACE = REPO_ROOT / "search_spaces" / "digits_resnet.yaml"
METHODS = ("uniform", "random", "nsga2")
BUDGETS = (0.3, 0.5, 0.7)  # MACs ratios at which accuracies are compared
REF_ACCURACY, REF_MACS = 0.0, 1.0
LEVELS = (0.1, 0.8)  # the uniform grid's range


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def demo_space(runs_dir: Path, seed: int, finetune_epochs: float, base_epochs: int,
               pure_random: bool = False) -> SpaceConfig:
    """The demo space with two objectives and the given budgets; ``pure_random`` swaps its
    search for random sampling with no baselines, warm start or early stopping."""
    data: dict[str, Any] = copy.deepcopy(yaml.safe_load(DEMO_SPACE.read_text()))
    data["runs_dir"] = str(runs_dir)
    data["objectives"] = ["accuracy", "macs"]  # a 2-D front, so hypervolume is exact and plain
    data["model"]["train"]["epochs"] = base_epochs
    data["finetune"]["epochs"] = finetune_epochs
    # Latency is measured in every trial but is no objective here: a short timing saves wall
    # time and changes nothing that is compared.
    data["latency"].update(warmup=2, repeats=5)
    data["search"]["seed"] = seed
    if pure_random:
        data["search"].update(sampler="random", baselines=[], fidelity={"enabled": False},
                              warm_start={"sensitivity": False})
    return parse_space(data, base_dir=REPO_ROOT)


def points(df: pd.DataFrame) -> pd.DataFrame:
    """Feasible completed trials: the only ones a user could pick."""
    return df.loc[df["state"] == "complete", ["accuracy", "macs_ratio"]].astype(float)


def scores(pts: pd.DataFrame) -> dict[str, float]:
    acc, macs = pts["accuracy"].to_numpy(), pts["macs_ratio"].to_numpy()
    out = {"hypervolume": hypervolume_2d(acc, macs, REF_ACCURACY, REF_MACS)}
    out |= {f"acc@{b}": accuracy_at_cost(acc, macs, b) for b in BUDGETS}
    return out


def run_uniform(ctx: TrialContext, trials: int) -> pd.DataFrame:
    levels = np.round(np.linspace(*LEVELS, trials), 4)
    rows = []
    for level in levels:
        r = run_trial(ctx, dict.fromkeys((g.name for g in ctx.groups), float(level)))
        rows.append({"state": r.state, "accuracy": r.accuracy, "macs_ratio": r.macs_ratio,
                     "finetune_steps": r.finetune_steps})
    return pd.DataFrame(rows)


def run_seed(work: Path, seed: int, trials: int, finetune_epochs: float,
             base_epochs: int) -> tuple[list[dict[str, Any]], dict[str, pd.DataFrame]]:
    space = demo_space(work, seed, finetune_epochs, base_epochs)
    ctx = TrialContext.build(space)  # trains (and caches) this seed's base model, untimed
    _log(f"seed {seed}: base accuracy {ctx.base.accuracy:.4f}")
    rows, fronts = [], {}
    for method in METHODS:
        t0 = time.perf_counter()
        if method == "uniform":
            df = run_uniform(ctx, trials)
        else:
            s = space if method == "nsga2" else demo_space(
                work, seed, finetune_epochs, base_epochs, pure_random=True)
            summary = run_search(s, study_name=f"{method}-s{seed}", trials=trials, quiet=True)
            df = trials_frame(load_study(summary.study, s.storage_url))
        wall = time.perf_counter() - t0
        pts = points(df)
        fronts[method] = pts
        rows.append({"method": method, "seed": seed, "base_accuracy": ctx.base.accuracy,
                     "trials": len(df), "feasible": len(pts),
                     "pruned": int((df["state"] == "pruned").sum()),
                     "finetune_steps": int(df["finetune_steps"].fillna(0).sum()),
                     **scores(pts), "wall_s": wall})
        _log(f"  {method}: " + ", ".join(f"{k} {v:.4f}" for k, v in rows[-1].items()
                                         if isinstance(v, float)))
    return rows, fronts


def spread(values: pd.Series, fmt: str = ".4f") -> str:
    """``median [min-max]`` over seeds; seeds without a value are counted, not guessed."""
    v = values.dropna()
    if v.empty:
        return "n/a"
    text = f"{v.median():{fmt}} [{v.min():{fmt}}-{v.max():{fmt}}]"
    return text + (f" ({len(v)}/{len(values)} seeds)" if len(v) < len(values) else "")


def summarise(per_seed: pd.DataFrame) -> pd.DataFrame:
    rows = []
    metrics = ["hypervolume", *(f"acc@{b}" for b in BUDGETS), "finetune_steps", "wall_s"]
    for method in METHODS:
        d = per_seed[per_seed["method"] == method]
        row: dict[str, Any] = {"method": method, "seeds": len(d),
                               "trials": int(d["trials"].median()),
                               "feasible": f"{d['feasible'].median():.0f}",
                               "pruned": f"{d['pruned'].median():.0f}"}
        for m in metrics:
            row[m] = spread(d[m], {"wall_s": ".1f", "finetune_steps": ".0f"}.get(m, ".4f"))
            row |= {f"{m}_median": d[m].median(), f"{m}_min": d[m].min(),
                    f"{m}_max": d[m].max()}
        rows.append(row)
    return pd.DataFrame(rows)


def plot(fronts: dict[int, dict[str, pd.DataFrame]], base_acc: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"uniform": "#2e6fdb", "random": "#555555", "nsga2": "#bf1d2d"}
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (seed, by_method) in enumerate(sorted(fronts.items())):
        for method, pts in by_method.items():
            if pts.empty:
                continue
            ax.scatter(pts["macs_ratio"], pts["accuracy"], s=10, alpha=0.35, c=colors[method])
            front = pts[pareto_mask(pts.to_numpy(), ["maximize", "minimize"])]
            front = front.sort_values("macs_ratio")
            ax.step(front["macs_ratio"], front["accuracy"], where="post", c=colors[method],
                    ls=styles[i % len(styles)], label=f"{method}, seed {seed}")
    ax.scatter([1.0], [base_acc], marker="*", s=160, c="k", label="base model (first seed)")
    for b in BUDGETS:
        ax.axvline(b, c="k", alpha=0.15, lw=0.8)
    ax.set_xlabel("MACs ratio (pruned / base)")
    ax.set_ylabel("accuracy (validation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def describe_search(space: SpaceConfig) -> str:
    s = space.search
    fid, warm = s.fidelity, s.warm_start
    return (f"{s.sampler}, population {s.population_size}, baselines "
            f"{'/'.join(f'{b:g}' for b in s.baselines) or 'none'}, multi-fidelity "
            + (f"on (rungs {list(fid.rungs)}, eta {fid.eta:g}, min_trials {fid.min_trials}, "
               f"proxy rung {fid.proxy_rung})" if fid.enabled else "off")
            + ", sensitivity warm start "
            + (f"on (ratios {list(warm.ratios)}, budgets {list(warm.budgets)})"
               if warm.sensitivity else "off"))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="8 trials, 2 seeds, 1 fine-tune epoch, 5 base-train epochs")
    p.add_argument("--trials", type=int, help="trials per method and seed (default 24)")
    p.add_argument("--seeds", type=int, nargs="+", help="search seeds (default 0 1 2)")
    p.add_argument("--finetune-epochs", type=float, help="fine-tune epochs per trial (default 2, "
                   "as the demo)")
    p.add_argument("--base-epochs", type=int, help="base-model training epochs (default 15)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    trials = args.trials or (8 if args.quick else 24)
    seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    ft_epochs = args.finetune_epochs or (1.0 if args.quick else 2.0)
    base_epochs = args.base_epochs or (5 if args.quick else 15)

    # Tiny models run fastest on one thread, and one thread is less disturbed by other load.
    torch.set_num_threads(1)
    work = args.out_dir / "search_quality"
    shutil.rmtree(work, ignore_errors=True)
    rows: list[dict[str, Any]] = []
    fronts: dict[int, dict[str, pd.DataFrame]] = {}
    for seed in seeds:
        seed_rows, fronts[seed] = run_seed(work, seed, trials, ft_epochs, base_epochs)
        rows += seed_rows
    per_seed = pd.DataFrame(rows)
    summary = summarise(per_seed)

    notes = (
        f"Demo task (digits-resnet: resnet_tiny width 16 on sklearn digits), objectives "
        f"[accuracy, macs], constraint max_macs_ratio 0.8 as in the demo (infeasible trials "
        f"are left out). Budgets: {trials} trials per method and seed; fine-tune "
        f"{ft_epochs:g} epoch(s) per trial; base model trained {base_epochs} epochs per seed. "
        f"Seeds {seeds}. Hypervolume of (accuracy, MACs ratio) over the feasible completed "
        f"trials, reference point (accuracy {REF_ACCURACY:.1f}, MACs ratio {REF_MACS:.1f}); "
        f"acc@B = best accuracy with MACs ratio <= B. Cells: median [min-max] over seeds. "
        f"uniform = one ratio for all groups at {trials} levels in {LEVELS[0]}..{LEVELS[1]}; "
        "random = random sampler, no baselines, no warm start, no early stopping; nsga2 = "
        f"the demo file's search settings ({describe_search(demo_space(work, 0, 1, 1))}). "
        "finetune_steps: total over a seed's trials (pruned trials stopped early; only "
        "complete trials count as points). Wall time: uniform times its trials only; "
        "random and nsga2 time run_search (base re-measure, warm-start scan, Optuna, MLflow, "
        "reports). "
        "One torch thread, trials one at a time."
        + (" Quick run: tiny budgets, expect noise." if args.quick else ""))
    md_cols = ["method", "seeds", "trials", "feasible", "pruned", "hypervolume",
               *(f"acc@{b}" for b in BUDGETS), "finetune_steps", "wall_s"]
    text = save_table(summary, "search_quality", args.out_dir,
                      "Search quality: uniform vs random vs NSGA-II at equal budgets", notes,
                      md_cols)
    save_table(per_seed, "search_quality_seeds", args.out_dir,
               "Search quality, per seed", notes)
    plot(fronts, float(per_seed["base_accuracy"].iloc[0]), args.out_dir / "search_quality.png")
    print(text)
    print(markdown_table(per_seed, ".4f"))
    _log(f"wrote {args.out_dir / 'search_quality.md'}, .csv, search_quality_seeds.md/.csv "
         "and search_quality.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
