"""Apply per-group pruning ratios for real (channels are removed), record it, and replay it.

Rounding: a group with ``C`` channels and ratio ``r`` keeps ``C * (1 - r)`` channels rounded to
the nearest multiple of ``round_to``, never fewer than ``round_to`` (or 1 when ``C < round_to``)
and never more than ``C``. So with ``round_to: 8`` a 64-channel group at ratio 0.3 keeps 48.
A group whose channels come in ``g`` blocks (grouped convs, GroupNorm, attention heads) keeps
a multiple of ``g`` (every block loses the same channels): ``C * (1 - r)`` rounded to the nearest
multiple of both ``g`` and ``round_to`` (of ``g`` alone when ``C`` is no multiple of both), never
fewer than that multiple. So with 4 blocks of 16 channels, ratio 0.3 keeps 12 (11.2 rounded),
not 8: rounding down had pruned 25% at ratio 0.05.

The :class:`PruneRecord` (ratios, settings and Torch-Pruning's pruning history: which channel
indices left which layer) rebuilds the same architecture from the same base model with
:func:`replay`, without search, importance scores or gradients.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
import torch_pruning as tp
from torch import nn

from autoprune.errors import PruningError
from autoprune.finetune import class_loss
from autoprune.groups import (
    ROOT_TYPES,
    attention_heads,
    build_graph,
    channel_groups,
    check_ratios,
    frozen_kept,
    ignored_modules,
    judged_groups,
    root_module,
    shape_checked_reshapes,
)
from autoprune.reshape_check import ReshapeLog, moved

_FAILED = "pruning failed, the model was left untouched: "


class _FPGM(tp.importance.FPGMImportance):
    """FPGM without Torch-Pruning 1.6's crash on a grouped (not depthwise) conv's input side.

    There it calls ``repeat(groups)`` on a 2-D tensor and raises, and as MetaPruner scores
    every group, FPGM failed every trial of a model with one such conv. That input side is left
    out of the score; the other layers of the group (the conv producing those channels above
    all) still score them.
    """

    @torch.no_grad()
    def __call__(self, group: Any) -> Any:
        kept = copy.copy(group)
        kept._group = [item for item in group._group if not _grouped_input(item.dep)]
        return super().__call__(kept) if kept._group else None


def _grouped_input(dep: Any) -> bool:
    layer = dep.layer
    return bool(dep.pruning_fn == tp.prune_conv_in_channels
                and isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d)
                and layer.groups not in (1, layer.in_channels))


IMPORTANCES: dict[str, Callable[[], Any]] = {
    "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
    "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "taylor": lambda: tp.importance.GroupTaylorImportance(),
    "lamp": lambda: tp.importance.LAMPImportance(p=2),
    "fpgm": lambda: _FPGM(p=2),
    "random": lambda: tp.importance.RandomImportance(),
}


@dataclass
class PruneRecord:
    """Everything needed to rebuild a pruned architecture from its base model."""

    ratios: dict[str, float]
    kept_channels: dict[str, int]
    base_channels: dict[str, int]
    importance: str
    round_to: int
    ignore: list[str]
    history: list[tuple[str, bool, list[int]]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruneRecord:
        d = dict(data)
        d["history"] = [(str(n), bool(o), [int(i) for i in idx]) for n, o, idx in d["history"]]
        return cls(**d)


#: The rounding rule's version, part of cached results' keys (the sensitivity scan): version 2
#: rounds a group in blocks to their nearest multiple, where version 1 rounded down; version 3
#: rounds half-way cases up whatever the ratio's float error (version 2 rounded some down).
ROUNDING_RULE = 3


def kept_after_rounding(channels: int, ratio: float, round_to: int, blocks: int = 1) -> int:
    """Channels a group keeps at ``ratio`` (see the module docstring for the rule)."""
    if ratio <= 0.0:
        return channels  # ratio 0 never prunes, whatever the rounding
    unit = round_to if round_to > 1 and channels >= round_to else 1
    if blocks > 1 and channels % blocks == 0:
        both = math.lcm(unit, blocks)
        unit = both if channels % both == 0 else blocks  # whole blocks come first
    # half rounds up, at the ratio as written: 0.35 comes from the sampler as
    # 0.35000000000000003, and 40 * (1 - that) / 4 = 6.4999999999999991 rounded down to 24 kept
    # where 0.35 as written kept 28
    kept = math.floor(round(channels * (1.0 - ratio) / unit, 9) + 0.5) * unit
    return int(min(channels, max(unit, kept)))


def _sync_attributes(model: nn.Module) -> None:
    """Update attributes that models read in ``forward`` and pruning cannot know about."""
    for m in model.modules():
        # torchvision's VisionTransformer reshapes with self.hidden_dim.
        proj = getattr(m, "conv_proj", None)
        if hasattr(m, "hidden_dim") and isinstance(proj, nn.Conv2d):
            cast(Any, m).hidden_dim = proj.out_channels


def _accumulate_gradients(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                          loss_fn: Callable[..., torch.Tensor]) -> None:
    model.eval()  # keep BN statistics as they are; gradients flow all the same
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    seen = 0
    for x, y in batches:
        loss_fn(model(x.to(device)), y.to(device)).backward()
        seen += 1
    if seen == 0:
        raise PruningError("importance 'taylor' needs at least one training batch for gradients")


def prune_model(
    model: nn.Module,
    example_inputs: torch.Tensor,
    ratios: Mapping[str, float],
    importance: str = "l2",
    round_to: int = 1,
    ignore: Sequence[str] = (),
    grad_batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    parent: PruneRecord | None = None,
    keep: Mapping[str, int] | None = None,
) -> tuple[nn.Module, PruneRecord]:
    """Prune a copy of ``model``; the input model is never changed.

    Args:
        model: the base model, or with ``parent`` a model pruned (and fine-tuned) before.
        example_inputs: a batch of the input shape, for tracing.
        ratios: ``{group name: ratio in [0, 1)}``; groups not named are not pruned.
        importance: one of :data:`IMPORTANCES`.
        round_to: kept channels are rounded to a multiple of this.
        ignore: glob patterns of module names never to prune (the head never is).
        grad_batches: training batches for gradient-based importance (``taylor``).
        loss_fn: loss for those batches (default: the fine-tune's cross-entropy,
            :func:`autoprune.finetune.class_loss`).
        parent: the record that pruned ``model`` from the base. ``ratios`` stay relative to the
            base's channels (each group keeps what one pruning of the base would keep); only
            the channels still missing are removed, by ``model``'s own weights. The record
            returned continues ``parent``'s history, so :func:`replay` rebuilds the result from
            the base model.
        keep: channels each group keeps, in place of what ``ratios`` round to: a recorded
            trial re-made as it was, whatever rounding rule made it (an older autoprune
            rounded half-way counts down at float-error ratios).

    Returns:
        The pruned copy and its :class:`PruneRecord`.
    """
    if importance not in IMPORTANCES:
        raise PruningError(f"pruning.importance: got {importance!r}; allowed: {list(IMPORTANCES)}")
    pruned = copy.deepcopy(model).eval()
    with frozen_kept(pruned):  # traced whole; frozen layers stay frozen once pruned
        return _prune_copy(pruned, example_inputs, ratios, importance, round_to, ignore,
                           grad_batches, loss_fn, parent, keep)


def _prune_copy(pruned: nn.Module, example_inputs: torch.Tensor, ratios: Mapping[str, float],
                importance: str, round_to: int, ignore: Sequence[str],
                grad_batches: Any, loss_fn: Any, parent: PruneRecord | None,
                keep: Mapping[str, int] | None) -> tuple[nn.Module, PruneRecord]:
    with torch.no_grad(), ReshapeLog() as before:
        try:
            ref_out = pruned(example_inputs)
        except Exception as e:
            raise PruningError(f"model.input_shape: the model does not accept an input of shape "
                               f"{list(example_inputs.shape)} ({type(e).__name__}: {e})") from e
    if importance == "taylor":
        _accumulate_gradients(pruned, grad_batches or [], loss_fn or class_loss())

    ignored = ignored_modules(pruned, example_inputs, ignore)
    graph = build_graph(pruned, example_inputs)
    heads = attention_heads(pruned)
    judged = list(judged_groups(graph, ignored))
    groups = {root_module(g): g for g, why in judged if why is None}
    names = {m: graph._module2name[m] for m in groups}
    check_ratios(ratios, list(names.values()))
    by_name = {n: m for m, n in names.items()}
    current = {n: int(graph.get_out_channels(m)) for m, n in names.items()}
    base_channels = dict(parent.base_channels) if parent is not None else current
    kept = {n: int(keep[n]) if keep is not None and n in keep else
            kept_after_rounding(base_channels[n], float(r), round_to,
                                channel_groups(graph, groups[by_name[n]], heads))
            for n, r in ratios.items()}
    grown = {n: (kept[n], current[n]) for n in ratios if kept[n] > current[n]}
    if grown:
        raise PruningError(f"a pruned model cannot grow channels back; group: (asked, has) "
                           f"channels: {grown}")
    # MetaPruner keeps int(C * (1 - r)) channels; +0.5 makes that exactly our rounded count.
    effective = {by_name[n]: 1.0 - (kept[n] + 0.5) / current[n]
                 for n in ratios if kept[n] < current[n]}
    # The groups not pruned now are left alone: MetaPruner scores every group it may prune
    # before it prunes any, so one group whose importance cannot be computed (a chunk's half
    # with a residual add) failed every other group's pruning too, and on a model of 120
    # groups each one-group pruning scored all 120.
    # Groups left out of the search are left alone too (MetaPruner scoring one whose channels
    # are all single-channel blocks raised an IndexError and failed the group pruned).
    still = [m for m in groups if m not in effective]
    still += [root_module(g) for g, why in judged if why]
    # whether the unpruned model runs in training mode (one forward, only when a group is
    # pruned: a trial at ratio 0 needs none)
    trains = bool(effective) and train_forward(pruned, example_inputs)[1] is None
    try:
        with shape_checked_reshapes(), warnings.catch_warnings():
            # Its own graph must map reshapes like build_graph's. It warns of "unwrapped
            # parameters" (a ViT's class token and position embedding) on every trial; their
            # last non-singleton dim is the width, which is what it prunes.
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            pruner = tp.pruner.MetaPruner(
                pruned, example_inputs, importance=IMPORTANCES[importance](), pruning_ratio=0.0,
                pruning_ratio_dict=effective, ignored_layers=ignored + still, round_to=None,
                root_module_types=list(ROOT_TYPES),
                # Heads as channel groups (every head keeps the same dims), not num_heads: with
                # that, MetaPruner skips a width group whose attention it reaches from the
                # input side first (ViT's hidden dim), silently. Fresh dicts: MetaPruner fills
                # them in place and its defaults are shared between calls.
                in_channel_groups={}, out_channel_groups=dict(heads),
            )
        if effective:
            pruner.step()
        _sync_attributes(pruned)
        pruned.zero_grad(set_to_none=True)
        with torch.no_grad(), ReshapeLog() as after:
            out = pruned(example_inputs)
    except Exception as e:  # noqa: BLE001 - report which op broke, keep the input model intact
        raise PruningError(f"{_FAILED}{_parametrized(pruned, e)}{type(e).__name__}: "
                           f"{e}") from e
    _check_output(ref_out, out)
    if trains and (broke := train_forward(pruned, example_inputs)[1]) is not None:
        raise PruningError(f"{_FAILED}the pruned model fails in training mode, though it "
                           "runs in eval mode, where it is traced: a layer only training runs "
                           "(an auxiliary head, deep supervision) reads the pruned channels "
                           f"({type(broke).__name__}: {str(broke)[:200]})")
    if (bad := moved(before.seen, after.seen)) is not None:
        (src, dst), (psrc, pdst) = bad
        raise PruningError(f"{_FAILED}a reshape does not follow the pruned channels: "
                           f"{list(src)} -> {list(dst)} before pruning, {list(psrc)} -> "
                           f"{list(pdst)} after, so the pruned model would compute something "
                           "else (a width written into the model's code, as in "
                           "x.view(n, 32, -1)? x.view(n, x.shape[1], -1) follows the pruning)")
    history = [(str(n), bool(o), [int(i) for i in idx]) for n, o, idx in pruner.pruning_history()]
    if parent is not None:
        history = [*parent.history, *history]
    actual = {n: int(pruner.DG.get_out_channels(m)) for m, n in names.items()}
    # Torch-Pruning skips a group it cannot prune without a word; never return such a model.
    missed = {n: (kept[n], actual[n], base_channels[n]) for n in ratios
              if actual[n] != kept[n]}
    if missed:
        raise PruningError(f"Torch-Pruning did not prune these groups as asked, the model was "
                           f"left untouched; group: (asked, got, base) channels: {missed}")
    record = PruneRecord(
        ratios={n: float(r) for n, r in ratios.items()}, kept_channels=actual,
        base_channels=base_channels, importance=importance, round_to=round_to,
        ignore=list(ignore), history=history,
    )
    return pruned, record


def _parametrized(model: nn.Module, error: Exception) -> str:
    """Why a pruning failed when a layer of a pruned group has a weight parametrization
    (weight_norm, spectral_norm): Torch-Pruning's own words were a KeyError ("attribute
    'weight' already exists") that named no layer."""
    from torch.nn.utils import parametrize

    from autoprune.sources._models import PARAMETRIZED_FIX

    found = [n for n, m in model.named_modules() if parametrize.is_parametrized(m)]
    if not found or "already exists" not in str(error):  # Torch-Pruning's words for it
        return ""
    return (f"layers with a weight parametrization (weight_norm, spectral_norm) cannot be "
            f"pruned ({', '.join(found[:4])}); allowed: {PARAMETRIZED_FIX} - ")


