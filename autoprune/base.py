"""The base model: build it, load or train its checkpoint (cached in ``runs/base/``), measure it.

A checkpoint trained here is cached by a hash of everything that defines it (model source and
kwargs, input shape, data source and split seed, training settings), so a second search on the
same model and data reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autoprune.config import SpaceConfig, config_hash
from autoprune.errors import SourceError, environment_error, first_line
from autoprune.finetune import adaptive_bn, train_base
from autoprune.locks import exclusive, replacing
from autoprune.measure import (
    IGNORE_INDEX,
    INPUT_DTYPES,
    LatencyResult,
    Tally,
    accuracy_ignoring,
    check_inputs,
    count_cost,
    evaluate,
    example_input,
    export_onnx,
    measure_latency,
    top1_accuracy,
)
from autoprune.sources import DataBundle, build_data, build_model, import_object, load_checkpoint


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class BaseMetrics:
    """The unpruned model's measurements: every trial is compared with these."""

    accuracy: float
    macs: float
    params: int
    latency_ms: float
    latency_p90_ms: float
    latency: dict[str, Any]
    checkpoint: str
    checkpoint_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BaseMetrics:
        return cls(**d)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SourceError("search.device: got 'cuda' but no CUDA device is available; "
                          "allowed here: 'cpu' or 'auto'")
    return torch.device(name)


def load_sources(space: SpaceConfig) -> tuple[nn.Module, DataBundle, Any]:
    """Build the data, the model (random init) and the optional user ``evaluate`` function.

    Fails early, before any training or trial, on a source that cannot be built or an input
    shape the model does not accept.
    """
    data = build_data(space.data, space.model.input_shape)
    num_classes = space.model.num_classes or data.num_classes
    # The random init is part of the base model a cached checkpoint stands for (its key holds
    # search.seed): draw it from that seed, not from torch's per-process default seed.
    seed_everything(space.search.seed)
    model = build_model(space.model.source, space.model.input_shape, num_classes,
                        space.model.kwargs).eval()
    m = space.model
    batch = next(iter(data.val))
    first_train = next(iter(data.train))
    splits = (("validation", batch), ("training", first_train))
    for split, b in splits:
        _check_input_dtype(space, b[0], split)
    out = example_output(model, m.source, m.input_shape, m.input_dtype)
    for split, b in splits:
        shape = list(b[0].shape[1:])
        if split == "training" and shape != list(batch[0].shape[1:]):  # validation's fit
            raise SourceError(f"data.source: {space.data.source!r} yields training samples of "
                              f"shape {shape} and validation samples of shape "
                              f"{list(batch[0].shape[1:])} (model.input_shape "
                              f"{list(m.input_shape)}); allowed: one sample shape in both "
                              "splits, the model's")
        if tuple(shape) != tuple(m.input_shape[1:]):
            raise SourceError(f"model.input_shape: got {list(m.input_shape)} but "
                              f"{space.data.source!r} yields {split} samples of shape "
                              f"{shape}")
        check_inputs(b[0], split)
        _check_targets(space, out, b[1], data.num_classes)  # a void label may be in either
    _check_last_batch(space, model, data.train)
    evaluate_fn = import_object(space.data.evaluate, "data.evaluate") if space.data.evaluate \
        else None
    if space.data.evaluate and evaluate_fn is not None:
        _check_evaluate(space.data.evaluate, evaluate_fn, model, data.val)
    if evaluate_fn is None and space.data.ignore_index is not None:
        evaluate_fn = accuracy_ignoring(space.data.ignore_index)
    return model, data, evaluate_fn


