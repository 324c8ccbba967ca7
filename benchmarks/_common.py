"""Helpers shared by the benchmark scripts (not a benchmark: ``run_all.py`` skips ``_*.py``)."""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "runs" / "bench"


def environment() -> str:
    """One line naming the machine and the library versions, for a table's header."""
    import onnxruntime
    import torch
    import torch_pruning

    cpu = platform.processor() or platform.machine()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPU cores "
            f"({cpu}), 1-min load average {load:.1f} when written (this benchmark included; "
            f"more than its threads means other processes shared the cores); "
            f"Python {sys.version.split()[0]}; "
            f"torch {torch.__version__}; onnxruntime {onnxruntime.__version__}; "
            f"torch-pruning {torch_pruning.__version__}")


def markdown_table(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    """A GitHub markdown table (no ``tabulate`` dependency); numbers are right-aligned."""
    def cell(v: object) -> str:
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    rows = [[cell(v) for v in row] for row in df.itertuples(index=False)]
    header = [str(c) for c in df.columns]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if n else c.ljust(w)
                                 for c, w, n in zip(cells, widths, numeric, strict=True)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if n else ("-" * (w + 2))
                          for w, n in zip(widths, numeric, strict=True)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def save_table(df: pd.DataFrame, name: str, out_dir: Path, title: str, notes: str = "",
               md_columns: list[str] | None = None) -> str:
    """Write ``<name>.csv`` (every column) and ``<name>.md`` (title, environment, notes, table of
    ``md_columns`` or every column) to ``out_dir``.

    Returns the markdown text.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_dir / f"{name}.csv", index=False)
    table = markdown_table(df[md_columns] if md_columns else df)
    text = f"# {title}\n\n{environment()}\n\n" + (f"{notes}\n\n" if notes else "") \
        + table + "\n"
    (out_dir / f"{name}.md").write_text(text)
    return text
