"""Per-group sensitivity: prune one group at a few ratios, recalibrate BN, evaluate.

The scan is cached under ``runs/sensitivity/`` by a hash of the base checkpoint, the data and the
pruning settings. Its curves seed the search (MetaPruner/AMC-style allocation): at each MACs
budget, pruning goes first to the groups that lose the least accuracy per MAC removed.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from optuna.distributions import FloatDistribution

from autoprune.base import code_digest, ignoring
from autoprune.config import config_hash
from autoprune.groups import GroupInfo
from autoprune.locks import exclusive, replacing
from autoprune.prune import ROUNDING_RULE

if TYPE_CHECKING:
    from autoprune.trial import TrialContext


@dataclass
class Sensitivity:
    """``accuracy[i][j]``: accuracy with only ``groups[i]`` pruned at ``ratios[j]`` (after
    adaptive BN, no fine-tuning)."""

    groups: list[str]
    ratios: list[float]
    accuracy: list[list[float]]
    base_accuracy: float

    def curve(self, group: str) -> tuple[np.ndarray, np.ndarray]:
        i = self.groups.index(group)
        return (np.array([0.0, *self.ratios]),
                np.array([self.base_accuracy, *self.accuracy[i]]))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scan(ctx: TrialContext, ratios: Sequence[float], progress: bool = False,
         done: Mapping[str, list[float]] | None = None,
         save: Callable[[dict[str, list[float]]], None] | None = None) -> Sensitivity:
    """Prune each searchable group alone at each ratio and measure the proxy accuracy.

    Args:
        progress: a bar on stderr counting the (group, ratio) pairs, with the group being
            scanned (minutes on a large model: 12 groups x 2 ratios took 6 on 2 cores).
        done: rows of groups already scanned (an interrupted scan's), not scanned again.
        save: called with every row so far after each group, to keep them if interrupted.
    """
    from tqdm import tqdm

    from autoprune.base import seed_everything
    from autoprune.finetune import adaptive_bn, class_loss
    from autoprune.measure import evaluate
    from autoprune.prune import prune_model

    space, dev = ctx.space, ctx.device
    p = space.pruning
    grad = list(ctx.data.calibration_batches(p.taylor_batches)) if p.importance == "taylor" \
        else None
    rows: dict[str, list[float]] = {}
    done = {g: list(r) for g, r in (done or {}).items() if len(r) == len(ratios)}
    # a bar on a terminal; a line per group where output goes to a file or a pipe
    lines = progress and not sys.stderr.isatty()
    bar = tqdm(total=len(ctx.groups) * len(ratios), desc="sensitivity", unit="prune",
               file=sys.stderr, disable=not progress or lines, leave=False,
               initial=sum(g.name in done for g in ctx.groups) * len(ratios))
    for i, g in enumerate(ctx.groups, 1):
        if g.name in done:
            rows[g.name] = done[g.name]
            continue
        row: list[float] = []
        bar.set_postfix_str(g.name, refresh=False)
        for r in ratios:
            bar.update()
            seed_everything(space.search.seed)
            try:
                model, _rec = prune_model(ctx.base_model, ctx.example_inputs, {g.name: r},
                                          p.importance, p.round_to, space.groups.ignore, grad,
                                          class_loss(space.data.ignore_index))
            except Exception as e:  # noqa: BLE001 - one group's failure must not stop the scan
                warnings.warn(f"sensitivity: pruning group {g.name} at ratio {r} failed "
                              f"({type(e).__name__}: {e}); scored 0, so the warm start prunes "
                              "it last (trials that prune it that far will fail too)",
                              stacklevel=2)
                row.append(0.0)
                continue
            model.to(dev)
            adaptive_bn(model, ctx.data.train, space.finetune.bn_calibration_batches, dev)
            row.append(evaluate(model, ctx.data.val, dev, ctx.evaluate_fn))
        rows[g.name] = row
        if lines:
            print(f"autoprune: sensitivity {i}/{len(ctx.groups)} {g.name}: "
                  + ", ".join(f"ratio {r:g} -> {a:.4f}" for r, a in zip(ratios, row, strict=True)),
                  file=sys.stderr, flush=True)
        if save is not None:
            save(rows)
    bar.close()
    return Sensitivity([g.name for g in ctx.groups], list(ratios), list(rows.values()),
                       ctx.base.accuracy)


def cache_path(ctx: TrialContext, ratios: Sequence[float]) -> Path:
    s = ctx.space
    # Everything the scan's accuracies depend on: the batches (adaptive BN, evaluation), the
    # evaluate function, and the code of a user's module:function sources.
    code = [d for d in map(code_digest, (s.model.source, s.data.source, s.data.evaluate or ""))
            if d]
    key = config_hash(s.model.source, s.model.kwargs, s.model.input_shape,
                      ctx.base.checkpoint_sha256, s.data.source, s.data.kwargs, s.data.seed,
                      s.data.batch_size, s.data.eval_batch_size, s.data.evaluate,
                      s.pruning, s.groups.ignore, s.finetune.bn_calibration_batches,
                      list(ratios), [g.name for g in ctx.groups], *code, *ignoring(s),
                      ROUNDING_RULE)
    return Path(s.runs_dir) / "sensitivity" / f"{s.name}-{key}.json"


def cached_scan(ctx: TrialContext, ratios: Sequence[float] | None = None,
                progress: bool = False,
                log: Callable[[str], None] | None = None) -> tuple[Sensitivity, bool]:
    """The scan, from the cache when the same model, data and settings were scanned before
    (``progress``: see :func:`scan`; ``log`` is told when a scan starts, not when the cache
    serves it: every resume said a scan was starting).

    Returns:
        The sensitivity and whether it came from the cache.
    """
    ratios = list(ratios or ctx.space.search.warm_start.ratios)
    path = cache_path(ctx, ratios)
    with exclusive(path.with_suffix(".lock")):  # a search started alongside waits, then reuses
        if path.exists():
            return Sensitivity(**json.loads(path.read_text())), True
        # the groups an interrupted scan finished (minutes each on a large model) are kept
        partial = path.with_suffix(".partial.json")
        done = json.loads(partial.read_text()) if partial.exists() else None
        if log is not None:
            log("autoprune: sensitivity scan (one group at a time) for the warm start")
        sens = scan(ctx, ratios, progress, done, lambda rows: _write(partial, rows))
        _write(path, sens.to_dict())
        partial.unlink(missing_ok=True)
        return sens, False


def _write(path: Path, data: Any) -> None:
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(data))


def estimate_macs_ratio(groups: Sequence[GroupInfo], ratios: Mapping[str, float]) -> float:
    """MACs ratio predicted from each layer's MACs share: a layer keeps the product of
    ``(1 - r)`` over the groups that prune its input or output channels."""
    keep: dict[str, float] = {}
    share: dict[str, float] = {}
    for g in groups:
        r = ratios.get(g.name, 0.0)
        for layer, m in zip(g.members, g.member_macs, strict=False):
            keep[layer] = keep.get(layer, 1.0) * (1.0 - r)
            share[layer] = m
    return float(1.0 - sum(share[n] * (1.0 - keep[n]) for n in share))


def allocate(sens: Sensitivity, groups: Sequence[GroupInfo], budget: float,
             dists: Mapping[str, FloatDistribution],
             measure: Callable[[Mapping[str, float]], float] | None = None,
             floor: Mapping[str, float] | None = None) -> dict[str, float]:
    """Greedy allocation for a MACs budget: repeatedly raise the ratio of the group that loses
    the least (interpolated) accuracy per MAC removed, until the estimate meets ``budget``;
    then, with ``measure`` (ratios -> counted MACs ratio), go on until the counted MACs meet it
    too (the estimate ignores ``round_to`` and layers no group prunes, so it runs low). A
    budget the space cannot reach (0, say) gives its cheapest config: every group at its upper
    bound. ``floor`` (a dearer budget's allocation) is where the greedy starts, and no ratio
    goes below it: the allocation then prunes everything the floor prunes."""
    ratios = {n: max(d.low, (floor or {}).get(n, d.low)) for n, d in dists.items()}
    low = dict(ratios)
    by_name = {g.name: g for g in groups}
    active = [by_name[n] for n in dists if n in by_name]
    for over in (lambda: estimate_macs_ratio(active, ratios) > budget,
                 lambda: measure is not None and measure(ratios) > budget):
        while over():
            best = _cheapest_step(sens, active, ratios, dists)
            if best is None:
                return ratios
            ratios[best] = round(ratios[best] + (dists[best].step or 0.05), 10)
    if measure is not None:
        _refill(sens, active, ratios, dists, budget, measure, low)
    return ratios


def _refill(sens: Sensitivity, active: Sequence[GroupInfo], ratios: dict[str, float],
            dists: Mapping[str, FloatDistribution], budget: float,
            measure: Callable[[Mapping[str, float]], float],
            low: Mapping[str, float]) -> None:
    """Spend what the last steps left under the budget: ``round_to`` makes a step remove more
    MACs than it needs (budget 0.16 had landed at 0.13 on resnet8). Take back, one step at a
    time, the step that regains the most accuracy per MAC added while the counted MACs stay
    within the budget; a group whose step back would overshoot, or go below ``low``, is left
    as it is."""
    frozen: set[str] = set()
    for _ in range(4 * len(dists)):  # each try either lowers a ratio or freezes a group
        best, best_key = None, (-np.inf, 0.0)
        current = estimate_macs_ratio(active, ratios)
        for name, d in dists.items():
            step = d.step or 0.05
            prev = round(ratios[name] - step, 10)
            if name in frozen or prev < low[name] - 1e-9 or name not in sens.groups:
                continue
            gain = max(_drop(sens, name, prev, ratios[name]), 0.0)
            added = estimate_macs_ratio(active, {**ratios, name: prev}) - current
            key = (gain / added if added > 0 else np.inf, -max(added, 0.0))
            if key > best_key:
                best, best_key = name, key
        if best is None:
            return
        trial = {**ratios, best: round(ratios[best] - (dists[best].step or 0.05), 10)}
        if measure(trial) <= budget:
            ratios.update(trial)
        else:
            frozen.add(best)


def _drop(sens: Sensitivity, group: str, lo: float, hi: float) -> float:
    """Accuracy the group's scan curve loses from ratio ``lo`` to ``hi`` (interpolated; past
    the scanned range the curve keeps falling at its last slope)."""
    xs, ys = sens.curve(group)
    drop = float(np.interp(lo, xs, ys) - np.interp(hi, xs, ys))
    if hi > xs[-1]:
        slope = (ys[-2] - ys[-1]) / max(xs[-1] - xs[-2], 1e-9)
        drop = max(drop, slope * (hi - max(lo, xs[-1])))
    return drop


def _cheapest_step(sens: Sensitivity, active: Sequence[GroupInfo], ratios: Mapping[str, float],
                   dists: Mapping[str, FloatDistribution]) -> str | None:
    """The group whose next ratio step loses the least accuracy per MAC removed (None when no
    group can go further)."""
    best, best_key = None, (np.inf, 0.0)
    current = estimate_macs_ratio(active, ratios)
    for name, d in dists.items():
        step = d.step or 0.05
        nxt = ratios[name] + step
        if nxt > d.high + 1e-9 or name not in sens.groups:
            continue
        drop = _drop(sens, name, ratios[name], nxt)
        saved = current - estimate_macs_ratio(active, {**ratios, name: nxt})
        if saved <= 0:
            continue
        # a noise-level drop (below one validation sample in 1,000) ties at 0: then the
        # group that removes the most MACs per step goes first
        key = (max(drop, 0.0) / saved if drop > 1e-3 else 0.0, -saved)
        if key < best_key:
            best, best_key = name, key
    return best


def cached_warm_start(ctx: TrialContext, sens: Sensitivity,
                      dists: Mapping[str, FloatDistribution]) -> tuple[
        dict[float, dict[str, float]], dict[float, float], bool]:
    """The warm start's configs (one per ``search.warm_start.budgets``, see
    :func:`autoprune.study.warm_start_configs`) and their counted MACs ratios, cached next to
    the scan: meeting each budget in counted MACs takes a prune-and-count pass per step (10-18
    s per budget on resnet18 at 224).

    Returns:
        Configs by budget, their MACs ratios by budget, and whether they came from the cache.
    """
    from autoprune.study import warm_start_configs

    s = ctx.space
    key = config_hash(sorted((n, d.low, d.high, d.step) for n, d in dists.items()),
                      sorted(s.search.warm_start.budgets), s.constraints.max_macs_ratio,
                      s.search.inherit)
    scan_file = cache_path(ctx, sens.ratios)
    path = scan_file.with_name(f"{scan_file.stem}-seeds-{key}.json")
    if path.exists():
        stored = json.loads(path.read_text())
        return ({float(b): c for b, c in stored["configs"].items()},
                {float(b): m for b, m in stored["macs_ratio"].items()}, True)
    count = macs_counter(ctx)
    configs = warm_start_configs(s, dists, ctx.groups, sens, count)
    macs = {b: count(c) for b, c in configs.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, {"configs": configs, "macs_ratio": macs})
    return configs, macs, False


def macs_counter(ctx: TrialContext) -> Callable[[Mapping[str, float]], float]:
    """``ratios -> MACs ratio`` counted on the pruned model, as a trial counts it (channel
    counts do not depend on the importance, so the cheap L2 one stands in)."""
    from autoprune.measure import count_cost
    from autoprune.prune import prune_model

    p, shape = ctx.space.pruning, ctx.space.model.input_shape
    counted: dict[tuple[tuple[str, float], ...], float] = {}  # the allocation revisits configs

    def macs(ratios: Mapping[str, float]) -> float:
        key = tuple(sorted(ratios.items()))
        if key not in counted:
            model, _rec = prune_model(ctx.base_model, ctx.example_inputs, ratios, "l2",
                                      p.round_to, ctx.space.groups.ignore)
            counted[key] = count_cost(model, shape, ctx.space.model.input_dtype).macs \
                / ctx.base.macs
        return counted[key]

    return macs


def plot_heatmap(sens: Sensitivity, path: Path) -> Path:
    """Group x ratio heatmap of the accuracy drop from the base model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drop = sens.base_accuracy - np.array(sens.accuracy)
    fig, ax = plt.subplots(figsize=(3.5 + 0.9 * len(sens.ratios),
                                    1.2 + 0.32 * len(sens.groups)))
    im = ax.imshow(drop, aspect="auto", cmap="Reds", vmin=0)
    ax.set_xticks(range(len(sens.ratios)), [f"{r:.2f}" for r in sens.ratios])
    ax.set_yticks(range(len(sens.groups)), sens.groups, fontsize=7)
    ax.set_xlabel("pruning ratio of this group alone")
    for i in range(len(sens.groups)):
        for j in range(len(sens.ratios)):
            ax.text(j, i, f"{drop[i, j]:.3f}", ha="center", va="center", fontsize=6)
    ax.set_title("accuracy drop (adaptive BN, no fine-tune)", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
