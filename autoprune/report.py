"""Tables (pandas) and pictures (matplotlib PNG, plotly HTML) of a study's trials and front."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

from autoprune.locks import replacing
from autoprune.pareto import hypervolume_2d, pareto_mask
from autoprune.study import INTERRUPTED, front_numbers, origin, tidy_number

METRIC_COLUMNS = ("accuracy", "proxy_accuracy", "macs_ratio", "params_ratio", "latency_ms",
                  "latency_p90_ms", "speedup", "macs", "params", "finetune_steps", "duration_s")


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, baseline, ratio summary (of the ratios asked),
    metrics, per-group ratios asked (``ratio.<group>``) and channels kept (``kept.<group>``)."""
    front = front_numbers(study)
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.RUNNING, TrialState.WAITING):
            continue
        ratios = [tidy_number(v) for v in t.params.values()]
        row: dict[str, Any] = {
            "trial": t.number,
            "state": ("interrupted" if t.user_attrs.get(INTERRUPTED) else
                      t.user_attrs.get("state", t.state.name.lower())),
            "baseline": bool(t.user_attrs.get("baseline", False)),
            "origin": origin(t.user_attrs),
            "duplicate_of": t.user_attrs.get("duplicate_of"),
            "inherits_trial": t.user_attrs.get("inherits_trial"),
            "pareto": t.number in front,
            "mean_ratio": tidy_number(float(np.mean(ratios))) if ratios else 0.0,
            "min_ratio": float(np.min(ratios)) if ratios else 0.0,
            "max_ratio": float(np.max(ratios)) if ratios else 0.0,
        }
        for key in METRIC_COLUMNS:
            row[key] = t.user_attrs.get(key)
        row["error"] = t.user_attrs.get("error") or None  # the whole traceback (a quoted cell)
        row.update({f"ratio.{k}": tidy_number(v) for k, v in t.params.items()})
        # the channels each group kept: the ratio asked, rounded (pruning.round_to, blocks)
        row.update({f"kept.{k}": int(v) for k, v in
                    (t.user_attrs.get("kept_channels") or {}).items()})
        rows.append(row)
    df = pd.DataFrame(rows)
    # counts and trial numbers: integers, or missing (a failed trial has none; without this a
    # column with a gap reads 44.0)
    kept = [c for c in df.columns if c.startswith("kept.")]
    for col in ("duplicate_of", "inherits_trial", "finetune_steps", "params", *kept):
        if col in df:
            df[col] = pd.to_numeric(df[col]).round().astype("Int64")
    return df


def pareto_frame(study: optuna.Study) -> pd.DataFrame:
    """The current front, most accurate first."""
    df = trials_frame(study)
    if df.empty:
        return df
    return df[df["pareto"]].sort_values("accuracy", ascending=False).reset_index(drop=True)


def summary_columns(df: pd.DataFrame, objectives: Sequence[str] = ()) -> pd.DataFrame:
    """The columns a front table shows (parameters too, when they are an objective)."""
    cols = ["trial", "baseline", "mean_ratio", "accuracy", "proxy_accuracy", "macs_ratio",
            *(["params_ratio"] if "params" in objectives else []), "latency_ms", "speedup"]
    return df[[c for c in cols if c in df.columns]]


def front_hypervolume(df: pd.DataFrame) -> float:
    """Hypervolume of (accuracy, MACs ratio) over the front; reference (0, 1.0)."""
    if df.empty:
        return 0.0
    ok = df[df["pareto"]]
    return hypervolume_2d(ok["accuracy"].to_numpy(float), ok["macs_ratio"].to_numpy(float))


