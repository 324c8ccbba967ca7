"""One trial: the single function every controller (Optuna local, Ray Tune) calls.

prune -> MACs/params/latency -> constraints (infeasible: stop, no fine-tune) -> adaptive BN
(proxy accuracy) -> brief fine-tune -> evaluate -> objectives.
"""

from __future__ import annotations

import copy
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from autoprune.base import (
    BaseMetrics,
    base_checkpoint,
    load_sources,
    middle_latency,
    resolve_device,
    seed_everything,
)
from autoprune.config import SpaceConfig
from autoprune.errors import out_of_memory
from autoprune.fidelity import Promote, Promoter, numbered_rungs
from autoprune.finetune import TrainLog, adaptive_bn, class_loss, finetuner
from autoprune.groups import GroupInfo, describe_groups
from autoprune.measure import (
    check_threads,
    count_cost,
    evaluate,
    example_input,
    latency_device,
)
from autoprune.prune import failing_groups, prune_model
from autoprune.sources import DataBundle, load_checkpoint
from autoprune.sources._models import cpu_state, load_state_dict_strict

if TYPE_CHECKING:
    from autoprune.dedup import Reuse
    from autoprune.inherit import Inherit

TrialState = Literal["complete", "infeasible", "pruned", "failed"]

# Optuna study directions for each objective, and the TrialResult field that holds its value.
OBJECTIVES: dict[str, tuple[Literal["minimize", "maximize"], str]] = {
    "accuracy": ("maximize", "accuracy"),
    "macs": ("minimize", "macs_ratio"),
    "latency": ("minimize", "latency_ms"),
    "params": ("minimize", "params_ratio"),
}


@dataclass
class TrialContext:
    """What every trial of a search shares: the space, the base model, the data."""

    space: SpaceConfig
    base_model: nn.Module
    data: DataBundle
    base: BaseMetrics
    groups: list[GroupInfo]
    device: torch.device
    evaluate_fn: Any = None

    @property
    def example_inputs(self) -> torch.Tensor:
        return example_input(self.space.model.input_shape, self.space.model.input_dtype)

    @classmethod
    def build(cls, space: SpaceConfig, base: BaseMetrics | None = None,
              device: str | None = None,
              base_state: dict[str, torch.Tensor] | None = None,
              check: Callable[[TrialContext], None] | None = None) -> TrialContext:
        """Load sources and the base checkpoint (training it once if needed), measure the base.

        Args:
            space: the validated search space.
            base: base metrics measured earlier (workers get them from the controller).
            device: overrides ``search.device``.
            base_state: the base weights themselves, for workers on machines that cannot read
                ``base.checkpoint``.
            check: checks of the space against the model's structure (groups, patterns,
                reachable limits), run before the base model is trained or measured, on a
                context whose base has only its MACs and parameters counted: a space that
                cannot be searched fails in seconds, not after the base model's training.
                The groups it leaves in ``ctx.groups`` are the ones searched.
        """
        dev = resolve_device(device or space.search.device)
        if base is None:  # the base's latency is measured here: settings it cannot take fail
            latency_device(space.latency.runtime, space.latency.device)  # before training
            check_threads(space.latency.threads)
        model, data, evaluate_fn = load_sources(space)
        example = example_input(space.model.input_shape, space.model.input_dtype)
        groups = describe_groups(model.cpu().eval(), example, space.groups.ignore)
        if check is not None and base is None:
            cost = count_cost(model, space.model.input_shape, space.model.input_dtype)
            nan = float("nan")
            counted = BaseMetrics(accuracy=nan, macs=cost.macs, params=cost.params,
                                  latency_ms=nan, latency_p90_ms=nan, latency={},
                                  checkpoint="", checkpoint_sha256="")
            first = cls(space, model, data, counted, groups, dev, evaluate_fn)
            check(first)
            groups = first.groups
        if base is None:
            from autoprune.base import measure_base

            ckpt = base_checkpoint(space, model, data, dev, evaluate_fn)
            base = measure_base(space, model, data, ckpt, evaluate_fn, dev)
        elif base_state is not None:
            load_state_dict_strict(model, base_state, "base weights")
        else:
            load_checkpoint(model, base.checkpoint)
        model.cpu().eval()  # groups are the structure's: the same before and after training
        return cls(space, model, data, base, groups, dev, evaluate_fn)

    def drop_failing_groups(self) -> dict[str, str]:
        """Leave out the groups that cannot be pruned at all (:func:`probe_ratios`,
        :func:`autoprune.prune.failing_groups`): each would fail every trial. A group that
        fails only at high ratios stays; those trials fail and are recorded. Returns
        ``{name: why}``."""
        from autoprune.study import distributions

        left = failing_groups(self.base_model, self.example_inputs,
                              probe_ratios(distributions(self.space, self.groups)),
                              self.space.pruning.round_to, self.space.groups.ignore)
        self.groups = [g for g in self.groups if g.name not in left]
        return left