def _check_input_dtype(space: SpaceConfig, inputs: torch.Tensor, split: str) -> None:
    """A split's inputs have ``model.input_dtype`` (both splits: a float64 training split
    crashed base training, or failed every trial, with a raw dtype error)."""
    m, src = space.model, space.data.source
    want = INPUT_DTYPES[m.input_dtype]
    given = str(inputs.dtype).removeprefix("torch.")
    if inputs.is_floating_point() and want.is_floating_point and inputs.dtype != want:
        raise SourceError(f"data.source: {src!r} yields {given} {split} inputs; allowed: "
                          f"{m.input_dtype} inputs, as model.input_dtype says and the model's "
                          "weights are (convert in the loader, e.g. x.float())")
    if inputs.is_floating_point() != want.is_floating_point:
        closest = given if given in INPUT_DTYPES else \
            "float32" if inputs.is_floating_point() else "int64"
        raise SourceError(f"model.input_dtype: got {m.input_dtype!r} but {src!r} yields "
                          f"{given} {split} inputs; allowed: {closest!r}, the dtype of the data "
                          "(the model is traced, timed and exported with it)")


def _check_evaluate(name: str, fn: Any, model: nn.Module, val: Any) -> None:
    """``data.evaluate`` is called as ``fn(model, loader)``: a function that cannot take that
    fails here, not after the base model has trained."""
    import inspect

    try:
        inspect.signature(fn).bind(model, val)
    except TypeError as e:
        raise SourceError(f"data.evaluate: {name!r} cannot be called as fn(model, loader) "
                          f"({e}); allowed: a function of (model, loader) returning a score, "
                          "higher is better") from None
    except ValueError:  # no signature to read (a builtin): it is called as it is
        pass


def example_output(model: nn.Module, source: str, input_shape: tuple[int, ...],
                   input_dtype: str) -> torch.Tensor:
    """The model's output for an example input; a model that rejects the input, or returns
    anything but one tensor, is a source error naming the field."""
    weights = {str(p.dtype).removeprefix("torch.") for p in model.parameters()
               if p.is_floating_point() and p.dtype != torch.float32}
    if weights:  # (its error named model.input_shape, the input's dtype being float32)
        raise SourceError(f"model.source: {source!r} has {', '.join(sorted(weights))} weights; "
                          "allowed: float32 weights, as autoprune prunes, fine-tunes, times "
                          "and exports the model (call .float() in the model function; a "
                          "half-precision copy of the exported model can be made after)")
    try:
        with torch.no_grad():
            out = model(example_input(input_shape, input_dtype))
    except Exception as e:
        raise SourceError(f"model.input_shape: got {list(input_shape)}; the model {source!r} "
                          f"rejects {input_dtype} inputs of that shape "
                          f"({type(e).__name__}: {e})") from e
    from autoprune.prune import train_forward

    # in training mode too: a model returning (logits, aux) only there failed base training
    # with a raw traceback, or every trial's fine-tune (sweep X)
    trained, error = train_forward(model, example_input(input_shape, input_dtype))
    for mode, got, ran in (("", out, True), (" in training mode", trained, error is None)):
        if ran and not isinstance(got, torch.Tensor):
            shown = (f"a dict with keys {list(got)}" if isinstance(got, dict)
                     else f"a {type(got).__name__}")
            raise SourceError(f"model.source: {source!r} returns {shown}{mode}; allowed: one "
                              "tensor of logits, (N, classes). Wrap the model so that forward "
                              "returns the classifier's output (an auxiliary head left in would "
                              "be pruned and trained as if it did not matter)")
    return out


def _check_last_batch(space: SpaceConfig, model: nn.Module, train: Any) -> None:
    """BatchNorm cannot train on a batch of one sample ("Expected more than 1 value per
    channel"): a training DataLoader whose last batch would hold one fails here, not after
    some training."""
    from torch.utils.data import DataLoader

    if not isinstance(train, DataLoader) or train.drop_last or not train.batch_size or \
            not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    try:
        n = len(train.dataset)  # type: ignore[arg-type]
    except TypeError:  # an iterable dataset: no length
        return
    if n % train.batch_size == 1 and not _trains_on_one(model, train):
        raise SourceError(f"data.source: {space.data.source!r}: the training loader's last "
                          f"batch holds 1 sample ({n} samples, batch size {train.batch_size}), "
                          "and the model's BatchNorm cannot train on one; allowed: "
                          "DataLoader(..., drop_last=True), or another batch size")