def load_plotting() -> None:
    """Import the plotting libraries (before a search's trials: a Ctrl-C that lands in the
    middle of their first import, after the first trial, left matplotlib half-imported, and
    the interrupted search's last report failed with a traceback)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import plotly.graph_objects  # noqa: F401


def plot_front(df: pd.DataFrame, base: dict[str, Any], out_dir: Path,
               html: bool = True, study: str | None = None) -> list[Path]:
    """Accuracy vs MACs ratio and accuracy vs latency: PNG and (``html``) interactive HTML.

    Every finished trial is a dot, the front is highlighted and joined, the uniform baselines
    are drawn as a line, and the base model is a star.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go

    out_dir.mkdir(parents=True, exist_ok=True)
    done = df[df["state"].isin(["complete", "infeasible"])] if not df.empty else df
    written: list[Path] = []
    for x, label, base_x, stem in (
        ("macs_ratio", "MACs ratio = FLOPs ratio (pruned / base)", 1.0,
         "pareto_accuracy_vs_macs"),
        ("latency_ms", "latency (ms, median)", base.get("latency_ms"),
         "pareto_accuracy_vs_latency"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        page_fig = go.Figure()
        if not done.empty:
            feas = done[done["state"] == "complete"]
            infeas = done[done["state"] == "infeasible"]
            ax.scatter(feas[x], feas["accuracy"], s=18, c="#9aa5b1", label="trials")
            if not infeas.empty:
                ax.scatter(infeas[x], infeas["accuracy"], s=18, marker="x", c="#d08770",
                           label="infeasible (proxy acc.)")
            page_fig.add_scatter(x=feas[x], y=feas["accuracy"], mode="markers", name="trials",
                             text=[f"trial {n}" for n in feas["trial"]])
            study_front = done[done["pareto"]]
            ax.scatter(study_front[x], study_front["accuracy"], s=30, c="#bf1d2d", zorder=3,
                       label="on the study's front (all objectives)")
            page_fig.add_scatter(x=study_front[x], y=study_front["accuracy"], mode="markers",
                             name="on the study's front",
                             text=[f"trial {n}" for n in study_front["trial"]])
            if not feas.empty:  # the 2-D front of this pair of axes, as a line
                pts = feas[["accuracy", x]].to_numpy(float)
                front = feas[pareto_mask(pts, ["maximize", "minimize"])].sort_values(x)
                ax.step(front[x], front["accuracy"], where="post", c="#bf1d2d",
                        label=f"front: accuracy vs {x}")
                page_fig.add_scatter(x=front[x], y=front["accuracy"], mode="lines",
                                 line={"shape": "hv"}, name=f"front: accuracy vs {x}")
            # fine-tuned uniform baselines only: an infeasible one holds its proxy accuracy
            uni = done[done["baseline"] & (done["state"] == "complete")].sort_values(x)
            if not uni.empty:
                ax.plot(uni[x], uni["accuracy"], "--s", c="#2e6fdb", label="uniform ratios")
                page_fig.add_scatter(x=uni[x], y=uni["accuracy"], mode="lines+markers",
                                 name="uniform ratios", line={"dash": "dash"})
        if base_x is not None:
            ax.scatter([base_x], [base["accuracy"]], marker="*", s=160, c="k", label="base model")
            page_fig.add_scatter(x=[base_x], y=[base["accuracy"]], mode="markers",
                                 name="base model",
                             marker={"symbol": "star", "size": 14})
        what = "MACs" if x == "macs_ratio" else "latency"
        title = f"{'study ' + study + ': ' if study else ''}accuracy vs {what}"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        png = out_dir / f"{stem}.png"
        with replacing(png) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        written.append(png)
        if html:  # self-contained (plotly.js embedded: the UI may have no internet), ~5 MB
            page_fig.update_layout(title=title, xaxis_title=label, yaxis_title="accuracy",
                                   template="plotly_white")
            page = out_dir / f"{stem}.html"
            with replacing(page) as tmp:
                page_fig.write_html(str(tmp), include_plotlyjs=True)
            written.append(page)
    return written


def write_tables(study: optuna.Study, out_dir: Path) -> tuple[pd.DataFrame, list[Path]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    df = trials_frame(study)
    trials_csv, pareto_csv = out_dir / "trials.csv", out_dir / "pareto.csv"
    # whole files or the last ones: on a full disk the write had left trials.csv empty
    with replacing(trials_csv) as tmp:
        df.to_csv(tmp, index=False)
    with replacing(pareto_csv) as tmp:
        (df[df["pareto"]] if not df.empty else df).to_csv(tmp, index=False)
    return df, [trials_csv, pareto_csv]


def speed_words(speedup: float) -> str:
    """A speed-up as a reader says it: below 1 (the pruned model timed slower), ``1.61x
    slower``, not ``0.62x faster``."""
    if speedup >= 1:
        return f"{speedup:.2f}x faster"
    return f"{1 / speedup:.2f}x slower" if speedup > 0 else "not timed"


def format_front(front: pd.DataFrame, objectives: Sequence[str] = ()) -> str:
    if front.empty:
        return "(no feasible completed trial yet)"
    with pd.option_context("display.width", 200, "display.float_format", "{:.4f}".format):
        return summary_columns(front, objectives).to_string(index=False)


def plain(value: Any) -> Any:
    """A table cell or attribute as JSON has it: numpy scalars as Python numbers (floats at full
    precision, so a value read back picks the same trial), missing values and NaN as null."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, np.generic):
        return plain(value.item())
    return value


def json_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """A table's rows for ``--json`` output (see :func:`plain`)."""
    return [{k: plain(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]
