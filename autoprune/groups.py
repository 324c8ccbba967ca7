"""Dependency groups of a model: the dimensions autoprune searches over.

Torch-Pruning couples layers that must keep the same channel count (residual adds,
concatenations, depthwise convs). A ratio for one layer inside such a group would silently be
replaced by the group's ratio, so autoprune keys every ratio by *group*, named after the group's
root module (its qualified name in the model, e.g. ``layer1.0.conv1``).

Some channels cannot shrink, and no group holding them is offered: channels that pass a
reshape no channel axis survives (ShuffleNet's channel shuffle) and the widths around an
attention module that derives its head size from its input width (Swin's window attention).
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping as tp_index_mapping
from torch_pruning.dependency import shape_infer as tp_shape_infer

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
        blocks: the blocks its channels come in (a grouped conv, GroupNorm, attention heads):
            it keeps a multiple of this (see :func:`autoprune.prune.kept_after_rounding`).
    """

    name: str
    root_type: str
    channels: int
    members: tuple[str, ...]
    macs_share: float
    member_macs: tuple[float, ...] = ()  # each member's share of the model's MACs
    blocks: int = 1

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


def _traced_shapes(grad_fn: Any) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Input and output shape of a traced view/reshape, or None when autograd kept no record."""
    try:
        out = tuple(int(d) for d in grad_fn._input_metadata[0].shape)
        src = getattr(grad_fn, "_saved_self_sym_sizes", None)
        if src is None:
            fn, nr = grad_fn.next_functions[0]
            src = fn._input_metadata[nr].shape
        return tuple(int(d) for d in src), out
    except (AttributeError, IndexError, TypeError):
        return None


def _kept_axis(src: tuple[int, ...], dst: tuple[int, ...], i: int) -> bool:
    """Whether axis ``i`` of ``src`` is still a whole axis of ``dst`` after a reshape."""
    before = math.prod(src[:i])
    return any(d == src[i] and math.prod(dst[:j]) == before for j, d in enumerate(dst) if j)


def _unit_axes_only(src: tuple[int, ...], dst: tuple[int, ...], c_in: int | None,
                    c_out: int | None) -> bool:
    """Whether only size-1 axes come or go, the width is one axis of its own, and it does not
    land where a batch would be: a Linear fed one sample runs as ``[1, F] -> [F] -> [1, F]``,
    whose ``[F] -> [1, F]`` has no batch axis to tell the channels by."""
    kept = [d for d in src if d != 1]
    if kept != [d for d in dst if d != 1]:
        return False
    for c in (c_in, c_out):
        if c and kept.count(c) == 1:
            return len(dst) == 1 or dst.index(c) > 0
    return False


def reshape_channels(src: tuple[int, ...], dst: tuple[int, ...], c_in: int | None,
                     c_out: int | None, channel_last: bool = False) -> tuple[str, int] | None:
    """How channels go through a reshape of ``src`` to ``dst``: ``(kind, stride)`` or None.

    ``c_in`` and ``c_out`` are the widths of the layers before and after (None: unknown).
    ``"same"``: every axis of the channel width survives whole (other axes regroup around it);
    ``"flatten"``/``"unflatten"``: the channel axis merges with all later axes (``stride``
    values each) or splits back out of one. None: no channel axis survives (a channel shuffle
    splits it into groups, an attention reshape into heads), so no channel index can be
    followed through. Every axis of that width must survive, since a spatial axis may be as
    wide as the channel axis, unless ``channel_last`` says where the channels are (the layers
    before or after are Linear or LayerNorm: tokens x channels, where the token count may
    equal the width).
    """
    if _unit_axes_only(src, dst, c_in, c_out):
        return "same", 1
    c = next((c for c in (c_in, c_out) if c and c in src[1:]), None)
    if c is None:
        return None
    axes = [i for i, d in enumerate(src) if i and d == c]
    if channel_last and src[-1] == c:
        axes = [len(src) - 1]
    if all(_kept_axis(src, dst, i) for i in axes):
        return "same", 1
    i = axes[0]
    if math.prod(src[:i]) == math.prod(dst[:-1]) and dst[-1] == math.prod(src[i:]):
        return "flatten", math.prod(src[i + 1:])
    for j, d in enumerate(dst):
        if (j and i == len(src) - 1 and d == c_out
                and math.prod(dst[:j]) == math.prod(src[:-1]) and math.prod(dst[j:]) == c):
            return "unflatten", math.prod(dst[j + 1:])
    return None


def _inside_attention(graph: tp.DependencyGraph, node: Any) -> bool:
    """Whether the first layers after the op ``node`` include an ``nn.MultiheadAttention``."""
    seen, todo = set(), list(node.outputs)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if isinstance(n.module, nn.MultiheadAttention):
            return True
        if n.module not in graph._module2name:  # another op: look further
            todo.extend(n.outputs)
    return False


CHANNEL_LAST = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.MultiheadAttention)


def _channel_last(graph: tp.DependencyGraph, node: Any) -> bool:
    """Whether the nearest layers on one side of the op ``node`` (before it, or after it) all
    keep channels last (Linear, LayerNorm, attention: tokens x channels)."""

    def nearest(side: str) -> list[nn.Module]:
        seen, todo, found = set(), list(getattr(node, side)), []
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.module in graph._module2name:
                found.append(n.module)
            elif any(k in (n.grad_fn.name() if n.grad_fn is not None else "")
                     for k in ("Transpose", "Permute")):
                return []  # the layout changes on the way: this side cannot tell
            else:  # another op: look further
                todo.extend(getattr(n, side))
        return found

    return any(found and all(isinstance(m, CHANNEL_LAST) for m in found)
               for found in (nearest("inputs"), nearest("outputs")))


def _map_reshape(graph: tp.DependencyGraph, node: Any) -> None:
    """Replaces Torch-Pruning's reshape index mapping, which guesses from neighbouring layers.

    Its guess divides by zero on a channel shuffle (ShuffleNet) and, on channel-last attention
    reshapes (Swin), maps channels to ever longer index lists so group lookup never ends. Here
    the traced shapes decide; a reshape no channel index survives is cut off (``opaque``) so
    every group reaching it is left out of the search.
    """
    # Torch-Pruning prunes nn.MultiheadAttention as one module; the head reshapes traced
    # inside it carry its embedding dims unchanged.
    if _inside_attention(graph, node):
        node.type = tp.ops.OPTYPE.ELEMENTWISE
        return
    shapes = _traced_shapes(node.grad_fn)
    c_in = next((c for n in node.inputs
                 if (c := tp_shape_infer.infer_out_channels_recursively(graph, n, [0]))), None)
    c_out = next((c for n in node.outputs
                  if (c := tp_shape_infer.infer_in_channels_recursively(graph, n, [0]))), None)
    how = reshape_channels(*shapes, c_in, c_out, _channel_last(graph, node)) if shapes else None
    # Decided once: Torch-Pruning re-runs its own guess for RESHAPE nodes on every lookup.
    node.type = tp.ops.OPTYPE.ELEMENTWISE
    if how is None:
        src, dst = shapes or ("?", "?")
        node.opaque = f"{node.grad_fn.name()} {list(src)} -> {list(dst)}"
        node.untraced = c_in is None and c_out is None  # Torch-Pruning found neither width
        node.recurrent = _recurrent_owner(graph.model, node.grad_fn)
        node.dependencies.clear()
    elif how[0] != "same":
        # As Torch-Pruning maps a flatten: node -> neighbour collapses, neighbour -> node expands.
        for other in node.inputs if how[0] == "flatten" else node.outputs:
            for dep in node.dependencies:
                if dep.target is other:
                    dep.index_mapping[0] = tp_index_mapping._FlattenIndexMapping(how[1], True)
            for dep in other.dependencies:
                if dep.target is node:
                    dep.index_mapping[0] = tp_index_mapping._FlattenIndexMapping(how[1], False)


def _recurrent_owner(model: nn.Module, grad_fn: Any, depth: int = 4) -> str | None:
    """The recurrent layer a traced reshape belongs to, if any (None: none found).

    Torch-Pruning traces a GRU or plain RNN as tensor operations, not as a module, so a group
    feeding one stops at a reshape inside it; that layer's weights lie a few steps below it.
    """
    owners = {id(p): f"{name}, a recurrent layer ({type(m).__name__})"
              for name, m in model.named_modules()
              if isinstance(m, nn.RNNBase) for p in m.parameters()}
    frontier = [grad_fn] if owners else []
    for _ in range(depth + 1):
        for fn in frontier:
            if id(getattr(fn, "variable", None)) in owners:
                return owners[id(fn.variable)]
        frontier = [g for fn in frontier for g, _ in fn.next_functions if g is not None]
    return None


@contextlib.contextmanager
def shape_checked_reshapes() -> Iterator[None]:
    """Map channels through view/reshape by their traced shapes while a graph is built."""
    original = tp_index_mapping.update_reshape_index_mapping
    tp_index_mapping.update_reshape_index_mapping = _map_reshape
    try:
        yield
    finally:
        tp_index_mapping.update_reshape_index_mapping = original


@contextlib.contextmanager
def frozen_kept(model: nn.Module) -> Iterator[None]:
    """Every parameter requires grad inside, and the frozen ones (``requires_grad=False``)
    are frozen again after, by name. Torch-Pruning traces the autograd graph: a frozen stem
    left no trace, so it was silently no group; and a frozen layer it pruned came back as new,
    trainable parameters, which the brief fine-tune then changed."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    if frozen:
        model.requires_grad_(True)
    try:
        yield
    finally:
        if frozen:
            for n, p in model.named_parameters():
                p.requires_grad_(n not in frozen)


