"""Checks of a space against its model before any trial: groups that cannot be pruned, and
ranges or limits a search could never reach (each would spend the whole budget for nothing)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from autoprune.errors import ConfigError, PruningError
from autoprune.groups import left_out_groups
from autoprune.trial import TrialContext


def preflight(ctx: TrialContext) -> None:
    """The checks of a space against its model's structure before a search or scan: glob
    patterns that match nothing, groups that cannot be pruned (left out of ``ctx.groups``,
    with a warning), and a space with nothing to search or limits out of reach."""
    from autoprune.study import check_patterns, distributions

    space = ctx.space
    check_patterns(space, ctx.groups, [n for n, _ in ctx.base_model.named_modules() if n])
    warn_not_searchable(left_out_groups(ctx.base_model, ctx.example_inputs, space.groups.ignore))
    warn_left_out(ctx.drop_failing_groups())
    check_reachable(ctx, distributions(space, ctx.groups))


def warn_not_searchable(left: Mapping[str, str]) -> None:
    """Say which groups the model's structure keeps out of the search (``autoprune layers``
    lists them too; a search said nothing, and a user who never ran it did not know a layer
    was never pruned)."""
    if not left:
        return
    lines = "".join(f"\n  {name}: {why}" for name, why in left.items())
    print(f"autoprune: warning: {len(left)} group(s) of this model cannot be searched, and "
          f"keep their width (add them to groups.ignore to silence this):{lines}",
          file=sys.stderr)


def warn_left_out(left: Mapping[str, str]) -> None:
    """Say which groups the search leaves out because they fail to prune (not silenced by
    --quiet: it changes what is searched)."""
    if not left:
        return
    lines = "".join(f"\n  {name}: {why}" for name, why in left.items())
    print(f"autoprune: warning: {len(left)} group(s) left out of the search, because "
          f"Torch-Pruning cannot prune them and each would fail every trial (add them to "
          f"groups.ignore to silence this):{lines}", file=sys.stderr)


def check_reachable(ctx: TrialContext, dists: Mapping[str, Any]) -> None:
    """A space must leave something to search, and its MACs and parameter limits must be
    within reach: the cheapest config (every group at its highest ratio) is counted once. A
    limit below it would make every trial infeasible, the whole budget spent for an empty
    front."""
    space = ctx.space
    if not dists:
        raise ConfigError("model.source", space.model.source,
                          "a model with a channel group Torch-Pruning can prune (none is left "
                          "to search: each fails to prune, see the warning above, or is in "
                          "groups.ignore; `autoprune layers` lists them with the reasons, and "
                          "ignoring the layer a failure names may free the others)")
    if all(d.high <= 0 for d in dists.values()):
        raise ConfigError("groups", space.to_dict()["groups"],
                          "at least one group with a range above 0 (every group's high is 0, "
                          "so every trial would be the unpruned model)")
    from autoprune.prune import kept_after_rounding

    round_to = space.pruning.round_to
    whole = [g for g in ctx.groups if g.name in dists and dists[g.name].high > 0
             and kept_after_rounding(g.channels, dists[g.name].high, round_to,
                                     g.blocks) == g.channels]
    if whole:
        every = len(whole) == sum(d.high > 0 for d in dists.values())
        # a group in blocks keeps a multiple of them, whatever round_to
        by_blocks = [g for g in whole
                     if kept_after_rounding(g.channels, dists[g.name].high, 1, g.blocks)
                     == g.channels]
        what = (f"{len(whole)} group(s) keep every channel at every ratio of their range "
                f"with pruning.round_to {round_to}: "
                + ", ".join(f"{g.name} ({g.channels}" + (f" channels in {g.blocks} blocks, "
                                                         "a multiple of which is kept)"
                                                         if g in by_blocks else ")")
                            for g in whole))
        if every:
            if len(by_blocks) == len(whole):
                raise ConfigError("groups", space.to_dict()["groups"],
                                  f"a range whose highest ratio removes channels ({what})")
            raise ConfigError("pruning.round_to", round_to,
                              f"a multiple that leaves channels to remove ({what})")
        print(f"autoprune: warning: {what}; "
              + ("a higher bound prunes them" if len(by_blocks) == len(whole) else
                 "a smaller round_to or a higher bound prunes them"), file=sys.stderr)
    limits = {k: getattr(space.constraints, k) for k in ("max_macs_ratio", "max_params_ratio")}
    if not dists or all(v is None for v in limits.values()):
        return
    from autoprune.measure import count_cost
    from autoprune.prune import prune_model

    try:
        cheapest, _ = prune_model(ctx.base_model, ctx.example_inputs,
                                  {n: d.high for n, d in dists.items() if d.high > 0}, "l2",
                                  round_to, space.groups.ignore)
    except PruningError:  # the trials will say why; nothing to compare with
        return
    cost = count_cost(cheapest, space.model.input_shape, space.model.input_dtype)
    reached = {"max_macs_ratio": cost.macs / ctx.base.macs,
               "max_params_ratio": cost.params / ctx.base.params}
    for key, limit in limits.items():
        if limit is not None and limit < reached[key] - 1e-9:
            raise ConfigError(f"constraints.{key}", limit,
                              f"a ratio of at least {reached[key]:.4f}, the lowest this space "
                              "reaches (every group at its highest ratio; higher bounds in "
                              "groups reach lower)")
