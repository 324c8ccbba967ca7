"""Dependency groups of a model: the dimensions autoprune searches over.

Torch-Pruning couples layers that must keep the same channel count (residual adds,
concatenations, depthwise convs). A ratio for one layer inside such a group would silently be
replaced by the group's ratio, so autoprune keys every ratio by *group*, named after the group's
root module (its qualified name in the model, e.g. ``layer1.0.conv1``).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from autoprune.errors import ConfigError, PruningError

# Leaf module types that can root a group (Torch-Pruning's defaults).
ROOT_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear, nn.LSTM)


@dataclass(frozen=True)
class GroupInfo:
    """One searchable group.

    Attributes:
        name: qualified name of the root module; the key of every ratio.
        root_type: class name of the root module.
        channels: prunable channels (the root's output channels).
        members: every layer whose weights shrink when this group is pruned.
        macs_share: fraction of the model's MACs in those layers. A layer belongs to the group
            of its output channels and to the group of its input channels, so shares add up
            to more than 1.
    """

    name: str
    root_type: str
    channels: int
    members: tuple[str, ...]
    macs_share: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def head_layers(model: nn.Module, example_inputs: torch.Tensor) -> list[nn.Module]:
    """The classifier head: the last conv/linear layer to run (its outputs are the model's)."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, _i, _o: order.append(mod))
             for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return order[-1:]


def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """``{MultiheadAttention: num_heads}`` so Torch-Pruning keeps head dims consistent."""
    return {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


def match_ignored(names: Iterable[str], patterns: Sequence[str]) -> list[str]:
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def ignored_modules(model: nn.Module, example_inputs: torch.Tensor,
                    patterns: Sequence[str] = ()) -> list[nn.Module]:
    """The head plus every module whose qualified name matches one of the glob ``patterns``."""
    named = dict(model.named_modules())
    chosen = match_ignored(named, patterns)
    return head_layers(model, example_inputs) + [named[n] for n in chosen]


def build_graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    """Trace the model once into a Torch-Pruning dependency graph."""
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs,
                                                     verbose=False)
    except Exception as e:  # noqa: BLE001 - tracing failures carry the op in their message
        raise PruningError(f"cannot trace the model into a dependency graph: "
                           f"{type(e).__name__}: {e}") from e


def iter_groups(graph: tp.DependencyGraph, ignored: Sequence[nn.Module]) -> Iterable[Any]:
    ignored_all = [sub for m in ignored for sub in m.modules()]
    yield from graph.get_all_groups(ignored_layers=ignored_all, root_module_types=ROOT_TYPES)


def root_module(group: Any) -> nn.Module:
    return group[0].dep.target.module  # type: ignore[no-any-return]


def describe_groups(model: nn.Module, example_inputs: torch.Tensor,
                    ignore: Sequence[str] = ()) -> list[GroupInfo]:
    """List the searchable groups of ``model`` (the model is not changed).

    Args:
        model: the model.
        example_inputs: a batch of the input shape, for tracing.
        ignore: glob patterns over module names to leave out (the head always is).
    """
    model = model.eval()
    graph = build_graph(model, example_inputs)
    total_macs, _params, layer_macs, _lp = tp.utils.count_ops_and_params(
        model, example_inputs, layer_wise=True)
    infos = []
    for group in iter_groups(graph, ignored_modules(model, example_inputs, ignore)):
        root = root_module(group)
        members: list[str] = []
        macs = 0.0
        for dep, _idxs in group:
            module = dep.target.module
            name = graph._module2name.get(module)
            if name is None or name in members or not isinstance(module, nn.Module):
                continue
            members.append(name)
            macs += float(layer_macs.get(module) or 0.0)
        infos.append(GroupInfo(
            name=graph._module2name[root], root_type=type(root).__name__,
            channels=int(graph.get_out_channels(root) or 0), members=tuple(members),
            macs_share=macs / total_macs if total_macs else 0.0,
        ))
    return infos


def check_ratios(ratios: Mapping[str, float], names: Sequence[str],
                 field: str = "ratios") -> None:
    """Reject unknown group names (listing close matches) and ratios outside [0, 1)."""
    for name, ratio in ratios.items():
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
            raise ConfigError(f"{field}.{name}", ratio,
                              f"a group of this model; close matches: {close or 'none'}; "
                              f"all groups: {list(names)}")
        if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
            raise ConfigError(f"{field}.{name}", ratio, "a pruning ratio in [0, 1)")