def _trains_on_one(model: nn.Module, train: Any) -> bool:
    """Whether the model's BatchNorm takes a training batch of one sample: BatchNorm2d does
    when a sample has more than one value per channel (H x W > 1); BatchNorm1d on (N, C) does
    not."""
    import copy

    x = next(iter(train))[0][:1]
    try:
        with torch.no_grad():
            copy.deepcopy(model).train()(x)
    except ValueError:  # "Expected more than 1 value per channel when training"
        return False
    return True


def _check_targets(space: SpaceConfig, out: torch.Tensor, labels: torch.Tensor,
                   data_classes: int | None) -> None:
    """The model's outputs and the data's labels must make a classification loss: (N, K)
    logits with K >= 2 and integer labels (N,), or dense (N, K, ...) logits with labels
    (N, ...), every label in [0, K) but ``data.ignore_index``. Fail here, before any training,
    rather than with a loss stuck at 0 (one logit) or an index error deep inside it."""
    m, src = space.model, space.data.source
    shape, lshape = list(out.shape), list(labels.shape)
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise SourceError(f"data.source: {src!r} yields {str(labels.dtype).removeprefix('torch.')}"
                          f" labels of shape {lshape}; allowed: integer class ids (int64) of "
                          f"shape (N,) for (N, classes) logits (a binary task: 2 logits and "
                          "labels 0/1), or (N, H, W) for dense (N, classes, H, W) logits")
    if out.ndim < 2 or out.shape[1] < 2:
        raise SourceError(f"model.source: {m.source!r} outputs shape {shape}; allowed: logits "
                          "(N, classes) or (N, classes, ...) with at least 2 classes (a binary "
                          "classifier with one logit: give it 2 outputs and labels 0/1, for "
                          "the cross-entropy the fine-tune uses)")
    if lshape[1:] != shape[2:]:
        raise SourceError(f"data.source: {src!r} yields labels of shape {lshape} for outputs "
                          f"of shape {shape}; allowed: labels of shape (N"
                          f"{''.join(', ' + str(d) for d in shape[2:]) or ','}), "
                          "one class id per output position")
    k = int(out.shape[1])
    if m.num_classes is not None and k != m.num_classes:
        raise SourceError(f"model.num_classes: got {m.num_classes} but {m.source!r} outputs {k} "
                          "classes (a user function gets num_classes only when it has a "
                          "num_classes parameter; or set the size in model.kwargs)")
    ignore = IGNORE_INDEX if space.data.ignore_index is None else space.data.ignore_index
    kept = labels[labels != ignore]
    if kept.numel() and int(kept.min()) < 0:
        raise SourceError(f"data.source: {src!r} has the label {int(kept.min())}; allowed: "
                          f"class ids in [0, {k}), and data.ignore_index (now {ignore}) for "
                          "labels to leave out")
    top = int(kept.max()) if kept.numel() else -1
    if top >= k and m.num_classes is None and data_classes == k:  # the model was sized by it
        raise SourceError(f"data.source: {src!r} gives num_classes {k} but has the label {top}; "
                          f"allowed: class ids 0 to {k - 1} (map sparse ids such as 0, 3, 7 to "
                          "0, 1, 2), or a num_classes above the largest label")
    if top >= k or (data_classes is not None and data_classes > k):
        need = max(top + 1, data_classes or 0)
        now = ("" if space.data.ignore_index is None
               else f" (it is {space.data.ignore_index} now)")
        hint = (f"; if {top} marks positions to leave out (a void label), set "
                f"data.ignore_index: {top}{now}" if out.ndim > 2 and top >= k else "")
        raise SourceError(f"model.num_classes: {m.source!r} outputs {k} classes but {src!r} "
                          f"has labels up to {need - 1} ({need} classes); allowed: a model with "
                          "at least as many outputs as the data has classes (set "
                          f"model.num_classes, or the size in model.kwargs){hint}")


def ignoring(space: SpaceConfig) -> list[int]:
    """``data.ignore_index`` for a cache key, when set (the keys made before it stay valid)."""
    return [] if space.data.ignore_index is None else [space.data.ignore_index]


