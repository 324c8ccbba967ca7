"""Export a point of the front, and rebuild pruned models from an exported config.

``export_trial`` writes ``prune_config.json`` (schema: ``autoprune/schemas/``), ``model.onnx``,
``weights.pt`` and ``model_card.md``. The architecture is rebuilt from the base model through
:func:`autoprune.prune.replay`, the same pruning record the trial produced, and the trial's own
fine-tuned weights are loaded into it (or, when they were not kept, the trial is re-run with its
seed, which gives the same model).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as _dt
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
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
from autoprune.errors import AutopruneError, CheckpointError, environment_error, first_line
from autoprune.measure import INPUT_DTYPES, count_cost, evaluate, example_input, export_onnx
from autoprune.pareto import pick
from autoprune.prune import PruneRecord, replay
from autoprune.quiet import quieter
from autoprune.rebuild import SCHEMA_VERSION, validate_config
from autoprune.report import speed_words
from autoprune.sources import load_checkpoint
from autoprune.sources._models import load_state_dict_strict

ACCURACY_TOLERANCE = 0.002  # same weights, same data: only float summation order may differ
MACS_RTOL = 1e-6  # MACs are counted, not measured: they must match exactly
# ONNX Runtime vs PyTorch outputs on real validation inputs may differ by
# ONNX_RTOL x (largest |output|) + ONNX_NOISE x (PyTorch's own float32 rounding on those inputs,
# measured against a float64 run of the same model): ONNX Runtime fuses BN into convs and sums
# in another order, so it rounds differently, by about as much as PyTorch's float32 does
# (0.8x to 1.8x on 8 torchvision models). An unpruned efficientnet_b0 with logits up to 977
# differed by 7e-4. A fixed absolute term (1e-4 before) let any export pass for a model whose
# outputs are smaller (an untrained mobilenet_v2's are about 1e-9); the float64 run scales it.
# ONNX_ATOL is used in its place only where the model cannot run in float64.
ONNX_RTOL = 1e-3
ONNX_NOISE = 100.0
ONNX_ATOL = 1e-4


@dataclass
class ExportResult:
    out_dir: Path
    trial: int
    config: dict[str, Any]
    registered_version: str | None = None


def make_config(space: SpaceConfig, base: BaseMetrics, record: PruneRecord,
                num_classes: int | None, trial_metrics: dict[str, Any],
                source: dict[str, Any], verified: dict[str, Any],
                files: dict[str, str],
                preprocessing: dict[str, Any] | None = None) -> dict[str, Any]:
    m = space.model
    from autoprune.base import code_digest

    code = code_digest(m.source)
    return validate_config({
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"autoprune": autoprune.__version__, "torch": torch.__version__,
                     "torch_pruning": tp.__version__},
        "source": source,
        "model": {"source": m.source, "kwargs": m.kwargs, "input_shape": list(m.input_shape),
                  "input_dtype": m.input_dtype, "num_classes": num_classes, "checkpoint":
                  os.path.abspath(base.checkpoint), "checkpoint_sha256": base.checkpoint_sha256,
                  **({"code_digest": code} if code else {})},
        # what the model was trained and scored on: a deployment feeds it the same
        "data": {"source": space.data.source, "preprocessing": preprocessing},
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
        "files": {**files, "model_card": "model_card.md"},
    }, "prune_config.json (as written)")


def export_program(model: nn.Module, input_shape: tuple[int, ...], path: Path,
                   dtype: str = "float32") -> Path:
    """The model as a self-contained PyTorch program (``torch.export``, dynamic batch axis):
    ``torch.export.load(path).module()`` runs it with nothing but torch installed (no
    autoprune, Torch-Pruning or model source code)."""
    import copy

    m = copy.deepcopy(model).cpu().eval()
    example = example_input(input_shape, dtype, random=True, batch=max(2, input_shape[0]))
    batch = torch.export.Dim("batch", min=1)
    # a failing torch.export prints the traced graph (about 20 lines for a small model) and
    # torch's warnings before it raises; the caller's one-line warning says what happened
    with torch.no_grad(), quieter(logging.ERROR, "torch"), \
            contextlib.redirect_stderr(io.StringIO()):
        program = torch.export.export(m, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


def float32_noise(model: nn.Module, x: torch.Tensor, ref: np.ndarray) -> float | None:
    """PyTorch's own rounding on ``x``: the largest difference of ``ref`` (float32) from a
    float64 run of a copy of ``model``; None where the model cannot run in float64 (a cast to
    float32 inside it, an op without a float64 kernel). Integer inputs (token ids) go in as
    they are."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = copy.deepcopy(model).double()(x.double() if x.is_floating_point() else x)
    except Exception:  # noqa: BLE001 - no float64 run: the fixed tolerance applies
        return None
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float64 or out.shape != ref.shape:
        return None
    return float(np.abs(out.numpy() - ref.astype(np.float64)).max())


