"""Typed search-space config: load a YAML file, validate every key, write the resolved config.

Every section is a frozen dataclass. ``load_space`` rejects unknown keys and bad values with a
:class:`~autoprune.errors.ConfigError` that names the key path, the value and what is allowed.

Example:
    >>> space = load_space("search_spaces/digits_resnet.yaml")  # doctest: +SKIP
    >>> space.search.trials  # doctest: +SKIP
    24
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from autoprune.errors import ConfigError

Importance = Literal["l1", "l2", "taylor", "random", "lamp", "fpgm"]
Objective = Literal["accuracy", "macs", "latency", "params"]
Sampler = Literal["nsga2", "tpe", "gp", "random"]
Runtime = Literal["onnxruntime", "torch"]
Optimizer = Literal["sgd", "adam", "adamw"]
Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class TrainConfig:
    """How the base model is trained when the space gives no checkpoint."""

    epochs: int = 10
    lr: float = 0.05
    optimizer: Optimizer = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class ModelConfig:
    source: str
    input_shape: tuple[int, ...]
    input_dtype: str = "float32"  # float32 | int64 | int32 | uint8 (token ids, raw pixels)
    checkpoint: str | None = None
    num_classes: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class DataConfig:
    source: str
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    evaluate: str | None = None
    seed: int = 0
    kwargs: dict[str, Any] = field(default_factory=dict)
    ignore_index: int | None = None  # a label value left out of the loss and the accuracy


@dataclass(frozen=True)
class Range:
    low: float = 0.0
    high: float = 0.8
    step: float | None = 0.05


@dataclass(frozen=True)
class GroupsConfig:
    """Per-group search ranges. Patterns are fnmatch globs over group names; first match wins."""

    default: Range = field(default_factory=Range)
    patterns: dict[str, Range] = field(default_factory=dict)
    ignore: tuple[str, ...] = ()


@dataclass(frozen=True)
class PruningConfig:
    importance: Importance = "l2"
    round_to: int = 1
    # Taylor importance needs gradients: this many training batches are used to compute them.
    taylor_batches: int = 4


@dataclass(frozen=True)
class FinetuneConfig:
    """Brief recovery training of a pruned candidate. ``steps`` (if set) overrides ``epochs``.

    ``distill_alpha > 0`` adds knowledge distillation from the base model (the teacher):
    loss = (1 - alpha) * CE + alpha * T^2 * KL(student_T || teacher_T).
    """

    epochs: float = 1.0
    steps: int | None = None
    lr: float = 0.01
    optimizer: Optimizer = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    bn_calibration_batches: int = 10
    log_every: int = 10
    distill_alpha: float = 0.0
    distill_temperature: float = 4.0


@dataclass(frozen=True)
class ConstraintsConfig:
    max_macs_ratio: float | None = None
    max_params_ratio: float | None = None
    max_latency_ms: float | None = None
    min_accuracy: float | None = None


@dataclass(frozen=True)
class LatencyConfig:
    runtime: Runtime = "onnxruntime"
    device: Device = "cpu"
    threads: int = 1
    batch_size: int = 1
    warmup: int = 10
    repeats: int = 50


@dataclass(frozen=True)
class FidelityConfig:
    """Multi-fidelity search with Pareto-aware promotion (multi-objective ASHA).

    A trial is judged at rung 0 (adaptive-BN proxy accuracy, before any fine-tuning) and after
    each fraction in ``rungs`` of its fine-tune budget. It goes on only if fewer than
    ``ceil(n / eta)`` of the ``n`` trials at that rung lie in better non-dominated layers on
    (accuracy at the rung, cost). Stopped trials are ``pruned``.

    An earlier rung stops trials only once it has shown that it predicts the last rung beyond
    what the cost says: the partial Spearman correlation (accuracy here, accuracy at the last
    rung | cost) over the first ``trust_min`` trials seen at both must reach
    ``trust_threshold`` (-1: always trust). See :mod:`autoprune.fidelity`.
    """

    enabled: bool = False
    rungs: tuple[float, ...] = (1 / 9, 1 / 3)
    eta: float = 3.0
    min_trials: int = 4
    proxy_rung: bool = True
    trust_min: int = 12
    trust_threshold: float = 0.4


@dataclass(frozen=True)
class WarmStartConfig:
    """Sensitivity warm start: scan each group alone, then seed the search with configs that
    spend the pruning where accuracy suffers least, at each MACs budget in ``budgets``.

    The seeds run first, coarse to fine (the cheapest budget, every other one upwards, then those
    between), before the uniform baselines. With ``search.inherit`` the order runs downwards (the
    dearest, then each at most half the last and the cheapest, then those between, dearest
    first), the allocations nest, and the seeds are never stopped at a rung: each can start from a
    dearer one's fine-tuned model. A budget is met in counted MACs, and the allocation
    is refilled up to it; 0 (or any budget below what the space can reach) seeds the space's
    cheapest config, every group at its upper bound, so the front spans the whole range from
    the start. The default budgets are spread over the MACs range, about sqrt(2) apart, which
    puts them closest together at the cheap end, where accuracy falls fastest; 0.5 is added in
    the knee, where users pick. Two scan ratios keep the scan at groups x 2 calibrations."""

    sensitivity: bool = False
    ratios: tuple[float, ...] = (0.4, 0.8)
    budgets: tuple[float, ...] = (0.0, 0.07, 0.1, 0.14, 0.2, 0.28, 0.4, 0.5, 0.6, 0.85)


@dataclass(frozen=True)
class SearchConfig:
    trials: int = 30
    sampler: Sampler = "nsga2"
    seed: int = 0
    population_size: int = 16
    baselines: tuple[float, ...] = (0.25, 0.5, 0.75)
    front_fill: int = 2  # every n-th proposal after the seeds bisects the front's widest step
    jobs: int | None = None  # trials at once; unset: 1 locally, Ray's CPUs on a cluster
    timeout: float | str | None = None  # wall-clock budget of one run: seconds, or "90m", "2h"
    device: Device = "auto"
    storage: str | None = None
    keep_models: bool = True
    inherit: bool = False  # prune a finished front model down instead of the base (inherit.py)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None
    experiment: str | None = None


@dataclass(frozen=True)
class SpaceConfig:
    """A whole search space: what to prune, how, and how to judge the result."""

    name: str
    model: ModelConfig
    data: DataConfig
    groups: GroupsConfig = field(default_factory=GroupsConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    objectives: tuple[Objective, ...] = ("accuracy", "macs", "latency")
    constraints: ConstraintsConfig = field(default_factory=ConstraintsConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    runs_dir: str = "runs"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every resolved setting (defaults included), YAML/JSON-serialisable."""
        return _to_plain(self)

    def replace(self, **changes: Any) -> SpaceConfig:
        return dataclasses.replace(self, **changes)

    @property
    def storage_url(self) -> str:
        return self.search.storage or f"sqlite:///{Path(self.runs_dir) / 'optuna.db'}"

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{Path(self.runs_dir) / 'mlflow.db'}"

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name