def build_graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    """Trace the model once into a Torch-Pruning dependency graph."""
    try:
        with shape_checked_reshapes(), frozen_kept(model):
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs,
                                                         verbose=False)
    except Exception as e:  # noqa: BLE001 - tracing failures carry the op in their message
        raise PruningError(f"cannot trace the model into a dependency graph: "
                           f"{type(e).__name__}: {e}") from e


def fixed_width_modules(model: nn.Module) -> list[nn.Module]:
    """Attention modules with their own projections and a ``num_heads`` (Swin, timm style).

    Their forward derives the head size from the input width (``C // num_heads``), so neither
    the width they read and write nor their projections can shrink; Torch-Pruning only knows
    how to keep ``nn.MultiheadAttention`` consistent.
    """
    return [m for m in model.modules()
            if isinstance(getattr(m, "num_heads", None), int)
            and not isinstance(m, nn.MultiheadAttention)
            and any(isinstance(c, nn.Linear) for c in m.children())]


def tied_modules(model: nn.Module) -> dict[nn.Module, str]:
    """Modules that share a parameter with another module (weight tying: an embedding and an
    output layer holding one tensor), each with the name of one it shares with. Pruning one
    side would give it a new, smaller tensor and silently untie the pair."""
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            holders.setdefault(id(p), []).append((name, module))
    tied: dict[nn.Module, str] = {}
    for pairs in holders.values():
        for _name, module in pairs:
            others = [n for n, m in pairs if m is not module]
            if others:
                tied.setdefault(module, others[0])
    return tied