def tolerance(ref: np.ndarray, noise: float | None) -> tuple[float, str]:
    """The largest difference allowed from PyTorch's ``ref`` outputs, and how it was made."""
    scale = float(np.abs(ref).max())
    if noise is None:
        return (ONNX_ATOL + ONNX_RTOL * scale,
                f"{ONNX_ATOL} + {ONNX_RTOL} x the largest |output|, {scale:.3g}")
    return (ONNX_NOISE * noise + ONNX_RTOL * scale,
            f"{ONNX_NOISE:g} x PyTorch's own float32 rounding, {noise:.3g} (against float64), "
            f"+ {ONNX_RTOL} x the largest |output|, {scale:.3g}")


def _max_diff(out: np.ndarray, ref: np.ndarray, what: str, tol: tuple[float, str]) -> float:
    """The largest difference of ``out`` from PyTorch's ``ref``; beyond ``tol``, an error."""
    diff = float(np.abs(out.astype(np.float64) - ref.astype(np.float64)).max())
    if not diff <= tol[0]:  # NaN fails too
        raise AutopruneError(f"verification: {what} output differs from PyTorch by "
                             f"{diff:.2e} (> {tol[0]:.2e} = {tol[1]})")
    return diff


def verify(model: nn.Module, space: SpaceConfig, data: Any, evaluate_fn: Any,
           logged: dict[str, Any], onnx_path: Path,
           program_path: Path | None = None) -> dict[str, Any]:
    """Re-measure the exported model and compare with what the trial logged.

    Raises:
        AutopruneError: accuracy, MACs or ONNX outputs differ beyond the stated tolerances.
    """
    acc = evaluate(model, data.val, "cpu", evaluate_fn)
    macs = count_cost(model, space.model.input_shape, space.model.input_dtype).macs
    if abs(acc - float(logged["accuracy"])) > ACCURACY_TOLERANCE:
        raise AutopruneError(f"verification: exported accuracy {acc:.4f} differs from the "
                             f"trial's {logged['accuracy']:.4f} by more than "
                             f"{ACCURACY_TOLERANCE}")
    if abs(macs - float(logged["macs"])) > MACS_RTOL * float(logged["macs"]):
        raise AutopruneError(f"verification: exported MACs {macs:.0f} differ from the trial's "
                             f"{logged['macs']:.0f}")
    x = next(iter(data.val))[0][:16].to(INPUT_DTYPES[space.model.input_dtype])
    return {"accuracy": acc, "macs": macs, "accuracy_tolerance": ACCURACY_TOLERANCE,
            **check_formats(model, x, onnx_path, program_path)}


def check_formats(model: nn.Module, x: torch.Tensor, onnx_path: Path,
                  program_path: Path | None = None) -> dict[str, Any]:
    """ONNX Runtime's (and the torch.export program's) outputs on ``x`` against PyTorch's."""
    import onnxruntime as ort

    with torch.no_grad():
        ref = model(x).numpy()
    noise = float32_noise(model, x, ref)
    tol = tolerance(ref, noise)
    try:
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    except Exception as e:  # noqa: BLE001 - ONNX Runtime's refusal, named (sweep X)
        raise AutopruneError(f"verification: ONNX Runtime cannot run the exported model.onnx "
                             f"({type(e).__name__}: {first_line(e, 200)}); allowed: a model "
                             "the ONNX exporter writes as ONNX Runtime reads it (a forward "
                             "under torch.autocast to bfloat16 is not)") from e
    checked = {"onnx_max_abs_diff": _max_diff(out, ref, "ONNX Runtime", tol),
               "onnx_batch": int(x.shape[0]), "onnx_tolerance": tol[0],
               "onnx_tolerance_rule": tol[1], "onnx_float32_noise": noise,
               "onnx_output_scale": float(np.abs(ref).max())}
    if program_path is not None:
        with torch.no_grad():
            got = torch.export.load(str(program_path)).module()(x).numpy()
        checked["program_max_abs_diff"] = _max_diff(got, ref, "the torch.export program", tol)
    return checked