#: A trial's latency is the middle of this many measurements, as the base's is: one that other
#: work on the cores slowed put dominated trials on a latency front.
TRIAL_LATENCY_RUNS = 3
PROBE_RATIO = 0.25  # modest: removes channels without reaching a model's own width limits


def probe_ratios(dists: Mapping[str, Any]) -> dict[str, float]:
    """A ratio per searched group to check that it prunes at all: :data:`PROBE_RATIO`, moved
    into the group's range and onto its grid. Groups fixed at 0 are not checked."""
    import math

    out = {}
    for name, d in dists.items():
        if d.high <= 0:
            continue
        r = min(max(PROBE_RATIO, d.low), d.high)
        if d.step:
            r = min(d.high, d.low + math.ceil((r - d.low) / d.step - 1e-9) * d.step)
        out[name] = round(r, 10)
    return out


@dataclass
class TrialResult:
    """What a trial measured. Ratios are per group; ``*_ratio`` fields are relative to the base."""

    ratios: dict[str, float]
    state: TrialState
    seed: int
    accuracy: float = float("nan")
    proxy_accuracy: float = float("nan")
    macs: float = float("nan")
    macs_ratio: float = float("nan")
    params: int | None = None  # None until counted (a failed trial logged 0 parameters)
    params_ratio: float = float("nan")
    latency_ms: float = float("nan")
    latency_p90_ms: float = float("nan")
    speedup: float = float("nan")
    kept_channels: dict[str, int] = field(default_factory=dict)
    constraints: dict[str, float] = field(default_factory=dict)
    finetune_steps: int = 0
    finetune_losses: list[tuple[int, float]] = field(default_factory=list)
    rungs: list[tuple[int, float, float]] = field(default_factory=list)
    duration_s: float = 0.0
    error: str | None = None
    duplicate_of: int | None = None  # a config that already ran: its result, reused
    inherits: str | None = None  # structure key of the finished trial whose weights it pruned
    # torch's CPU threads it ran with: floating-point sums differ with the thread count, so a
    # re-run (export) uses as many
    threads: int = 0
    record: dict[str, Any] = field(default_factory=dict)
    state_dict: dict[str, torch.Tensor] | None = None

    @property
    def feasible(self) -> bool:
        return all(v <= 0 for v in self.constraints.values())

    def objective_values(self, objectives: tuple[str, ...]) -> list[float]:
        return [float(getattr(self, OBJECTIVES[o][1])) for o in objectives]

    def metrics(self) -> dict[str, float]:
        """Scalar metrics for tracking (NaNs left out)."""
        keys = ("accuracy", "proxy_accuracy", "macs", "macs_ratio", "params", "params_ratio",
                "latency_ms", "latency_p90_ms", "speedup", "finetune_steps", "duration_s")
        out = {k: float(getattr(self, k)) for k in keys}
        out["flops"] = 2.0 * out["macs"]
        return {k: v for k, v in out.items() if v == v}

    def to_dict(self, with_weights: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_weights:
            d.pop("state_dict")
        return d


def constraint_values(space: SpaceConfig, result: TrialResult) -> dict[str, float]:
    """Optuna convention: a value <= 0 is satisfied. Every trial gets the same keys."""
    c = space.constraints
    out: dict[str, float] = {}
    if c.max_macs_ratio is not None:
        out["macs_ratio"] = result.macs_ratio - c.max_macs_ratio
    if c.max_params_ratio is not None:
        out["params_ratio"] = result.params_ratio - c.max_params_ratio
    if c.max_latency_ms is not None:
        out["latency_ms"] = result.latency_ms - c.max_latency_ms
    if c.min_accuracy is not None:
        out["accuracy"] = c.min_accuracy - result.accuracy
    return out


def run_trial(ctx: TrialContext, ratios: Mapping[str, float], seed: int | None = None,
              keep_model: bool = False, finetune_steps: int | None = None,
              promote: Promote | None = None, reuse: Reuse | None = None,
              inherit: Inherit | None = None, constraints: bool = True,
              kept: Mapping[str, int] | None = None) -> TrialResult:
    """Prune the base model with ``ratios``, fine-tune it briefly and measure it.

    Never raises for a failure inside the trial: the result has ``state="failed"`` and the
    error, so the controller records it and the search goes on.

    Args:
        ctx: the shared trial context.
        ratios: ``{group name: ratio}``.
        seed: seeds pruning (random importance), data order and fine-tuning; defaults to
            ``search.seed`` so the same ratios always give the same model.
        keep_model: return the fine-tuned weights in ``state_dict``.
        finetune_steps: override the fine-tune budget (steps).
        promote: multi-fidelity: ``promote(rung, accuracy, cost)`` decides at each rung
            whether the trial goes on; a stopped trial ends ``pruned``.
        reuse: ``reuse(structure key)`` returns the result of an earlier trial that kept the
            same channels with the same seed (see :mod:`autoprune.dedup`); the trial then
            reuses it instead of measuring and fine-tuning the same model again.
        inherit: ``inherit(kept channels)`` returns a finished trial's fine-tuned model that
            keeps at least those channels in every group (see :mod:`autoprune.inherit`), or
            None; the trial then prunes that model down instead of the base model.
        constraints: stop an infeasible candidate before fine-tuning. A re-run of a recorded
            trial (export) passes False: it remakes that trial's model, and a measured latency
            that comes out over a limit this time must not stop it.
        kept: the channels each group keeps, as a recorded trial kept them (a re-run), in
            place of what ``ratios`` round to.
    """
    space = ctx.space
    seed = space.search.seed if seed is None else seed
    result = TrialResult(ratios=dict(ratios), state="failed", seed=seed,
                         threads=torch.get_num_threads())
    t0 = time.perf_counter()
    try:
        _run(ctx, result, keep_model, finetune_steps, promote, reuse, inherit, constraints,
             kept)
    except Exception as e:  # noqa: BLE001 - a failed trial is data, not a crash
        result.state = "failed"
        oom = "out of memory: " if out_of_memory(e) else ""
        result.error = f"{oom}{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
    result.duration_s = time.perf_counter() - t0
    return result


def _cost(ctx: TrialContext, result: TrialResult) -> float:
    """The cost that multi-fidelity promotion trades against accuracy: the first cost objective."""
    for obj in ctx.space.objectives:
        if obj != "accuracy":
            return float(getattr(result, OBJECTIVES[obj][1]))
    return result.macs_ratio


def _seed(ctx: TrialContext, seed: int) -> None:
    """Seed a trial's randomness, the training loader's own generator too: a user's
    ``DataLoader(..., generator=torch.Generator().manual_seed(0))`` went on from trial to
    trial, so a trial's batches hung on how many trials ran before it in that process, and
    export's re-run of it (weights not kept) failed its verification (sweep W)."""
    seed_everything(seed)
    loader = ctx.data.train
    found = {id(g): g for g in (getattr(loader, "generator", None),
                                getattr(getattr(loader, "sampler", None), "generator", None))
             if isinstance(g, torch.Generator)}
    for g in found.values():
        g.manual_seed(seed)


def _run(ctx: TrialContext, result: TrialResult, keep_model: bool,
         finetune_steps: int | None, promote: Promote | None, reuse: Reuse | None,
         inherit: Inherit | None, constraints: bool = True,
         kept: Mapping[str, int] | None = None) -> None:
    space, dev = ctx.space, ctx.device
    _seed(ctx, result.seed)
    p = space.pruning
    grad_batches = (list(ctx.data.calibration_batches(p.taylor_batches))
                    if p.importance == "taylor" else None)
    loss = class_loss(space.data.ignore_index)
    model, record = prune_model(ctx.base_model, ctx.example_inputs, result.ratios,
                                p.importance, p.round_to, space.groups.ignore, grad_batches, loss,
                                keep=kept)
    result.record = record.to_dict()
    result.kept_channels = dict(record.kept_channels)
    if reuse is not None and finetune_steps is None:
        from autoprune.dedup import reuse_into, structure_key

        hit = reuse(structure_key(result.kept_channels, result.seed))
        if hit is not None:
            reuse_into(result, hit)
            return
    parent = inherit(result.kept_channels) if inherit is not None else None
    if parent is not None:
        from autoprune.inherit import parent_model

        _seed(ctx, result.seed)
        start, start_record = parent_model(ctx, parent)
        model, record = prune_model(start, ctx.example_inputs, result.ratios, p.importance,
                                    p.round_to, space.groups.ignore, grad_batches, loss,
                                    parent=start_record, keep=kept)
        if record.kept_channels != result.kept_channels:  # a bug, not user input
            raise RuntimeError(f"inherited pruning kept {record.kept_channels}, not "
                               f"{result.kept_channels}")
        result.record, result.inherits = record.to_dict(), parent.key

    cost = count_cost(model, space.model.input_shape, space.model.input_dtype)
    latency = middle_latency(space, model, TRIAL_LATENCY_RUNS)
    base = ctx.base
    result.macs, result.params = cost.macs, cost.params
    result.macs_ratio = cost.macs / base.macs
    result.params_ratio = cost.params / base.params
    result.latency_ms, result.latency_p90_ms = latency.median_ms, latency.p90_ms
    result.speedup = base.latency_ms / latency.median_ms

    model.to(dev)
    _seed(ctx, result.seed)
    adaptive_bn(model, ctx.data.train, space.finetune.bn_calibration_batches, dev)
    result.proxy_accuracy = evaluate(model, ctx.data.val, dev, ctx.evaluate_fn)

    # Cost constraints are known before fine-tuning: an infeasible candidate stops here and
    # reports its proxy accuracy.
    result.accuracy = result.proxy_accuracy
    result.constraints = constraint_values(space, result)
    if constraints and any(v > 0 for k, v in result.constraints.items() if k != "accuracy"):
        result.state = "infeasible"
        return
    fid = space.search.fidelity
    judge = promote if fid.enabled else None
    if judge is not None and fid.proxy_rung and not _judged(result, judge, 0,
                                                          result.proxy_accuracy, ctx):
        return
    _seed(ctx, result.seed)
    teacher = ctx.base_model if space.finetune.distill_alpha > 0 else None
    trainer = finetuner(model, ctx.data.train, space.finetune, dev, finetune_steps,
                        copy.deepcopy(teacher) if teacher is not None else None,
                        space.data.ignore_index)
    later = judge is not None and not (isinstance(judge, Promoter) and judge.keep)
    for i, step in numbered_rungs(trainer.total, fid.rungs) if later else []:
        _log(result, trainer.advance(step))
        if not _judged(result, judge, i, rung_accuracy(model, ctx), ctx):  # type: ignore[arg-type]
            return
    _log(result, trainer.advance(trainer.total))
    result.accuracy = evaluate(model, ctx.data.val, dev, ctx.evaluate_fn)
    result.constraints = constraint_values(space, result)
    result.state = "complete" if result.feasible or not constraints else "infeasible"
    if keep_model:
        result.state_dict = cpu_state(model.state_dict(), clone=True)


def rung_accuracy(model: nn.Module, ctx: TrialContext) -> float:
    """Accuracy part-way through the fine-tune, on a copy whose BatchNorm statistics are
    re-estimated first (adaptive BN, as for the proxy).

    A few training steps leave the running statistics lagging far behind the weights (BN
    momentum 0.1): on resnet8/mnist5k (``benchmarks/rung_fidelity.py``, 20 random configs) at 7
    of 60 steps the plain accuracy was 0.11-0.73 against 0.68-0.96 recalibrated, and its Kendall
    tau with the final accuracy 0.28 against 0.56 (at 20 steps: 0.66 against 0.81). The copy,
    and ``fork_rng`` around the calibration and evaluation draws, leave the training untouched.
    """
    dev, batches = ctx.device, ctx.space.finetune.bn_calibration_batches
    with torch.random.fork_rng(devices=[]):
        judge = copy.deepcopy(model)
        adaptive_bn(judge, ctx.data.train, batches, dev)
        return evaluate(judge, ctx.data.val, dev, ctx.evaluate_fn)


def _log(result: TrialResult, log: TrainLog) -> None:
    result.finetune_steps, result.finetune_losses = log.steps, list(log.losses)


def _judged(result: TrialResult, promote: Promote, rung: int, accuracy: float,
            ctx: TrialContext) -> bool:
    """Report a rung; on a stop, the trial ends ``pruned`` with its accuracy at that rung."""
    cost = _cost(ctx, result)
    result.rungs.append((rung, float(accuracy), cost))
    if promote(rung, accuracy, cost):
        return True
    result.state, result.accuracy = "pruned", float(accuracy)
    return False