def judged_groups(graph: tp.DependencyGraph,
                   ignored: Sequence[nn.Module]) -> Iterable[tuple[Any, str | None]]:
    """Every group not rooted in ``ignored``, with why it cannot be searched (None: it can)."""
    ignored_all = [sub for m in ignored for sub in m.modules()]
    fixed = {sub for m in fixed_width_modules(graph.model) for sub in m.modules()}
    tied = tied_modules(graph.model)
    recurrent = [m for m in graph.model.modules() if isinstance(m, nn.RNNBase)]
    heads = attention_heads(graph.model)
    for group in graph.get_all_groups(ignored_layers=ignored_all, root_module_types=ROOT_TYPES):
        why = None
        # Torch-Pruning's LSTM support is partial (pruning one failed every trial with an
        # IndexError) and it has none for GRU/RNN: a group that reaches one is left out whole
        rnn = next((d.target.module for d, _ in group if d.target.module in recurrent), None)
        if rnn is not None:
            why = (f"it touches {graph._module2name.get(rnn, '?')}, a recurrent layer "
                   f"({type(rnn).__name__}) that Torch-Pruning does not prune reliably")
        for dep, _ in () if why else group:
            if opaque := getattr(dep.target, "opaque", None):
                why = f"its channels cross a reshape that does not keep them whole ({opaque})"
                if getattr(dep.target, "untraced", False):
                    why = (f"its channels cross a reshape ({opaque}) between layers whose "
                           "width Torch-Pruning could not trace, so no channel can be "
                           "followed through it")
                if recurrent_layer := getattr(dep.target, "recurrent", None):
                    why = (f"it touches {recurrent_layer} that Torch-Pruning does not prune "
                           f"reliably (its channels cross a reshape inside it: {opaque})")
            elif dep.target.module in fixed:
                why = (f"it touches {graph._module2name.get(dep.target.module, '?')}, whose "
                       "width is fixed")
            elif dep.target.module in tied:
                why = (f"it touches {graph._module2name.get(dep.target.module, '?')}, whose "
                       f"weight is tied to {tied[dep.target.module]} (pruning would untie them)")
            if why:
                break
        channels = int(graph.get_out_channels(root_module(group)) or 0)
        if why is None and channels > 1 and channel_groups(graph, group, heads) == channels:
            why = (f"its {channels} channels are {channels} blocks of one (the input of a "
                   "grouped conv with more outputs than inputs per group, as a depthwise conv "
                   "with a channel multiplier): every block keeps its channel, so none can go")
        yield group, why