def check_out_dir(out_dir: str | Path) -> Path:
    """``--out``: a directory, new or existing, that this process can write (checked before
    any work)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise AutopruneError(f"--out: got {str(out)!r}, a file; allowed: a directory (new or "
                             "existing)")
    there = out.absolute()
    while not there.exists():  # the folder that a new --out would be made in
        there = there.parent
    if not there.is_dir():
        raise AutopruneError(f"--out: got {str(out)!r}, inside {str(there)!r}, a file; allowed: "
                             "a directory (new or existing)")
    if not os.access(there, os.W_OK | os.X_OK):
        raise AutopruneError(f"--out: got {str(out)!r}, but {str(there)!r} cannot be written "
                             "here (read-only or not ours); allowed: a writable directory")
    return out


#: Every file an export or ``apply`` may write into ``--out``.
OUT_FILES = ("prune_config.json", "model_card.md", "model.onnx", "model.onnx.data", "model.pt2",
             "weights.pt")


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A staging folder inside ``out`` for an export's files. They move into ``out`` only when
    all are written and verified, and replace every file of an earlier export there (a
    ``model.pt2`` this model did not get is removed): a pipeline never finds two exports' files
    side by side, and a failed export leaves the one before intact. Other files stay."""
    out.mkdir(parents=True, exist_ok=True)
    for left in out.glob(f"{STAGING}*"):  # from an export that was killed
        pid = left.name.removeprefix(STAGING).split("-", 1)[0]
        if not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(left, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGING}{os.getpid()}-", dir=out))
    try:
        with _terminate_as_exit():
            yield stage
            for name in OUT_FILES:
                if (stage / name).exists():
                    os.replace(stage / name, out / name)
                else:
                    (out / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


STAGING = ".autoprune-staging-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _terminate_as_exit() -> contextlib.AbstractContextManager[None]:
    """SIGTERM (a pipeline's timeout) and SIGHUP end the export as an exception would, so the
    staging folder is removed; a ``kill -9`` leaves it, for the next export there to remove."""
    import signal

    from autoprune.signals import handling

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    return handling((signal.SIGTERM, signal.SIGHUP), stop)


def write_model_files(model: nn.Module, input_shape: tuple[int, ...], out: Path,
                      check: Callable[[Path, Path | None], dict[str, Any]],
                      dtype: str = "float32") -> tuple[dict[str, str], dict[str, Any]]:
    """Write ``model.onnx``, ``model.pt2`` (when ``torch.export`` can take the model) and
    ``weights.pt`` into ``out`` (a :func:`staged` folder), for export and ``apply`` alike;
    ``check(onnx, pt2)`` verifies them first.

    Returns:
        The files written (by kind) and what ``check`` returned.
    """
    onnx_path, program_path = out / "model.onnx", out / "model.pt2"
    files = {"onnx": onnx_path.name, "weights": "weights.pt"}
    export_onnx(model, input_shape, onnx_path, dtype=dtype)
    # model.pt2 and weights.pt each hold about the ONNX file's weights. On a disk without room
    # for them, torch's zip writer aborted the process from a destructor (no cleanup, the
    # staging folder left on the full disk) after a warning that blamed torch.export
    need, free = 2 * onnx_path.stat().st_size + (1 << 20), shutil.disk_usage(out).free
    if free < need:
        raise AutopruneError(f"--out: no space left on device for the model files: "
                             f"{free / 1e6:.1f} MB free under {out.parent}, about "
                             f"{need / 1e6:.1f} MB needed for model.pt2 and weights.pt")
    try:
        export_program(model, input_shape, program_path, dtype)
        files["program"] = program_path.name
    except Exception as e:  # noqa: BLE001 - ONNX and weights.pt still serve
        if environment_error(e):  # a full disk is no model that torch.export cannot take
            raise
        program_path.unlink(missing_ok=True)
        warnings.warn(f"model.pt2 not written: torch.export could not take the model "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                      stacklevel=2)
    verified = check(onnx_path, program_path if "program" in files else None)
    torch.save(model.state_dict(), out / files["weights"])
    return files, verified


def space_of(study_attrs: dict[str, Any], storage_url: str | None = None,
             runs_dir: str | None = None) -> tuple[SpaceConfig, BaseMetrics]:
    """The study's space and base model, with the paths the search recorded moved to where its
    runs directory is now (see :func:`runs_dir_now`)."""
    space = parse_space(study_attrs["space"], check=False)  # validated when the study began
    base = BaseMetrics.from_dict(study_attrs["base"])
    # the user's modules (model.source: my_project.models:build) are imported from the
    # current directory first, then from the one the search ran in (export from anywhere)
    where = study_attrs.get("import_dir")
    now = runs_dir_now(space, storage_url, runs_dir, where)
    root = _project_root(space, now)  # where the search ran, if the project moved since
    for folder in (where, str(root) if root else None):
        if folder and Path(folder).is_dir() and folder not in sys.path:
            sys.path.append(folder)
            break
    moved = _moved(base.checkpoint, space.runs_dir, now)
    if not Path(moved).is_file():
        moved = _moved_with_project(moved, base.checkpoint_sha256, where, space, root)
    kind, _, folder = space.data.source.partition(":")
    if kind == "imagefolder" and not Path(folder).is_absolute() and not Path(folder).is_dir():
        # a relative data folder is the search's folder's, as its modules are (sweep W)
        found = next((Path(r) / folder for r in (where, root) if r and
                      (Path(r) / folder).is_dir()), None)
        if found is not None:
            space = space.replace(data=dataclasses.replace(
                space.data, source=f"imagefolder:{found}"))
    return (dataclasses.replace(space, runs_dir=now),
            dataclasses.replace(base, checkpoint=moved))


def _project_root(space: SpaceConfig, runs_now: str) -> Path | None:
    """The directory the search ran in, as the runs directory now places it: the runs
    directory recorded relative to it (``runs``), found now at ``runs_now``."""
    runs = Path(space.runs_dir)
    now = Path(runs_now).resolve()
    if runs.is_absolute() or now.parts[-len(runs.parts):] != runs.parts:
        return None
    return now.parents[len(runs.parts) - 1]


def _moved_with_project(checkpoint: str, digest: str | None, ran_in: str | None,
                        space: SpaceConfig, root: Path | None) -> str:
    """A user's checkpoint, outside the runs directory, where the project it was in is now:
    a project copied from a cluster to a laptop (code, checkpoint and runs/ together) had
    every export refused, the checkpoint being right there. A file found by the path
    relative to the directory the search ran in (from here, or from the project root the runs
    directory now gives), or by ``model.checkpoint`` as the space wrote it, is taken when its
    SHA-256 is the recorded one."""
    from autoprune.base import sha256_file

    if not digest:
        return checkpoint
    roots = [Path.cwd(), *([root] if root else [])]
    tails = [Path(space.model.checkpoint)] if space.model.checkpoint else []
    if ran_in:
        try:
            tails.insert(0, Path(checkpoint).relative_to(ran_in))
        except ValueError:
            pass
    for folder in roots:
        for tail in tails:
            found = folder / tail
            if found.is_file() and sha256_file(found) == digest:
                print(f"autoprune: the study's base checkpoint {checkpoint} is not there; "
                      f"using {found}, the same file (SHA-256 {digest[:12]}...)",
                      file=sys.stderr)
                return str(found)
    return checkpoint


def runs_dir_now(space: SpaceConfig, storage_url: str | None, runs_dir: str | None,
                 ran_in: str | None = None) -> str:
    """Where the study's runs directory is now: the one given (``--runs-dir``); else, when the
    study lives in its default SQLite store (``<runs_dir>/optuna.db``), that file's folder;
    else the one the search recorded: a relative one is read from the current directory, or
    from the directory the search ran in (``ran_in``) when it is not here (with
    ``search.storage`` set, the search's own export hint, run from elsewhere, called the kept
    weights deleted and fine-tuned the trial again)."""
    if runs_dir:
        return str(runs_dir)
    if space.search.storage is None and storage_url and storage_url.startswith("sqlite:///"):
        return str(Path(storage_url.removeprefix("sqlite:///")).parent)
    recorded = Path(space.runs_dir)
    if not recorded.is_absolute() and not recorded.is_dir() and ran_in and \
            (Path(ran_in) / recorded).is_dir():
        return str(Path(ran_in) / recorded)
    return space.runs_dir


def _moved(path: str, old_root: str, new_root: str) -> str:
    """``path``, when it lies under ``old_root``, moved under ``new_root``."""
    try:
        return str(Path(new_root) / Path(path).relative_to(old_root))
    except ValueError:
        return path


def _missing_base(space: SpaceConfig, checkpoint: str) -> str:
    """Why the study's base checkpoint is not found, and what would find it: a trained base
    lives in the runs directory (``--runs-dir`` moves it); a user's ``model.checkpoint`` outside
    it is read from the path the search was given."""
    where = f"the study's base checkpoint {checkpoint} is not there (looked from {Path.cwd()})"
    inside = Path(os.path.abspath(checkpoint)).is_relative_to(os.path.abspath(space.runs_dir))
    if inside:
        return (f"{where}; the runs directory in use is {space.runs_dir}: run export from the "
                "directory the search ran in, or pass --runs-dir, the study's runs directory "
                "(where it keeps base/ and studies/)")
    if not Path(checkpoint).is_absolute():  # as older studies recorded it
        return (f"{where}; it is the model.checkpoint the search was given, by a path relative "
                "to the directory the search ran in: run export from there")
    return (f"{where}; it is the model.checkpoint the search was given, outside its runs "
            "directory: put that file back at this path")


def trial_model(space: SpaceConfig, base: BaseMetrics, study_name: str, number: int,
                ratios: dict[str, float], study: Any = None,
                ) -> tuple[nn.Module, PruneRecord, dict[str, Any], Any]:
    """The trial's fine-tuned model, rebuilt from its record and kept weights (or re-made,
    after the trials it inherited from: ``study`` holds them)."""
    from autoprune.search import study_dir

    model, data, evaluate_fn = load_sources(space)
    if not Path(base.checkpoint).is_file():
        raise CheckpointError(_missing_base(space, base.checkpoint))
    if sha256_file(base.checkpoint) != base.checkpoint_sha256:
        raise CheckpointError(f"base checkpoint {base.checkpoint} changed since the search")
    load_checkpoint(model, base.checkpoint)
    tdir = study_dir(space, study_name) / "trials" / str(number)
    example = example_input(space.model.input_shape, space.model.input_dtype)
    from autoprune.inherit import read_kept

    kept = read_kept(tdir)
    if kept is not None:
        record = PruneRecord.from_dict(kept[0])
        pruned = replay(model, example, record)
        state = kept[1]
    else:  # weights not kept (or unreadable): re-run the trial with its seed, deterministic
        from autoprune.inherit import ancestors, originals_by_key, rerun
        from autoprune.trial import TrialContext

        ctx = TrialContext(space, model, data, base, [], torch.device("cpu"), evaluate_fn)
        attrs = study.trials[number].user_attrs if study is not None else {}
        originals = originals_by_key(study) if study is not None else {}
        first = ancestors(originals, attrs)
        # a fine-tune each, on this machine's CPU: minutes on a large model, said beforehand
        why = (f"missing from {tdir} (search.keep_models was on: deleted, or lost to a full "
               "disk)" if space.search.keep_models else
               f"not kept (search.keep_models keeps them, under {tdir})")
        print(f"autoprune: trial {number}'s fine-tuned weights are {why}: "
              "re-running it with its seed"
              + (f", after the {len(first)} trial(s) whose fine-tuned models it was pruned "
                 f"from, oldest first: {first}" if first else "")
              + f" ({len(first) + 1} fine-tune(s))", file=sys.stderr)
        result = rerun(ctx, originals, attrs, ratios)
        if result.state_dict is None:
            raise AutopruneError(f"re-running trial {number} ended {result.state}: "
                                 f"{result.error or 'no model'}")
        record = PruneRecord.from_dict(result.record)
        pruned = replay(model, example, record)
        state = result.state_dict
    load_state_dict_strict(pruned, state, f"trial {number} weights")
    return pruned.eval(), record, {"data": data, "evaluate_fn": evaluate_fn,
                                   "rerun": kept is None}, state


def _threads_unknown(attrs: Mapping[str, Any], extra: Mapping[str, Any]) -> str:
    """For a re-made trial that does not record its CPU threads (made before 0.2.0): the
    thread count changes floating-point sums, and a --jobs N trial had fewer."""
    if not extra.get("rerun") or attrs.get("threads"):
        return ""
    return (f"; the trial was re-run (its weights were not kept) with {torch.get_num_threads()}"
            " CPU threads, and it does not record how many it had (an autoprune before 0.2.0 "
            "made it): if its search ran several trials at once (--jobs N), export again with "
            "OMP_NUM_THREADS set to the threads each trial had (the cores / N)")


def _trial_state(study: Any, rule: str) -> str:
    """For ``trial:N`` off the front: what trial N is."""
    from autoprune.study import front_numbers

    found = re.fullmatch(r"trial:(-?\d+)", rule.strip())
    if found is None or not study.trials:
        return ""
    n = int(found.group(1))
    if not 0 <= n < len(study.trials):
        waiting = sum(t.state.name == "WAITING" for t in study.trials)
        return (f" (the study has no trial {n}: its trials are 0-{len(study.trials) - 1}"
                f"{f', {waiting} of them queued, not run' if waiting else ''})")
    t = study.trials[n]
    state = t.user_attrs.get("state", t.state.name.lower())
    if state == "complete" and t.user_attrs.get("duplicate_of") is not None:
        first = t.user_attrs["duplicate_of"]
        return (f" (it is a duplicate of trial {first}, the same model: trial:{first} "
                "exports it)" if first in front_numbers(study) else
                f" (it is a duplicate of trial {first}, dominated)")
    if state == "waiting":
        return " (it is queued, not run yet)"
    return f" (it is {state}{', dominated' if state == 'complete' else ''})"


def _cost_column(objectives: list[str]) -> str:
    for obj, col in (("macs", "macs_ratio"), ("latency", "latency_ms"),
                     ("params", "params_ratio")):
        if obj in objectives:
            return col
    return "macs_ratio"


def export_trial(study_name: str, storage_url: str, rule: str, out_dir: str | Path,
                 register: str | None = None, alias: str = "champion",
                 runs_dir: str | None = None) -> ExportResult:
    """Export the front point that ``rule`` picks (see :func:`autoprune.pareto.pick`).

    Args:
        study_name: the study.
        storage_url: its Optuna storage.
        rule: ``knee``, ``max-accuracy``, ``macs<=0.5``, ``latency_ms<=3``, ``accuracy>=0.97``,
            ``trial:N``.
        out_dir: where the files go.
        register: register the model in MLflow's Model Registry under this name.
        alias: the registry alias for the new version.
        runs_dir: where the study's runs directory is now (default: see
            :func:`runs_dir_now`); base checkpoint, kept weights and the default MLflow store
            are found there, whatever directory the search ran in.
    """
    from autoprune.registry import check_names
    from autoprune.report import format_front, pareto_frame
    from autoprune.study import load_study

    check_names(register, alias)
    study = load_study(study_name, storage_url)
    space, base = space_of(study.user_attrs, storage_url, runs_dir)
    front = pareto_frame(study)
    try:
        number = pick(front, rule, _cost_column(study.user_attrs.get("objectives", [])))
    except ValueError as e:
        table = (format_front(front, study.user_attrs.get("objectives", []))
                 if not front.empty else "(empty)")
        raise AutopruneError(f"{e}{_trial_state(study, rule)}\nthe front of study "
                             f"{study_name!r}:\n{table}") from None
    trial = study.trials[number]
    found = _trial_run(space, study_name, number, register,
                       study.user_attrs.get("parent_run_id"))
    run_id = found[0] if found else None
    if register and found:
        _check_artifacts_here(space, found[1])
    if register and run_id is None and _missing_store(space.tracking_uri):
        raise AutopruneError(f"--register: the study's MLflow store {space.tracking_uri} is not "
                             f"there (looked from {Path.cwd()}); pass --runs-dir, the study's "
                             "runs directory")
    experiment_id = _export_experiment(space, study_name, number) \
        if register and run_id is None else None
    out = check_out_dir(out_dir)
    model, record, extra, _ = trial_model(space, base, study_name, number,
                                              dict(trial.params), study)
    def checked(onnx: Path, program: Path | None) -> dict[str, Any]:
        try:
            return verify(model, space, extra["data"], extra["evaluate_fn"], trial.user_attrs,
                          onnx, program)
        except AutopruneError as e:
            raise AutopruneError(f"{e}{_code_changed(study, space)}"
                                 f"{_threads_unknown(trial.user_attrs, extra)}") from None

    with staged(out) as stage:
        files, verified = write_model_files(model, space.model.input_shape, stage, checked,
                                            space.model.input_dtype)
        keys = ("accuracy", "proxy_accuracy", "macs", "macs_ratio", "params", "params_ratio",
                "latency_ms", "latency_p90_ms", "speedup", "finetune_steps")
        metrics = {k: trial.user_attrs.get(k) for k in keys}
        from autoprune.tracking import absolute_uri

        source = {"study": study_name, "trial": number, "pick": rule, "mlflow_run_id": run_id,
                  "tracking_uri": absolute_uri(space.tracking_uri)}
        num_classes = space.model.num_classes or extra["data"].num_classes
        config = make_config(space, base, record, num_classes, metrics, source, verified, files,
                             extra["data"].preprocessing)
        (stage / "prune_config.json").write_text(json.dumps(config, indent=2))
        with torch.no_grad():
            dense = model.eval()(example_input(space.model.input_shape,
                                               space.model.input_dtype)).ndim > 2
        (stage / "model_card.md").write_text(model_card(config, front, number, space, dense))
    onnx_path = out / files["onnx"]
    version = None
    if register:
        from autoprune.registry import register_model
        from autoprune.tracking import STUDY_TAG

        version = register_model(
            space.tracking_uri, run_id, register, alias, model, onnx_path,
            space.model.input_shape, space.model.input_dtype, metadata={"data": config["data"]},
            experiment_id=experiment_id, torch_flavour="program" in files,
            run_tags={STUDY_TAG: study_name, "autoprune.role": "export",
                      "autoprune.exported_trial": str(number),
                      "mlflow.runName": f"{study_name}/export-trial-{number}"})
    return ExportResult(out, number, config, version)


def _missing_store(uri: str) -> bool:
    return uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file()


def _code_changed(study: Any, space: SpaceConfig) -> str:
    """Why an export may not match its trial: the user's code edited since the search."""
    from autoprune.study import code_digests, code_sources

    was = study.user_attrs.get("code") or {}
    now = code_digests(space)
    edited = [k for k in was if now.get(k) != was[k]]
    if not edited:
        return ""
    named = code_sources(space)
    return ("; the code behind " + ", ".join(f"{k} ({named.get(k)!r})" for k in edited)
            + " changed since the search, and export rebuilds the trial through the code as it "
            "is now: restore the code the study was made with")


def _trial_run(space: SpaceConfig, study: str, number: int, register: str | None,
               parent: str | None = None) -> tuple[str, str] | None:
    """:func:`_trial_run_id`, when the study's MLflow store answers. A server that does not
    is an error with ``--register``; without it, a warning: the files need no MLflow (the
    config's ``source.mlflow_run_id`` is then null)."""
    from mlflow.exceptions import MlflowException

    from autoprune.tracking import check_server

    try:
        check_server(space.tracking_uri, timeout=5.0)
        return _trial_run_id(space, study, number, parent)
    except (AutopruneError, MlflowException) as e:
        why = (f"{space.tracking_uri}: {e.message.splitlines()[0] if e.message else e}"
               if isinstance(e, MlflowException) else f"{space.tracking_uri} does not answer")
        if register:
            raise AutopruneError(f"--register: the study's MLflow store cannot be reached "
                                 f"({why}); allowed: a running store, or an export without "
                                 "--register (its files need no MLflow)") from None
        warnings.warn(f"the study's MLflow store cannot be reached ({why}); the files are "
                      "written without the trial's MLflow run (source.mlflow_run_id: null)",
                      stacklevel=3)
        return None


def _export_experiment(space: SpaceConfig, study: str, number: int) -> str:
    """The study's MLflow experiment, for ``--register`` of a trial that has no run in it
    (deleted in the UI, or missed while the server was down): the model is logged on a run of
    the study's own, with its artifacts, not in MLflow's Default experiment."""
    from autoprune.tracking import Tracker, default_artifact_dir

    tracker = Tracker(space.tracking_uri, space.experiment_name, study,
                      default_artifact_dir(space.runs_dir))
    # a copied runs directory's store keeps the old folder as the experiment's artifact root
    _check_artifacts_here(space, tracker.client.get_experiment(
        tracker.experiment_id).artifact_location)
    warnings.warn(f"--register: trial {number} of study {study!r} has no run in MLflow "
                  f"experiment {space.experiment_name!r} (deleted, or missed while the server "
                  f"was down); the model is logged on a new run, {study}/export-trial-{number}",
                  stacklevel=3)
    return str(tracker.experiment_id)


def _trial_run_id(space: SpaceConfig, study: str, number: int,
                  parent: str | None = None) -> tuple[str, str] | None:
    """The trial's MLflow run: its id and artifact URI (None: not found). Its parent is the
    one the study recorded (``parent``): the newest parent run tagged with the study's name
    was another project's, in a store two projects share with one study name, and export
    attached this model to that project's trial run."""
    from autoprune.tracking import Tracker, default_artifact_dir

    if _missing_store(space.tracking_uri):
        return None  # not there from here: opening it would make an empty store

    tracker = Tracker(space.tracking_uri, space.experiment_name, study,
                      default_artifact_dir(space.runs_dir))
    if parent is not None and not tracker.holds(parent):
        return None  # the study's own parent run is gone (deleted): no run of another's
    tracker.parent_id = parent or tracker.current_parent()  # an older study recorded none
    for run in tracker.child_runs():
        if run.data.tags.get("autoprune.trial") == str(number):
            return str(run.info.run_id), str(run.info.artifact_uri)
    return None


def _check_artifacts_here(space: SpaceConfig, artifact_uri: str) -> None:
    """A local MLflow store keeps absolute artifact paths: after the runs directory was moved
    or copied, registering would write the model into the old folder (or fail where it is
    gone), while the registry entry lives in the new one. Said before any work."""
    from urllib.parse import unquote, urlparse

    from autoprune.tracking import default_artifact_dir

    if space.tracking.uri or not artifact_uri.startswith(("file:", "/")):
        return  # a store of the user's own: its artifact root is theirs to set
    where = Path(unquote(urlparse(artifact_uri).path))
    here = default_artifact_dir(space.runs_dir).resolve()
    if not where.resolve().is_relative_to(here):
        raise AutopruneError(
            f"--register: the MLflow store {space.tracking_uri} keeps this trial's artifacts "
            f"at {where}, outside {here} (the runs directory was moved or copied since the "
            "search); allowed: registering from the runs directory where the search ran, or "
            "an export without --register (its files need no MLflow)")


def score_meaning(space: SpaceConfig, dense: bool) -> tuple[str, str]:
    """What "accuracy" is for this space, short (a table row) and long (a sentence)."""
    if space.data.evaluate:
        return (f"accuracy (`{space.data.evaluate}`)",
                f"the score of `{space.data.evaluate}` (higher is better)")
    per = "per-pixel top-1" if dense else "top-1"
    void = ("" if space.data.ignore_index is None
            else f", labels {space.data.ignore_index} left out")
    return (f"accuracy ({per})",
            f"{per} accuracy on its validation split{void}"
            + (" (one prediction per output position)" if dense else ""))


def _inputs_section(config: dict[str, Any]) -> str:
    """How raw data becomes the model's input: without the same steps, a deployment scores
    far below the accuracy above (digits unnormalised: 0.82 against 0.96)."""
    m = config["model"]
    dims = ", ".join(map(str, m["input_shape"][1:]))
    shape = f"`{m.get('input_dtype', 'float32')}` of shape `[batch, {dims}]`"
    pre = (config.get("data") or {}).get("preprocessing")
    if not pre:
        return (f"{shape}, as `{(config.get('data') or {}).get('source', 'the data source')}` "
                "yields it: the model was trained and scored on that loader's output, so a "
                "deployment applies the same transforms.")
    steps = "\n".join(f"{i}. {step}" for i, step in enumerate(pre["steps"], 1))
    return (f"{shape}. The model was trained and scored on raw data prepared as follows (also in "
            f"`prune_config.json` under `data.preprocessing`):\n{steps}")


def model_card(config: dict[str, Any], front: Any, number: int, space: SpaceConfig,
               dense: bool = False) -> str:
    """The export's README: ``dense`` when the model predicts per position (segmentation)."""
    t, b = config["metrics"]["trial"], config["metrics"]["base"]
    p = config["pruning"]
    rank = front.sort_values("accuracy", ascending=False)["trial"].tolist().index(number) + 1
    lat = b.get("latency") or {}
    ver = config["metrics"]["verified"]
    score, meaning = score_meaning(space, dense)
    rows = [
        (score, f"{t['accuracy']:.4f}", f"{b['accuracy']:.4f}"),
        ("MACs", f"{t['macs'] / 1e6:.3f} M ({t['macs_ratio']:.3f}x)", f"{b['macs'] / 1e6:.3f} M"),
        ("FLOPs", f"{2 * t['macs'] / 1e6:.3f} M", f"{2 * b['macs'] / 1e6:.3f} M"),
        ("parameters", f"{t['params']:,} ({t['params_ratio']:.3f}x)", f"{b['params']:,}"),
        ("latency (median)", f"{t['latency_ms']:.3f} ms ({speed_words(t['speedup'])})",
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
{ver['accuracy']:.4f}, ONNX Runtime vs PyTorch max abs difference {ver['onnx_max_abs_diff']:.1e}
(allowed {ver['onnx_tolerance']:.1e}: {ver['onnx_tolerance_rule']}).

## How it was made
- Base checkpoint SHA-256 `{config['model']['checkpoint_sha256']}`.
- Importance `{p['importance']}`, kept channels rounded to multiples of {p['round_to']}.
- Fine-tuned briefly: {config['finetune']}; seed {config['seed']}.
- Data: `{space.data.source}`; "accuracy" is {meaning}.

| group | ratio | kept / base channels |
|---|---|---|
{groups}

## Inputs
{_inputs_section(config)}

## Files
- `model.onnx`: dynamic batch axis, input `input`, output `output`.
- `model.pt2` (when written): the same model as a `torch.export` program;
  `torch.export.load("model.pt2").module()` runs it with torch alone.
- `weights.pt`: the pruned model's state dict; rebuild with
  `autoprune.load_pruned("prune_config.json", "weights.pt")`.
- `prune_config.json`: schema version {config['schema_version']}, validated on read.
"""