def train_forward(model: nn.Module, example: torch.Tensor) -> tuple[Any, Exception | None]:
    """One training-mode forward of ``model`` (two samples, for BatchNorm): its output, or
    its error. Without gradients, and its buffers (BatchNorm statistics) and the random state
    are as before. The model is traced in eval mode only: a layer only training runs was
    never seen, and every trial that pruned its input failed in the fine-tune with a bare
    shape error naming no layer."""
    batch = example.expand(2, *example.shape[1:]) if example.shape[0] == 1 else example
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    was = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.train()
            return model(batch), None
    except Exception as e:  # noqa: BLE001 - returned: the caller names it
        return None, e
    finally:
        model.train(was)
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def failing_groups(model: nn.Module, example_inputs: torch.Tensor, ratios: Mapping[str, float],
                   round_to: int = 1, ignore: Sequence[str] = ()) -> dict[str, str]:
    """The groups that cannot be pruned to their ``ratios``, ``{name: why}``.

    Some structures Torch-Pruning traces but cannot prune (a PixelShuffle, an unequal
    ``torch.split``, a per-channel buffer used in ``forward``): a search over such a group
    would fail every trial. All groups are pruned at once first, as a trial does (one pass);
    only when that fails is each tried alone, to name the ones at fault. A failure of the
    whole that no single group shows is a warning: trials that prune them together fail.
    """
    if not ratios:
        return {}
    try:
        prune_model(model, example_inputs, ratios, "l2", round_to, ignore)
        return {}
    except PruningError as e:
        together = str(e).removeprefix(_FAILED)
    failing = {}
    for name, ratio in ratios.items():
        try:
            prune_model(model, example_inputs, {name: ratio}, "l2", round_to, ignore)
        except PruningError as e:
            failing[name] = (f"pruning it to ratio {ratio:g} fails "
                             f"({str(e).removeprefix(_FAILED)[:300]})")
    if not failing:
        warnings.warn(f"every group prunes on its own, but pruned all at once they fail "
                      f"({together[:300]}); trials that prune them together will fail",
                      stacklevel=2)
    return failing