def code_digest(source: str) -> str:
    """For a user's ``module:function``: a hash of the file that defines it and of the other
    files of the user's project loaded with it (:func:`_local_modules`), so a trained base
    model cached for it is not reused after the code changed. For ``imagefolder:``: a hash of
    its files (names, sizes, modification times), so images added, removed or relabelled
    train it again. "" for the built-in sources."""
    kind, _, rest = source.partition(":")
    if kind == "imagefolder":
        return _folder_digest(Path(rest))
    if kind in ("builtin", "torchvision") or ":" not in source:
        return ""
    import inspect

    try:
        obj = import_object(source, "source")
        path = inspect.getsourcefile(obj)
        if not path:
            return ""
        defining = Path(path).resolve()
        files = _local_modules(obj, defining)
        if not files:  # the key as before the modules it imports were hashed too
            return hashlib.sha256(defining.read_bytes()).hexdigest()[:16]
        h = hashlib.sha256()
        for f in [defining, *files]:
            h.update(f"{f.name}\0".encode() + f.read_bytes() + b"\0")
        return h.hexdigest()[:16]
    except (OSError, TypeError, SourceError):
        return ""


def _local_modules(obj: Any, defining: Path) -> list[Path]:
    """The other Python files of the user's project that are loaded now (after the model was
    built, so what the function imports is there): files under the folder holding the
    source's top-level package (or its file), outside installed packages and autoprune. An
    edit to a helper the model file imports changes the model as much as one to that file."""
    top = sys.modules.get(getattr(obj, "__module__", "").partition(".")[0])
    top_file = getattr(top, "__file__", None)
    here = Path(os.path.abspath(top_file)).parent if top_file else defining.parent
    if top_file and Path(top_file).name == "__init__.py":
        here = here.parent
    root = here.resolve()
    # a cheap test on the name first: thousands of modules are loaded, few are the user's
    prefixes = tuple({str(here) + os.sep, str(root) + os.sep})
    skip = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    skip.add(Path(__file__).resolve().parent)  # autoprune itself
    main = sys.modules.get("__main__")
    found = set()
    for module in list(sys.modules.values()):
        f = getattr(module, "__file__", None)
        # relative names are no files (torch.ops says "_ops.py"); the running script (a
        # driver that calls autoprune) is not the model's code
        if not f or not f.endswith(".py") or not f.startswith(prefixes) or module is main:
            continue
        fp = Path(f).resolve()
        if fp == defining or root not in fp.parents or not fp.is_file() or \
                any(part in ("site-packages", "dist-packages") for part in fp.parts) or \
                any(d in fp.parents for d in skip):
            continue
        found.add(fp)
    return sorted(found)


