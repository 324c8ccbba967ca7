"""The ``autoprune`` command: thin subcommands over the library."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from typing import TYPE_CHECKING

from autoprune.errors import AutopruneError

if TYPE_CHECKING:
    from autoprune.groups import GroupInfo


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--input-shape: got {text!r}; allowed: comma-separated ints like 1,3,224,224"
        ) from None
    if len(shape) < 2 or min(shape) <= 0:
        raise argparse.ArgumentTypeError(
            f"--input-shape: got {text!r}; allowed: positive ints with a batch dim, e.g. 1,3,32,32")
    return shape


def cmd_layers(args: argparse.Namespace) -> int:
    import torch

    from autoprune.config import load_space
    from autoprune.groups import describe_groups
    from autoprune.sources import build_model, load_checkpoint

    if args.space:
        space = load_space(args.space)
        source, shape = space.model.source, space.model.input_shape
        num_classes, kwargs, ignore = space.model.num_classes, space.model.kwargs, \
            space.groups.ignore
        ckpt = space.model.checkpoint
    elif args.model and args.input_shape:
        source, shape, num_classes, kwargs, ignore, ckpt = (
            args.model, args.input_shape, args.num_classes, {}, (), args.checkpoint)
    else:
        print("autoprune layers: give a SPACE.yaml, or --model and --input-shape",
              file=sys.stderr)
        return 2
    if num_classes is None and source.startswith("builtin:"):
        num_classes = 10
    model = build_model(source, shape, num_classes, kwargs).eval()
    if ckpt:
        load_checkpoint(model, ckpt)
    groups = describe_groups(model, torch.zeros(shape), ignore)
    if args.write_space:
        from autoprune.space_writer import starter_space

        Path(args.write_space).write_text(starter_space(source, shape, groups, num_classes))
        print(f"wrote a starter search space with {len(groups)} groups to {args.write_space}",
              file=sys.stderr)
    if args.json:
        print(json.dumps({"model": source, "input_shape": list(shape),
                          "groups": [g.to_dict() for g in groups]}, indent=2))
    elif not args.write_space:
        _print_groups(groups)
    return 0


def _print_groups(groups: Sequence[GroupInfo]) -> None:
    import pandas as pd

    rows = [{"group": g.name, "type": g.root_type, "channels": g.channels,
             "MACs share": f"{100 * g.macs_share:.1f}%", "layers": len(g.members),
             "members": ", ".join(g.members[:4]) + (" ..." if len(g.members) > 4 else "")}
            for g in groups]
    with pd.option_context("display.max_colwidth", 70, "display.width", 200):
        print(pd.DataFrame(rows).to_string(index=False))
    print(f"\n{len(groups)} groups (the head is never pruned)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autoprune", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    lay = sub.add_parser("layers", help="list the prunable dependency groups of a model")
    lay.add_argument("space", nargs="?", help="a search space YAML (or use --model)")
    lay.add_argument("--model", help="model source, e.g. torchvision:resnet18")
    lay.add_argument("--input-shape", type=_shape, help="e.g. 1,3,224,224")
    lay.add_argument("--num-classes", type=int, default=None)
    lay.add_argument("--checkpoint", default=None)
    lay.add_argument("--json", action="store_true", help="print JSON")
    lay.add_argument("--write-space", metavar="FILE", help="write a starter search space")
    lay.set_defaults(fn=cmd_layers)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args))
    except AutopruneError as e:
        print(f"autoprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