def iter_groups(graph: tp.DependencyGraph, ignored: Sequence[nn.Module]) -> Iterable[Any]:
    """The searchable groups: not rooted in ``ignored``, not crossing an opaque reshape and not
    touching a fixed-width module (on either side of its layers)."""
    return (group for group, why in judged_groups(graph, ignored) if why is None)


def left_out_groups(model: nn.Module, example_inputs: torch.Tensor,
                    ignore: Sequence[str] = ()) -> dict[str, str]:
    """Groups that exist but cannot be searched, ``{root layer: why}``: they cross a reshape
    no channel index survives, or touch a fixed-width module; and embeddings whose width no
    searched group prunes (groups start at conv, linear and LSTM layers)."""
    model = model.eval()
    graph = build_graph(model, example_inputs)
    ignored = ignored_modules(model, example_inputs, ignore)
    judged = list(judged_groups(graph, ignored))
    left = {graph._module2name.get(root_module(group), "?"): why for group, why in judged if why}
    searched = {dep.target.module for group, why in judged if why is None for dep, _ in group}
    skip = {sub for m in ignored for sub in m.modules()}
    traced = {sub for m in graph.module2node if isinstance(m, nn.Module) for sub in m.modules()}
    for name, m in model.named_modules():
        if (isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and m not in traced
                and m not in skip):  # (a traced module's own layers: MHA's out_proj)
            left[name] = ("autograd recorded no use of it in the traced forward (it runs under "
                          "torch.no_grad() or a reentrant torch.utils.checkpoint, or not at all "
                          "in eval mode), so its channels cannot be followed")
        if isinstance(m, nn.Embedding) and m not in searched and m not in skip:
            left[name] = (f"an embedding ({m.embedding_dim} wide): its width is not searched "
                          "(groups start at conv, linear and LSTM layers; the layers it feeds "
                          "are pruned on their outputs)")
    return left


def channel_groups(graph: tp.DependencyGraph, group: Any,
                   heads: Mapping[nn.Module, int]) -> int:
    """Blocks a group's channels come in (grouped convs, GroupNorm, attention ``heads``).

    Torch-Pruning removes the same offsets from every block, so the group keeps a multiple of
    this; a depthwise conv keeps each channel on its own and does not count.
    """
    blocks = [1]
    for dep, _ in group:
        m = dep.target.module
        pruner = graph.get_pruner_of_module(m)
        if pruner is None or (isinstance(m, nn.modules.conv._ConvNd)
                              and m.groups == m.out_channels):
            continue
        if graph.is_out_channel_pruning_fn(dep.handler):
            blocks += [pruner.get_out_channel_groups(m), heads.get(m, 1)]
        else:
            blocks.append(pruner.get_in_channel_groups(m))
    return max(blocks)


def root_module(group: Any) -> nn.Module:
    return group[0].dep.target.module


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
    # One sample: Torch-Pruning divides the total by the batch but not each layer's count.
    total_macs, _params, layer_macs, _lp = tp.utils.count_ops_and_params(
        model, example_inputs[:1], layer_wise=True)
    infos = []
    heads = attention_heads(model)
    for group in iter_groups(graph, ignored_modules(model, example_inputs, ignore)):
        root = root_module(group)
        members: list[str] = []
        shares: list[float] = []
        for dep, _idxs in group:
            module = dep.target.module
            name = graph._module2name.get(module)
            if name is None or name in members or not isinstance(module, nn.Module):
                continue
            members.append(name)
            shares.append(float(layer_macs.get(module) or 0.0) / total_macs if total_macs
                          else 0.0)
        infos.append(GroupInfo(
            name=graph._module2name[root], root_type=type(root).__name__,
            channels=int(graph.get_out_channels(root) or 0), members=tuple(members),
            macs_share=sum(shares), member_macs=tuple(shares),
            blocks=channel_groups(graph, group, heads),
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