# ----------------------------------------------------------------------------------------------
# Generic dataclass builder with key-path errors.


_SCALARS: dict[Any, tuple[str, str]] = {
    int: ("an integer", "integers"), float: ("a number", "numbers"),
    str: ("a string", "strings"), bool: ("true or false", "booleans"),
}


def _type_name(tp: Any) -> str:
    if tp in _SCALARS:
        return _SCALARS[tp][0]
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if not args:
            return "a list"
        return f"a list of {_SCALARS[args[0]][1] if args[0] in _SCALARS else _type_name(args[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        keys = ", ".join(f.name for f in dataclasses.fields(tp))
        return f"a mapping with keys {{{keys}}}"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(path, value, _type_name(tp))
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(path, value, _type_name(tp))
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(path, value, " | ".join(repr(a) for a in allowed) + hint)
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(path, value, _type_name(tp))
        return _build(tp, value, path)  # type: ignore[arg-type]
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, value, _type_name(tp))
        (arg, *_rest) = typing.get_args(tp)
        return tuple(_coerce(arg, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, value, "a mapping")
        _k, v_tp = typing.get_args(tp)
        return {str(k): _coerce(v_tp, v, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, value, "an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, value, "a number")
        if not math.isfinite(value):
            raise ConfigError(path, value, "a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, value, "a string")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a bug, not user input


def _build(cls: type, data: dict[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(sub, value, f"one of the keys {names}{hint}")
        kwargs[key] = _coerce(hints[key], value, sub)
    for f in dataclasses.fields(cls):
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default and f.name not in kwargs:
            raise ConfigError(f"{path}.{f.name}" if path else f.name, None,
                              f"required: {_type_name(hints[f.name])}")
    return cls(**kwargs)


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------------------------
# Value checks that types alone cannot express.


def _check_range(r: Range, path: str) -> None:
    for name in ("low", "high"):
        v = getattr(r, name)
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"{path}.{name}", v, "a pruning ratio in [0, 1)")
    if r.low > r.high:
        raise ConfigError(f"{path}.low", r.low, f"<= high ({r.high})")
    if r.step is not None and not 0.0 < r.step <= 1.0:
        raise ConfigError(f"{path}.step", r.step, "a number in (0, 1], or null for continuous")
    if r.step is not None and r.high > r.low and r.step > r.high - r.low + 1e-9:
        raise ConfigError(f"{path}.step", r.step, f"at most high - low ({r.high - r.low:g}): a "
                          "larger step leaves only low to search")


def _positive(value: float | int | None, path: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(path, value, ">= 0" if allow_zero else "> 0")


def _fraction(value: float, path: str, allowed: str) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(path, value, allowed)


#: ``model.input_dtype`` names (the keys of ``measure.INPUT_DTYPES``; no torch needed here)
INPUT_DTYPE_NAMES = ("float32", "int64", "int32", "uint8")


def _validate(space: SpaceConfig) -> None:
    check_runs_dir(space.runs_dir, "runs_dir")
    shape = space.model.input_shape
    if len(shape) < 2 or any(d <= 0 for d in shape):
        raise ConfigError("model.input_shape", list(shape),
                          "a list of positive ints with a batch dim, e.g. [1, 3, 32, 32]")
    if space.model.input_dtype not in INPUT_DTYPE_NAMES:
        raise ConfigError("model.input_dtype", space.model.input_dtype,
                          " | ".join(map(repr, INPUT_DTYPE_NAMES)))
    _check_range(space.groups.default, "groups.default")
    for pat, r in space.groups.patterns.items():
        _check_range(r, f"groups.{pat}")  # the key the user wrote (the short form)
    _positive(space.pruning.round_to, "pruning.round_to")
    _positive(space.finetune.epochs, "finetune.epochs", allow_zero=True)
    _positive(space.finetune.steps, "finetune.steps", allow_zero=True)
    _positive(space.finetune.lr, "finetune.lr")
    _positive(space.finetune.bn_calibration_batches, "finetune.bn_calibration_batches", True)
    _positive(space.finetune.log_every, "finetune.log_every")
    _positive(space.model.train.epochs, "model.train.epochs", allow_zero=True)
    _positive(space.model.train.lr, "model.train.lr")
    for key, opt in (("finetune", space.finetune), ("model.train", space.model.train)):
        _fraction(opt.momentum, f"{key}.momentum", "SGD's momentum in [0, 1) (0: none)")
        _positive(opt.weight_decay, f"{key}.weight_decay", allow_zero=True)
    _fraction(space.model.train.label_smoothing, "model.train.label_smoothing",
              "a fraction in [0, 1) (0: none)")
    _positive(space.pruning.taylor_batches, "pruning.taylor_batches")
    _positive(space.data.batch_size, "data.batch_size")
    _positive(space.data.eval_batch_size, "data.eval_batch_size")
    _positive(space.data.num_workers, "data.num_workers", allow_zero=True)
    for key in ("max_macs_ratio", "max_params_ratio", "max_latency_ms"):
        _positive(getattr(space.constraints, key), f"constraints.{key}")
    if space.constraints.min_accuracy is not None and not 0 <= space.constraints.min_accuracy:
        raise ConfigError("constraints.min_accuracy", space.constraints.min_accuracy, ">= 0")
    _positive(space.latency.threads, "latency.threads")
    _positive(space.latency.batch_size, "latency.batch_size")
    _positive(space.latency.warmup, "latency.warmup", allow_zero=True)
    _positive(space.latency.repeats, "latency.repeats")
    _positive(space.search.trials, "search.trials")
    _positive(space.search.jobs, "search.jobs")
    duration_seconds(space.search.timeout, "search.timeout")
    _positive(space.search.population_size, "search.population_size")
    if space.search.population_size < 2:
        raise ConfigError("search.population_size", space.search.population_size, ">= 2")
    if space.search.front_fill < 0:  # the type (an integer) is checked when it is read
        raise ConfigError("search.front_fill", space.search.front_fill, "an integer >= 0: every "
                          "n-th proposal fills the front's widest step (0: off, 1: all)")
    for i, b in enumerate(space.search.baselines):
        if not 0.0 <= b < 1.0:
            raise ConfigError(f"search.baselines[{i}]", b, "a uniform ratio in [0, 1)")
    fid = space.search.fidelity
    for i, f in enumerate(fid.rungs):
        if not 0.0 < f < 1.0:
            raise ConfigError(f"search.fidelity.rungs[{i}]", f, "a fraction of the fine-tune "
                              "budget in (0, 1); the full budget is always the last rung")
    if any(b <= a for a, b in itertools.pairwise(fid.rungs)):
        raise ConfigError("search.fidelity.rungs", list(fid.rungs),
                          "strictly increasing fractions")
    if fid.eta <= 1.0:
        raise ConfigError("search.fidelity.eta", fid.eta, "a number > 1 (keep the top 1/eta)")
    _positive(fid.min_trials, "search.fidelity.min_trials")
    if fid.trust_min < 3:
        raise ConfigError("search.fidelity.trust_min", fid.trust_min, "an integer >= 3 (a "
                          "correlation needs at least 3 trials)")
    if not -1.0 <= fid.trust_threshold <= 1.0:
        raise ConfigError("search.fidelity.trust_threshold", fid.trust_threshold,
                          "a correlation in [-1, 1] (-1: always trust the rungs)")
    for i, w in enumerate(space.search.warm_start.ratios):
        if not 0.0 < w < 1.0:
            raise ConfigError(f"search.warm_start.ratios[{i}]", w, "a ratio in (0, 1)")
    for i, b in enumerate(space.search.warm_start.budgets):
        if not 0.0 <= b < 1.0:
            raise ConfigError(f"search.warm_start.budgets[{i}]", b, "a MACs ratio in [0, 1) "
                              "(0: the cheapest config the space allows)")
    if not 0.0 <= space.finetune.distill_alpha <= 1.0:
        raise ConfigError("finetune.distill_alpha", space.finetune.distill_alpha,
                          "a weight in [0, 1] (0: no distillation)")
    _positive(space.finetune.distill_temperature, "finetune.distill_temperature")
    if not space.objectives:
        raise ConfigError("objectives", [],
                          "a non-empty list of accuracy | macs | latency | params")
    if len(set(space.objectives)) != len(space.objectives):
        raise ConfigError("objectives", list(space.objectives), "each objective at most once")
    if "accuracy" not in space.objectives:
        raise ConfigError("objectives", list(space.objectives), "a list that includes 'accuracy'")
    check_name(space.name, "name")
    for key, seed in (("search.seed", space.search.seed), ("data.seed", space.data.seed)):
        check_seed(seed, key)
    if space.search.storage is not None:
        _check_storage(space.search.storage)
    if space.tracking.uri is not None:
        _check_tracking_uri(space.tracking.uri)


MAX_SEED = 2**32 - 1  # numpy's seeds

_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?"
                       r"(?:(\d+(?:\.\d+)?)s)?")
DURATION_ALLOWED = ("seconds (a number > 0), or a duration such as '45s', '30m', '2h', '1h30m', "
                    "'1d'")


def duration_seconds(value: float | str | None, field: str) -> float | None:
    """A time budget in seconds: a number, or a string of d/h/m/s parts (``"1h30m"``)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(field, value, DURATION_ALLOWED)
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            match = _DURATION.fullmatch(text)
            if not text or match is None or not any(match.groups()):
                raise ConfigError(field, value, DURATION_ALLOWED) from None
            seconds = sum(float(v) * unit for v, unit in
                          zip(match.groups(), (86400, 3600, 60, 1), strict=True) if v)
    if not 0 < seconds < float("inf"):
        raise ConfigError(field, value, DURATION_ALLOWED)
    return seconds


#: The longest study or space name: it names a folder, a lock file (``.optuna.db.NAME.search.
#: lock``, 255 bytes at most on Linux) and MLflow experiments and runs.
MAX_NAME_BYTES = 120


def check_name(name: str, field: str) -> None:
    """A study or space name: it names a folder under ``runs_dir/studies``, a lock file beside
    the Optuna store, and MLflow experiments and runs, whose searches quote it (a name of 240
    characters crashed on the lock file's name, one with a quote in MLflow's filter)."""
    allowed = (f"a non-empty name of at most {MAX_NAME_BYTES} bytes, without spaces, slashes, "
               "quotes or control characters")
    if (not name or name in (".", "..") or len(name.encode()) > MAX_NAME_BYTES
            or any(c in "/\\'\"`" or c.isspace() or not c.isprintable() for c in name)):
        raise ConfigError(field, name, allowed)


def check_runs_dir(path: str, field: str) -> None:
    """The runs directory is written into SQLite URLs (``sqlite:///DIR/optuna.db``), which
    read ``%`` as an escape and ``?`` and ``#`` as the start of options: ``r%20x`` opened
    ``r x``, and ``r?x=1`` wrote the study into a stray file ``r``."""
    if any(c in path for c in "%?#"):
        raise ConfigError(field, path, "a folder path without %, ? or # (a SQLite URL is made "
                          "of it, which reads them as URL characters)")


def check_seed(seed: int, field: str) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(field, seed, f"an integer in [0, {MAX_SEED}]")


def _check_storage(url: str) -> None:
    from sqlalchemy.engine import make_url

    try:
        make_url(url)
    except Exception:  # noqa: BLE001 - any parse failure is the user's string
        raise ConfigError("search.storage", url, "an Optuna storage URL, e.g. "
                          "sqlite:////abs/path/optuna.db or postgresql://user@host/db") from None


TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file",
                    "databricks")


def _check_tracking_uri(uri: str) -> None:
    import os

    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""
    if "://" in uri and scheme not in TRACKING_SCHEMES:
        schemes = ", ".join(f"{s}://" for s in TRACKING_SCHEMES)
        raise ConfigError("tracking.uri", uri, f"an MLflow tracking URI ({schemes}) or a "
                          "local folder")
    # MLflow 3 refuses a folder store (file://, or a plain path) unless told to allow it: it
    # failed after the base model was trained, with MLflow's traceback
    if scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in (
            "true", "1"):
        raise ConfigError("tracking.uri", uri, "a database or server URI (e.g. sqlite:///"
                          "mlflow.db, http://127.0.0.1:5000); MLflow 3 refuses a folder store "
                          "unless MLFLOW_ALLOW_FILE_STORE=true is set")


def _normalise_groups(raw: Any) -> Any:
    """Accept the short form: ``{default: ..., ignore: [...], "layer4.*": {...}}``."""
    if not isinstance(raw, dict):
        return raw
    out: dict[str, Any] = {"patterns": dict(raw.get("patterns", {}) or {})}
    for key, value in raw.items():
        if key in ("default", "ignore"):
            out[key] = value
        elif key != "patterns":
            if not isinstance(value, dict):
                raise ConfigError(f"groups.{key}", value,
                                  "a range mapping {low, high, step} for the glob pattern "
                                  "(or the keys default / ignore / patterns)")
            out["patterns"][key] = value
    return out


def parse_space(data: dict[str, Any], base_dir: str | Path | None = None,
                check: bool = True) -> SpaceConfig:
    """Validate a parsed YAML mapping and return a :class:`SpaceConfig`.

    Relative checkpoint and ``imagefolder:`` paths resolve against ``base_dir`` when they do not
    exist relative to the current directory. ``check=False`` reads a study's stored space
    (types and keys still checked): it was validated when the study began, and a value rule
    added since must not stop an old study's export.
    """
    if not isinstance(data, dict):
        raise ConfigError("<root>", data, _type_name(SpaceConfig))
    data = dict(data)
    if "groups" in data:
        data["groups"] = _normalise_groups(data["groups"])
    try:
        space: SpaceConfig = _build(SpaceConfig, data, "")
    except ConfigError as e:  # name a pattern's field as written: groups."layer4.*".high
        if not e.path.startswith("groups.patterns."):
            raise
        raise ConfigError("groups." + e.path.removeprefix("groups.patterns."), e.value,
                          e.allowed) from None
    space = _expand_home(space)
    if check:
        _validate(space)
    if base_dir is not None:
        space = _resolve_paths(space, Path(base_dir))
    return space


def _expand_home(space: SpaceConfig) -> SpaceConfig:
    """``~`` in ``runs_dir``, ``model.checkpoint`` and an ``imagefolder:`` path is the home
    folder, as a shell reads it: it was a folder named ``~`` in the project (then a crash
    when pandas, which expands it, wrote the tables elsewhere), and a ``rm -rf ~`` away from
    the user's home."""
    def home(p: str) -> str:
        return os.path.expanduser(p) if p.startswith("~") else p

    model, data = space.model, space.data
    if model.checkpoint:
        model = dataclasses.replace(model, checkpoint=home(model.checkpoint))
    if data.source.startswith("imagefolder:"):
        data = dataclasses.replace(data, source="imagefolder:" + home(data.source[12:]))
    return dataclasses.replace(space, runs_dir=home(space.runs_dir), model=model, data=data)


def _resolve_paths(space: SpaceConfig, base_dir: Path) -> SpaceConfig:
    def fix(p: str) -> str:
        return p if Path(p).exists() or Path(p).is_absolute() else str(base_dir / p)

    model, data = space.model, space.data
    if model.checkpoint and not Path(model.checkpoint).exists():
        candidate = base_dir / model.checkpoint
        if candidate.exists():
            model = dataclasses.replace(model, checkpoint=str(candidate))
    if data.source.startswith("imagefolder:"):
        path = data.source.split(":", 1)[1]
        if not Path(path).exists() and (base_dir / path).exists():
            data = dataclasses.replace(data, source="imagefolder:" + fix(path))
    return dataclasses.replace(space, model=model, data=data)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (plain
    YAML keeps the last one without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def shipped(folder: str) -> Path | None:
    """A folder autoprune ships (``search_spaces``, ``cluster``): inside the installed package
    (a wheel), or beside it (a clone, or an editable install)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / folder, here.parent / folder):
        if candidate.is_dir():
            return candidate
    return None


def shipped_space(path: str | Path) -> Path | None:
    """The space autoprune ships under ``path``'s name, for ``search_spaces/NAME.yaml`` (as
    the README writes it), ``NAME.yaml`` or ``NAME`` given where no such file is (a project of
    the user's own, with autoprune installed)."""
    path = Path(path)
    folder = shipped("search_spaces")
    if folder is None or path.parent not in (Path("."), Path("search_spaces")):
        return None
    found = folder / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    return found if found.is_file() else None


def load_space(path: str | Path, overrides: dict[str, Any] | None = None) -> SpaceConfig:
    """Load and validate a search-space YAML file (or a shipped space, see
    :func:`shipped_space`).

    Args:
        path: the YAML file.
        overrides: dotted-key overrides applied before validation, e.g. ``{"search.trials": 4}``.
    """
    path = Path(path)
    if not path.exists():
        found = shipped_space(path)
        if found is None:
            folder = shipped("search_spaces")
            names = sorted(f.stem for f in folder.glob("*.yaml")) if folder else []
            raise ConfigError("space", str(path), "an existing YAML file" + (
                ", or a space autoprune ships: " + ", ".join(
                    f"search_spaces/{n}.yaml" for n in names) if names else ""))
        path = found
    if path.is_dir():
        raise ConfigError("space", str(path), "a YAML file, not a folder")
    try:  # bytes: YAML reads UTF-8 (a BOM or none) and UTF-16 itself, whatever the locale
        text = path.read_bytes()
    except OSError as e:
        raise ConfigError("space", str(path), f"a file autoprune can read ({e.strerror})") from e
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.reader.ReaderError as e:  # not UTF-8 or UTF-16 (a Latin-1 comment, say)
        raise ConfigError("space", str(path), f"a UTF-8 text file ({e.reason} at byte "
                          f"{e.position})") from e
    except yaml.YAMLError as e:
        raise ConfigError("space", str(path), f"valid YAML ({e})") from e
    if overrides and not isinstance(data, dict):
        raise ConfigError("<root>", data, _type_name(SpaceConfig))
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for i, p in enumerate(parents):
            if node.get(p) is None:  # a missing or empty (``key:``) section
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(key, value, f"a key below a mapping, but "
                                  f"{'.'.join(parents[:i + 1])} is {node!r}")
        node[leaf] = value
    return parse_space(data, base_dir=path.parent.parent if path.parent.name == "search_spaces"
                       else path.parent)


def dump_space(space: SpaceConfig, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    Path(path).write_text(yaml.safe_dump(space.to_dict(), sort_keys=False))


def flat_items(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``); an empty
    mapping stays a value."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(flat_items(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_hash(*parts: Any) -> str:
    """Short stable hash of JSON-serialisable parts (used for cache keys)."""
    blob = json.dumps([_to_plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
