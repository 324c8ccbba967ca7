"""How well does each rung predict the final accuracy? The numbers behind the fidelity defaults.

Random configs of a task from ``search_efficiency`` (every group 0..0.8, step 0.05) are pruned
and fine-tuned for the task's full budget. Along the way each is measured the way the rungs
measure it: the adaptive-BN proxy before fine-tuning, then the accuracy after 1/9 and 1/3 of
the budget, both as the model stands (``plain``) and on a copy with BatchNorm statistics
re-estimated first (``recal``, what the rungs use). For each measure, against the final
accuracy: Kendall tau, and the partial Spearman correlation given the MACs ratio (what the
measure knows beyond the cost: what a rung needs to stop the right trials). The trust gate of
``search.fidelity`` uses the same partial correlation, against the last rung.

Writes ``runs/bench/rung_fidelity.{md,csv}`` and the per-config measurements
``rung_fidelity_configs.csv``::

    .venv/bin/python benchmarks/rung_fidelity.py            # mnist5k, 20 configs, ~4 min
    .venv/bin/python benchmarks/rung_fidelity.py --quick    # digits, 8 configs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from _common import DEFAULT_OUT, save_table
from scipy.stats import kendalltau
from search_efficiency import TASKS, task_space

from autoprune.base import seed_everything
from autoprune.fidelity import partial_spearman, rung_steps
from autoprune.finetune import adaptive_bn, finetuner
from autoprune.measure import count_cost, evaluate
from autoprune.prune import prune_model
from autoprune.trial import TrialContext, rung_accuracy

FRACTIONS = (1 / 9, 1 / 3)
LAST = f"recal@{FRACTIONS[-1]:.2f}"  # the last rung, as the trust gate measures it


def measure(ctx: TrialContext, ratios: dict[str, float], seed: int) -> dict[str, float]:
    space, dev = ctx.space, ctx.device
    p = space.pruning
    seed_everything(seed)
    model, _ = prune_model(ctx.base_model, ctx.example_inputs, ratios, p.importance, p.round_to,
                           space.groups.ignore, None)
    row = {"macs_ratio": count_cost(model, space.model.input_shape).macs / ctx.base.macs}
    seed_everything(seed)
    adaptive_bn(model, ctx.data.train, space.finetune.bn_calibration_batches, dev)
    row["proxy"] = evaluate(model, ctx.data.val, dev)
    seed_everything(seed)
    trainer = finetuner(model, ctx.data.train, space.finetune, dev)
    for frac, step in zip(FRACTIONS, rung_steps(trainer.total, FRACTIONS), strict=True):
        trainer.advance(step)
        with torch.random.fork_rng(devices=[]):
            row[f"plain@{frac:.2f}"] = evaluate(model, ctx.data.val, dev)
        row[f"recal@{frac:.2f}"] = rung_accuracy(model, ctx)  # what a rung measures
    trainer.advance(trainer.total)
    row["final"] = evaluate(model, ctx.data.val, dev)
    return row


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for col in [c for c in df.columns if c not in ("config", "macs_ratio", "final")]:
        rows.append({"measure": col,
                     "min": df[col].min(), "max": df[col].max(),
                     "kendall_tau_vs_final": float(kendalltau(df[col], df["final"]).statistic),
                     "partial_rho_vs_final_given_macs": partial_spearman(
                         df[col], df["final"], df["macs_ratio"]),
                     # what the trust gate sees: the last rung stands in for the final accuracy
                     f"partial_rho_vs_{LAST}_given_macs": partial_spearman(
                         df[col], df[LAST], df["macs_ratio"]) if col != LAST else 1.0})
    return pd.DataFrame(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="digits, 8 configs")
    p.add_argument("--task", choices=list(TASKS), help="default mnist5k (quick: digits)")
    p.add_argument("--configs", type=int, help="random configs (default 20, quick 8)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    key = args.task or ("digits" if args.quick else "mnist5k")
    n = args.configs or (8 if args.quick else 20)
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rung_fidelity-") as tmp:
        ctx = TrialContext.build(task_space(TASKS[key], Path(tmp), 0))
        levels = np.round(np.arange(0.0, 0.8001, 0.05), 2)
        for i in range(n):
            ratios = {g.name: float(rng.choice(levels)) for g in ctx.groups}
            rows.append({"config": i, **measure(ctx, ratios, args.seed)})
            print(f"config {i}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items()
                                             if k != "config"), file=sys.stderr, flush=True)
    df = pd.DataFrame(rows)
    table = summarise(df)
    task = TASKS[key]
    notes = (f"{task.name}: {n} random configs (every group 0..0.8, step 0.05, seed "
             f"{args.seed}), fine-tune {task.finetune_steps} steps; rungs after "
             f"{'/'.join(f'{f:.2f}' for f in FRACTIONS)} of the budget; plain: the model as it "
             "stands; recal: a copy after adaptive BN "
             f"({task_space(task, Path('.'), 0).finetune.bn_calibration_batches} batches). "
             "partial_rho: Spearman correlation with the final accuracy given the MACs ratio.")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out_dir / "rung_fidelity_configs.csv", index=False)
    print(save_table(table, "rung_fidelity", args.out_dir,
                     "Rung fidelity: how well each early measure predicts the final accuracy",
                     notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