def _check_output(ref: Any, out: Any) -> None:
    ref_shape = tuple(ref.shape) if isinstance(ref, torch.Tensor) else None
    out_shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
    if ref_shape != out_shape:
        raise PruningError(f"pruning changed the output shape from {ref_shape} to {out_shape}; "
                           "the model was left untouched (add the layer to groups.ignore)")


def replay(base_model: nn.Module, example_inputs: torch.Tensor,
           record: PruneRecord) -> nn.Module:
    """Rebuild the pruned architecture from a copy of the base model and a record."""
    model = copy.deepcopy(base_model).eval()
    graph = build_graph(model, example_inputs)
    named = dict(model.named_modules())
    wrong = {n: (c, int(graph.get_out_channels(named[n]) or 0) if n in named else None)
             for n, c in record.base_channels.items()
             if n not in named or int(graph.get_out_channels(named[n]) or 0) != c}
    if wrong:
        shown = dict(list(wrong.items())[:5])
        raise PruningError("the pruning record does not fit this base model (it was made on "
                           f"another architecture); group: (record, model) channels: {shown}")
    try:
        graph.load_pruning_history([list(h) for h in record.history])
    except Exception as e:  # noqa: BLE001
        raise PruningError(f"the pruning record does not fit this base model: "
                           f"{type(e).__name__}: {e}") from e
    off = {n: (c, int(graph.get_out_channels(named[n]) or 0))
           for n, c in record.kept_channels.items()
           if n in named and int(graph.get_out_channels(named[n]) or 0) != c}
    if off:  # kept_channels edited by hand, or another record's history
        raise PruningError("the pruning record contradicts itself: its history keeps other "
                           "channel counts than its kept_channels; group: (kept_channels, "
                           f"history) channels: {dict(list(off.items())[:5])}")
    _sync_attributes(model)
    return model
