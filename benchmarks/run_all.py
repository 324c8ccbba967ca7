"""Run every benchmark script in this folder with this Python; fail if any fails.

A benchmark is any ``benchmarks/*.py`` except this file and helpers whose names start with
``_``. Each runs in its own process from the repository root, one after another (timings must
not compete for the cores); ``--quick`` is passed on to every script, so each benchmark accepts
it. All scripts run even after a failure; the exit status is 1 if any failed::

    .venv/bin/python benchmarks/run_all.py --quick
    .venv/bin/python benchmarks/run_all.py -k latency
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent


def discover(pattern: str | None = None) -> list[Path]:
    """Benchmark scripts, sorted by name; ``pattern`` keeps those whose name contains it."""
    scripts = [p for p in sorted(HERE.glob("*.py"))
               if p.name != Path(__file__).name and not p.name.startswith("_")]
    return [p for p in scripts if pattern is None or pattern in p.stem]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument("-k", dest="pattern", help="only scripts whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    scripts = discover(args.pattern)
    if args.list:
        print("\n".join(str(p.relative_to(HERE.parent)) for p in scripts))
        return 0
    if not scripts:
        print(f"run_all: no benchmark matches {args.pattern!r}", file=sys.stderr)
        return 1
    results: list[tuple[str, int, float]] = []
    for script in scripts:
        cmd = [sys.executable, str(script), *(["--quick"] if args.quick else [])]
        print(f"\n=== {script.name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=HERE.parent)
        results.append((script.name, rc, time.perf_counter() - t0))
    print("\n=== summary")
    for name, rc, seconds in results:
        print(f"{'ok    ' if rc == 0 else f'FAILED (exit {rc})'}  {name}  {seconds:.1f} s")
    failed = [name for name, rc, _s in results if rc != 0]
    if failed:
        print(f"run_all: {len(failed)} of {len(results)} benchmarks failed: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
