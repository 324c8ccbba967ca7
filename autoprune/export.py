"""Export a point of the front, and rebuild pruned models from an exported config.

``export_trial`` writes ``prune_config.json`` (schema: ``autoprune/schemas/``), ``model.onnx``,
``weights.pt`` and ``model_card.md``. The architecture is rebuilt from the base model through
:func:`autoprune.prune.replay`, the same pruning record the trial produced, and the trial's own
fine-tuned weights are loaded into it (or, when they were not kept, the trial is re-run with its
seed, which gives the same model).
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

import autoprune
from autoprune.base import BaseMetrics, load_sources, sha256_file
from autoprune.config import SpaceConfig, parse_space
from autoprune.errors import AutopruneError, CheckpointError
from autoprune.measure import count_cost, evaluate, export_onnx
from autoprune.pareto import pick
from autoprune.prune import PruneRecord, replay
from autoprune.rebuild import SCHEMA_VERSION, validate_config
from autoprune.sources import load_checkpoint
from autoprune.sources._models import load_state_dict_strict

ACCURACY_TOLERANCE = 0.002  # same weights, same data: only float summation order may differ
MACS_RTOL = 1e-6  # MACs are counted, not measured: they must match exactly
# ONNX Runtime vs PyTorch outputs on real validation inputs may differ by
# ONNX_ATOL + ONNX_RTOL * (largest |output|): float32 rounding grows with the outputs' scale
# (ONNX Runtime fuses BN into convs and sums in another order). An unpruned efficientnet_b0
# with logits up to 977 differed by 7e-4; an export bug (a wrong op or weight) is off by far more.
ONNX_ATOL = 1e-4
ONNX_RTOL = 1e-3


@dataclass
class ExportResult:
    out_dir: Path
    trial: int
    config: dict[str, Any]
    registered_version: str | None = None


def make_config(space: SpaceConfig, base: BaseMetrics, record: PruneRecord,
                num_classes: int | None, trial_metrics: dict[str, Any],
                source: dict[str, Any], verified: dict[str, Any]) -> dict[str, Any]:
    m = space.model
    return validate_config({
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"autoprune": autoprune.__version__, "torch": torch.__version__,
                     "torch_pruning": tp.__version__},
        "source": source,
        "model": {"source": m.source, "kwargs": m.kwargs, "input_shape": list(m.input_shape),
                  "num_classes": num_classes, "checkpoint":
                  base.checkpoint, "checkpoint_sha256": base.checkpoint_sha256},
        "pruning": {"importance": record.importance, "round_to": record.round_to,
                    "ignore": list(record.ignore), "ratios": record.ratios,
                    "kept_channels": record.kept_channels,
                    "base_channels": record.base_channels,
                    "history": [list(h) for h in record.history]},
        "finetune": space.to_dict()["finetune"],
        "seed": space.search.seed,
        "metrics": {"trial": trial_metrics, "base": {
            "accuracy": base.accuracy, "macs": base.macs, "params": base.params,
            "latency_ms": base.latency_ms, "latency": base.latency}, "verified": verified},
        "files": {"onnx": "model.onnx", "weights": "weights.pt", "model_card": "model_card.md"},
    }, "prune_config.json (as written)")


def verify(model: nn.Module, space: SpaceConfig, data: Any, evaluate_fn: Any,
           logged: dict[str, Any], onnx_path: Path) -> dict[str, Any]:
    """Re-measure the exported model and compare with what the trial logged.

    Raises:
        AutopruneError: accuracy, MACs or ONNX outputs differ beyond the stated tolerances.
    """
    acc = evaluate(model, data.val, "cpu", evaluate_fn)
    macs = count_cost(model, space.model.input_shape).macs
    if abs(acc - float(logged["accuracy"])) > ACCURACY_TOLERANCE:
        raise AutopruneError(f"verification: exported accuracy {acc:.4f} differs from the "
                             f"trial's {logged['accuracy']:.4f} by more than "
                             f"{ACCURACY_TOLERANCE}")
    if abs(macs - float(logged["macs"])) > MACS_RTOL * float(logged["macs"]):
        raise AutopruneError(f"verification: exported MACs {macs:.0f} differ from the trial's "
                             f"{logged['macs']:.0f}")
    import onnxruntime as ort

    x = next(iter(data.val))[0][:16].float()
    with torch.no_grad():
        ref = model(x).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    diff = float(np.abs(out - ref).max())
    scale = float(np.abs(ref).max())
    tol = ONNX_ATOL + ONNX_RTOL * scale
    if not diff <= tol:  # NaN fails too
        raise AutopruneError(f"verification: ONNX Runtime output differs from PyTorch by "
                             f"{diff:.2e} (> {tol:.2e} = {ONNX_ATOL} + {ONNX_RTOL} x the "
                             f"largest |output|, {scale:.3g})")
    return {"accuracy": acc, "macs": macs, "onnx_max_abs_diff": diff,
            "onnx_batch": int(x.shape[0]), "accuracy_tolerance": ACCURACY_TOLERANCE,
            "onnx_atol": ONNX_ATOL, "onnx_rtol": ONNX_RTOL, "onnx_output_scale": scale}


def space_of(study_attrs: dict[str, Any]) -> tuple[SpaceConfig, BaseMetrics]:
    return parse_space(study_attrs["space"]), BaseMetrics.from_dict(study_attrs["base"])


def trial_model(space: SpaceConfig, base: BaseMetrics, study_name: str, number: int,
                ratios: dict[str, float], study: Any = None,
                ) -> tuple[nn.Module, PruneRecord, dict[str, Any], Any]:
    """The trial's fine-tuned model, rebuilt from its record and kept weights (or re-made,
    after the trials it inherited from: ``study`` holds them)."""
    from autoprune.search import study_dir

    model, data, evaluate_fn = load_sources(space)
    if sha256_file(base.checkpoint) != base.checkpoint_sha256:
        raise CheckpointError(f"base checkpoint {base.checkpoint} changed since the search")
    load_checkpoint(model, base.checkpoint)
    tdir = study_dir(space, study_name) / "trials" / str(number)
    example = torch.zeros(space.model.input_shape)
    if (tdir / "weights.pt").exists() and (tdir / "prune_record.json").exists():
        record = PruneRecord.from_dict(json.loads((tdir / "prune_record.json").read_text()))
        pruned = replay(model, example, record)
        state = torch.load(tdir / "weights.pt", map_location="cpu", weights_only=True)
    else:  # weights not kept: re-run the trial with its seed, which is deterministic
        from autoprune.inherit import originals_by_key, rerun
        from autoprune.trial import TrialContext

        ctx = TrialContext(space, model, data, base, [], torch.device("cpu"), evaluate_fn)
        attrs = study.trials[number].user_attrs if study is not None else {}
        result = rerun(ctx, originals_by_key(study) if study is not None else {}, attrs, ratios)
        if result.state_dict is None:
            raise AutopruneError(f"re-running trial {number} failed: {result.error}")
        record = PruneRecord.from_dict(result.record)
        pruned = replay(model, example, record)
        state = result.state_dict
    load_state_dict_strict(pruned, state, f"trial {number} weights")
    return pruned.eval(), record, {"data": data, "evaluate_fn": evaluate_fn}, state


def _cost_column(objectives: list[str]) -> str:
    for obj, col in (("macs", "macs_ratio"), ("latency", "latency_ms"),
                     ("params", "params_ratio")):
        if obj in objectives:
            return col
    return "macs_ratio"


def export_trial(study_name: str, storage_url: str, rule: str, out_dir: str | Path,
                 register: str | None = None, alias: str = "champion") -> ExportResult:
    """Export the front point that ``rule`` picks (see :func:`autoprune.pareto.pick`).

    Args:
        study_name: the study.
        storage_url: its Optuna storage.
        rule: ``knee``, ``max-accuracy``, ``macs<=0.5``, ``latency_ms<=3``, ``accuracy>=0.97``,
            ``trial:N``.
        out_dir: where the files go.
        register: register the model in MLflow's Model Registry under this name.
        alias: the registry alias for the new version.
    """
    from autoprune.report import pareto_frame, summary_columns
    from autoprune.study import load_study

    study = load_study(study_name, storage_url)
    space, base = space_of(study.user_attrs)
    front = pareto_frame(study)
    try:
        number = pick(front, rule, _cost_column(study.user_attrs.get("objectives", [])))
    except ValueError as e:
        table = (summary_columns(front, study.user_attrs.get("objectives", [])).to_string(
            index=False) if not front.empty else "(empty)")
        raise AutopruneError(f"{e}\nthe front of study {study_name!r}:\n{table}") from None
    trial = study.trials[number]
    model, record, extra, state = trial_model(space, base, study_name, number,
                                              dict(trial.params), study)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "model.onnx"
    try:
        export_onnx(model, space.model.input_shape, onnx_path)
        verified = verify(model, space, extra["data"], extra["evaluate_fn"], trial.user_attrs,
                          onnx_path)
    except BaseException:  # leave no unverified model behind for a pipeline to pick up
        for f in (onnx_path, onnx_path.with_name(onnx_path.name + ".data")):
            f.unlink(missing_ok=True)
        raise
    torch.save(state, out / "weights.pt")
    keys = ("accuracy", "proxy_accuracy", "macs", "macs_ratio", "params", "params_ratio",
            "latency_ms", "latency_p90_ms", "speedup", "finetune_steps")
    metrics = {k: trial.user_attrs.get(k) for k in keys}
    run_id = _trial_run_id(space, study_name, number)
    source = {"study": study_name, "trial": number, "pick": rule, "mlflow_run_id": run_id,
              "tracking_uri": space.tracking_uri}
    num_classes = space.model.num_classes or extra["data"].num_classes
    config = make_config(space, base, record, num_classes, metrics, source, verified)
    (out / "prune_config.json").write_text(json.dumps(config, indent=2))
    (out / "model_card.md").write_text(model_card(config, front, number, space))
    version = None
    if register:
        from autoprune.registry import register_model

        version = register_model(space.tracking_uri, run_id, register, alias, model,
                                 onnx_path, space.model.input_shape)
    return ExportResult(out, number, config, version)


def _trial_run_id(space: SpaceConfig, study: str, number: int) -> str | None:
    from autoprune.tracking import Tracker, default_artifact_dir

    tracker = Tracker(space.tracking_uri, space.experiment_name, study,
                      default_artifact_dir(space.runs_dir))
    for run in tracker.child_runs():
        if run.data.tags.get("autoprune.trial") == str(number):
            return str(run.info.run_id)
    return None


def model_card(config: dict[str, Any], front: Any, number: int, space: SpaceConfig) -> str:
    t, b = config["metrics"]["trial"], config["metrics"]["base"]
    p = config["pruning"]
    rank = front.sort_values("accuracy", ascending=False)["trial"].tolist().index(number) + 1
    lat = b.get("latency") or {}
    rows = [
        ("accuracy", f"{t['accuracy']:.4f}", f"{b['accuracy']:.4f}"),
        ("MACs", f"{t['macs'] / 1e6:.3f} M ({t['macs_ratio']:.3f}x)", f"{b['macs'] / 1e6:.3f} M"),
        ("FLOPs", f"{2 * t['macs'] / 1e6:.3f} M", f"{2 * b['macs'] / 1e6:.3f} M"),
        ("parameters", f"{t['params']:,} ({t['params_ratio']:.3f}x)", f"{b['params']:,}"),
        ("latency (median)", f"{t['latency_ms']:.3f} ms ({t['speedup']:.2f}x faster)",
         f"{b['latency_ms']:.3f} ms"),
    ]
    table = "\n".join(f"| {a} | {x} | {y} |" for a, x, y in rows)
    groups = "\n".join(f"| `{g}` | {r:.2f} | {p['kept_channels'][g]} / {p['base_channels'][g]} |"
                       for g, r in p["ratios"].items())
    src = config["source"]
    return f"""# Pruned {config['model']['source']} (study `{src['study']}`, trial {number})