def _folder_digest(root: Path) -> str:
    if not root.is_dir():
        return ""
    h = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            st = os.stat(os.path.join(folder, name))
            h.update(f"{os.path.relpath(os.path.join(folder, name), root)}\0{st.st_size}\0"
                     f"{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


#: In the cached base's key: bases trained before BatchNorm was recalibrated after training
#: are trained again, not mixed with newer ones.
BASE_RECIPE = "adaptive-bn-after-training"


def base_checkpoint(space: SpaceConfig, model: nn.Module, data: DataBundle,
                    device: torch.device, evaluate_fn: Any = None) -> Path:
    """The base checkpoint: the space's own (absolute: export may run from another directory,
    and finds a trained base through ``--runs-dir``, never the user's file), or one trained
    here and cached under ``runs/``."""
    if space.model.checkpoint:
        load_checkpoint(model, space.model.checkpoint)
        return Path(os.path.abspath(space.model.checkpoint))
    path = base_cache_path(space)
    with exclusive(path.with_suffix(".lock")):  # a search started alongside waits, then reuses
        return _cached_or_trained(space, model, data, device, evaluate_fn, path)


def base_cache_path(space: SpaceConfig) -> Path:
    """Where the base trained for ``space`` is cached: keyed by everything that makes it,
    the user's code included (its sources must be loaded: :func:`code_digest`)."""
    m = space.model
    key = config_hash(m.source, m.kwargs, m.input_shape, m.num_classes, m.train,
                      space.data.source, space.data.kwargs, space.data.seed,
                      space.data.batch_size, space.search.seed,
                      *[d for d in (code_digest(m.source), code_digest(space.data.source)) if d],
                      *ignoring(space), BASE_RECIPE, space.finetune.bn_calibration_batches)
    return Path(space.runs_dir) / "base" / f"{space.name}-{key}.pt"


def _cached_or_trained(space: SpaceConfig, model: nn.Module, data: DataBundle,
                       device: torch.device, evaluate_fn: Any, path: Path) -> Path:
    m = space.model
    if path.exists():
        load_checkpoint(model, path)
        return path
    # Scored once untrained, before any training: data.evaluate raising or returning no
    # number, validation labels all void or past the first batch out of range, failed only
    # after the training, which was then lost (NaN may be an untrained model's fair score:
    # judged after). The seed below makes the training as before.
    evaluate(model.to(device), data.val, device, evaluate_fn, finite=False)
    _check_onnx(space, model)
    seed_everything(space.search.seed)
    try:
        log = train_base(model, data.train, m.train, device, space.data.ignore_index)
    except FloatingPointError as e:
        raise SourceError(f"model.train: training the base model diverged ({e}); allowed: "
                          f"finite training data (a NaN or inf in {space.data.source!r}?) and "
                          f"a learning rate that trains (model.train.lr is {m.train.lr})") from e
    # BatchNorm statistics as every trial gets them (adaptive BN): after a short training the
    # running averages lag the weights (a base scored 0.33, chance, at a training loss of
    # 0.006, and 1.0 recalibrated), and the base is what trials and the card compare with
    adaptive_bn(model, data.train, space.finetune.bn_calibration_batches, device)
    model.cpu().eval()
    with replacing(path) as tmp:  # before it is scored: the training is kept whatever happens
        torch.save(model.state_dict(), tmp)
    acc = evaluate(model, data.val, "cpu", evaluate_fn)
    path.with_suffix(".json").write_text(json.dumps({
        "model": m.source, "data": space.data.source, "train": asdict(m.train),
        "steps": log.steps, "final_loss": log.losses[-1][1] if log.losses else None,
        "val_accuracy": acc}, indent=2))
    return path


def _check_onnx(space: SpaceConfig, model: nn.Module) -> None:
    """A model the ONNX exporters cannot take is found before the base model trains, not
    when its latency is first measured in ONNX Runtime, after the training (a raw traceback
    then, and the training's hours spent)."""
    if space.latency.runtime != "onnxruntime":
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = export_onnx(model, space.model.input_shape, Path(tmp) / "model.onnx",
                               dtype=space.model.input_dtype)
            import onnxruntime as ort  # and run once: a graph it cannot load (bf16 autocast)

            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            x = example_input(space.model.input_shape, space.model.input_dtype)
            session.run(None, {session.get_inputs()[0].name: x.numpy()})
        except Exception as e:  # noqa: BLE001 - the exporter's error, named
            if environment_error(e):
                raise
            raise SourceError(f"model.source: {space.model.source!r} cannot be exported to ONNX "
                              f"and run in ONNX Runtime ({type(e).__name__}: "
                              f"{first_line(e, 200)}), which "
                              "latency.runtime: onnxruntime times and export writes; allowed: a "
                              "model the ONNX exporter takes, or latency.runtime: torch to "
                              "search it (export writes ONNX all the same)") from e


#: The base model's latency is measured this many times: every speed-up of a study divides by
#: it, and how much it moves between measurements says which latency differences are noise.
BASE_LATENCY_RUNS = 3


def middle_latency(space: SpaceConfig, model: nn.Module,
                   runs: int = BASE_LATENCY_RUNS) -> LatencyResult:
    """The middle of ``runs`` latency measurements of ``model`` (one ONNX export), with every
    measurement's median in ``runs_ms``. One measurement that other work on the cores slowed
    put a trial 1.8x slow (1.35x faster where it re-timed 2.42x), and so on the front above
    trials it dominates; the base's spread on an H100 is in :func:`base_latency`."""
    import tempfile

    lat, shape, dtype = space.latency, space.model.input_shape, space.model.input_dtype
    with tempfile.TemporaryDirectory() as tmp:
        onnx = (export_onnx(model, shape, Path(tmp) / "model.onnx", dtype=dtype)
                if lat.runtime == "onnxruntime" else None)
        measured = sorted((measure_latency(model, shape, lat.runtime, lat.threads,
                                           lat.batch_size, lat.warmup, lat.repeats, lat.device,
                                           onnx_path=onnx, dtype=dtype) for _ in range(runs)),
                          key=lambda r: r.median_ms)
    middle = measured[len(measured) // 2]
    return LatencyResult(**{**middle.to_dict(), "runs_ms": [r.median_ms for r in measured]})


def base_latency(space: SpaceConfig, model: nn.Module) -> LatencyResult:
    """The base latency: the middle of :data:`BASE_LATENCY_RUNS` measurements. On an H100 a
    small ResNet at batch 1 timed 0.8 to 1.7 ms from one measurement to the next, and it with
    half its channels pruned 0.8 to 1.5 ms (eager PyTorch on CUDA waits on kernel launches
    there): a study timed so says it (:func:`autoprune.search._study_base`)."""
    return middle_latency(space, model, BASE_LATENCY_RUNS)


def warn_untrained(space: SpaceConfig, accuracy: float, tally: Tally) -> None:
    """Say when the base model is no better than always answering the most common class: a
    base at chance (0.087 on 10 classes) was searched, put on the front and exported without a
    word, every trial at the same score."""
    if not accuracy <= tally.majority < 1.0:
        return
    same = "; it gave the same answer every time" if tally.one_answer else ""
    hint = (f"is model.checkpoint ({space.model.checkpoint}) this model's weights for this "
            "data, its classes in the same order?" if space.model.checkpoint else
            "autoprune trained it (model.train): more epochs or another lr, or your own "
            "model.checkpoint")
    print(f"autoprune: warning: the base model scores {accuracy:.4f} on the validation data, "
          f"no better than always answering its most common class ({tally.majority:.4f})"
          f"{same}: it has not learned the task, and its pruned copies' scores mean nothing; "
          f"{hint}", file=sys.stderr)


def warn_missing_classes(tally: Tally, num_classes: int | None) -> None:
    """Say when the validation split holds no label of some classes (up to the data's
    ``num_classes``, else up to its largest label): a pruned model that loses them scores as
    well as one that keeps them, and a search ranks it so without a word (sweep U10)."""
    counts = tally.labels.tolist()
    seen = [c for c, n in enumerate(counts) if n]
    if not seen:
        return
    bound = min(num_classes or seen[-1] + 1, len(counts))
    missing = [c for c in range(bound) if not counts[c]]
    if not missing:
        return
    shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
    print(f"autoprune: warning: the validation split holds no label of {len(missing)} of "
          f"{bound} classes ({shown}): the accuracy cannot see a pruned model lose them, so "
          "the search cannot either; give the validation split samples of every class",
          file=sys.stderr)


def measure_base(space: SpaceConfig, model: nn.Module, data: DataBundle, checkpoint: Path,
                 evaluate_fn: Any = None, device: torch.device | str = "cpu") -> BaseMetrics:
    cost = count_cost(model, space.model.input_shape, space.model.input_dtype)
    latency = base_latency(space, model)
    if space.data.evaluate:
        accuracy = evaluate(model.to(device), data.val, device, evaluate_fn)
    else:
        tally = Tally()
        accuracy = top1_accuracy(model.to(device), data.val, device,
                                 ignore_index=IGNORE_INDEX if space.data.ignore_index is None
                                 else space.data.ignore_index, tally=tally)
        warn_untrained(space, accuracy, tally)
        warn_missing_classes(tally, data.num_classes)
    return BaseMetrics(
        accuracy=accuracy,
        macs=cost.macs, params=cost.params, latency_ms=latency.median_ms,
        latency_p90_ms=latency.p90_ms, latency=latency.to_dict(), checkpoint=str(checkpoint),
        checkpoint_sha256=sha256_file(checkpoint),
    )