A structurally pruned copy of `{config['model']['source']}`: channels were removed, so the
model is physically smaller. It was picked from the Pareto front with `--pick {src['pick']}`
(front point {rank} of {len(front)}, by accuracy).

| metric | pruned | base |
|---|---|---|
{table}

Latency: {lat.get('runtime')} on {lat.get('device')}, {lat.get('threads')} thread(s), batch
{lat.get('batch_size')}, input {config['model']['input_shape'][1:]}, {lat.get('warmup')} warm-up
and {lat.get('repeats')} timed runs. Verified at export: accuracy
{config['metrics']['verified']['accuracy']:.4f}, ONNX Runtime vs PyTorch max abs difference
{config['metrics']['verified']['onnx_max_abs_diff']:.1e}.

## How it was made
- Base checkpoint SHA-256 `{config['model']['checkpoint_sha256']}`.
- Importance `{p['importance']}`, kept channels rounded to multiples of {p['round_to']}.
- Fine-tuned briefly: {config['finetune']}; seed {config['seed']}.
- Data: `{space.data.source}`.

| group | ratio | kept / base channels |
|---|---|---|
{groups}

## Files
- `model.onnx`: dynamic batch axis, input `input`, output `output`.
- `weights.pt`: the pruned model's state dict; rebuild with
  `autoprune.load_pruned("prune_config.json", "weights.pt")`.
- `prune_config.json`: schema version {config['schema_version']}, validated on read.
"""
