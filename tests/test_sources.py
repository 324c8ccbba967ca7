"""Model and data sources: builtin, torchvision, imagefolder, ``module:function``, checkpoints."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import textwrap
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from autoprune.base import load_sources
from autoprune.config import DataConfig, ModelConfig, SpaceConfig, parse_space
from autoprune.errors import CheckpointError, ConfigError, SourceError
from autoprune.sources import (
    DataBundle,
    build_data,
    build_model,
    import_object,
    list_models,
    load_checkpoint,
)

# Set when a pickle payload is unpickled: a weights_only load must never call it.
UNPICKLED: list[str] = []


def _mark_unpickled(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class _Payload:
    """An arbitrary object: unpickling it would run ``_mark_unpickled``."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _mark_unpickled, ("payload ran",)


def _user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> str:
    """Write ``source`` as a uniquely named module importable for this test; return its name."""
    name = f"user_src_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


@pytest.fixture(scope="module")
def mnist5k() -> DataBundle:
    return build_data(DataConfig(source="builtin:mnist5k", batch_size=16, eval_batch_size=50),
                      (1, 1, 28, 28))


def test_builtin_catalogue() -> None:
    assert list_models() == ["mobilenet_tiny", "resnet14", "resnet8", "resnet_tiny", "tiny_cnn"]
    assert list_models("resnet*") == ["resnet14", "resnet8", "resnet_tiny"]


def test_digits_split_and_shapes(digits: DataBundle) -> None:
    assert digits.num_classes == 10
    assert len(digits.train.dataset) + len(digits.val.dataset) == 1797
    assert len(digits.val.dataset) == 360
    x, y = next(iter(digits.train))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64
    labels = torch.cat([b[1] for b in digits.val])
    assert set(labels.tolist()) == set(range(10))
    # Normalised with the training split's statistics.
    xs = torch.cat([b[0] for b in digits.train])
    assert abs(float(xs.mean())) < 0.05 and abs(float(xs.std()) - 1.0) < 0.05


def test_digits_resized_and_channel_repeated_to_input_shape() -> None:
    bundle = build_data(DataConfig(source="builtin:digits", batch_size=8), (1, 3, 16, 16))
    x, _y = next(iter(bundle.val))
    assert x.shape == (256, 3, 16, 16)
    assert torch.equal(x[:, 0], x[:, 2])


@pytest.mark.parametrize("name", ["tiny_cnn", "resnet_tiny", "resnet8", "resnet14",
                                  "mobilenet_tiny"])
def test_builtin_models_forward_on_digits(name: str, digits: DataBundle) -> None:
    model = build_model(f"builtin:{name}", (1, 1, 8, 8), 10).eval()
    x, _y = next(iter(digits.val))
    with torch.no_grad():
        assert model(x).shape == (x.shape[0], 10)


@pytest.mark.parametrize("name", ["resnet8", "mobilenet_tiny"])
def test_builtin_models_forward_on_mnist5k(name: str, mnist5k: DataBundle) -> None:
    assert mnist5k.num_classes == 10
    assert len(mnist5k.train.dataset) == 4000 and len(mnist5k.val.dataset) == 1000
    model = build_model(f"builtin:{name}", (1, 1, 28, 28), 10, {"width": 8}).eval()
    x, y = next(iter(mnist5k.train))
    assert x.shape == (16, 1, 28, 28) and y.shape == (16,)
    with torch.no_grad():
        assert model(x).shape == (16, 10)


def test_builtin_model_kwargs_and_classes() -> None:
    model = build_model("builtin:resnet_tiny", (1, 3, 8, 8), 4, {"width": 8, "blocks": 2})
    assert model.stem[0].in_channels == 3
    assert model.fc.out_features == 4 and model.fc.in_features == 32
    assert len(model.layer1) == 2


def test_unknown_builtin_lists_catalogue() -> None:
    with pytest.raises(SourceError, match=r"model.source: got 'builtin:resnet_small'.*tiny_cnn"):
        build_model("builtin:resnet_small", (1, 1, 8, 8), 10)


def test_torchvision_model_without_weights() -> None:
    model = build_model("torchvision:resnet18", (1, 3, 32, 32), 7).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(SourceError, match="never downloads weights"):
        build_model("torchvision:resnet18", (1, 3, 32, 32), 7, {"weights": "DEFAULT"})
    with pytest.raises(SourceError, match=r"close matches: \['resnet18'"):
        build_model("torchvision:resnet_18", (1, 3, 32, 32), 7)


def test_unrecognised_source_form() -> None:
    with pytest.raises(SourceError, match="model.source: got 'resnet18'"):
        build_model("resnet18", (1, 3, 32, 32), 10)
    with pytest.raises(SourceError, match="data.source: got 'digits'"):
        build_data(DataConfig(source="digits"), (1, 1, 8, 8))
    with pytest.raises(SourceError, match="'builtin:digits', 'builtin:mnist5k'"):
        build_data(DataConfig(source="builtin:cifar10"), (1, 3, 32, 32))


def test_module_function_model_and_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _user_module(tmp_path, monkeypatch, """
        import torch
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset

        def build(width=4, num_classes=3):
            return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(width, num_classes))

        def loaders(n=12):
            g = torch.Generator().manual_seed(0)
            ds = TensorDataset(torch.randn(n, 1, 6, 6, generator=g), torch.arange(n) % 3)
            return DataLoader(ds, batch_size=4), DataLoader(ds, batch_size=6), 3

        def two_loaders():
            return loaders()[:2]
    """)
    model = build_model(f"{mod}:build", (1, 1, 6, 6), None, {"width": 5})
    assert model[0].out_channels == 5 and model[-1].out_features == 3
    data = build_data(DataConfig(source=f"{mod}:loaders", kwargs={"n": 18}), (1, 1, 6, 6))
    assert data.num_classes == 3
    assert len(data.train) == 5 and len(data.val) == 3
    assert "user data" in data.description
    x, _y = next(iter(data.val))
    with torch.no_grad():
        assert model(x).shape == (6, 3)
    assert build_data(DataConfig(source=f"{mod}:two_loaders"), (1, 1, 6, 6)).num_classes is None


def test_module_function_that_cannot_be_imported(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SourceError) as info:
        build_model("no_such_package_xyz.models:build", (1, 1, 8, 8), 10)
    msg = str(info.value)
    assert msg.startswith("model.source: cannot import module 'no_such_package_xyz.models'")
    with pytest.raises(SourceError, match="^data.source: cannot import module"):
        build_data(DataConfig(source="no_such_package_xyz:loaders"), (1, 1, 8, 8))
    mod = _user_module(tmp_path, monkeypatch, """
        from torch import nn
        from torch.nn import functional as F

        def build():
            return 42

        def broken():
            raise RuntimeError("disk full")

        def one_loader():
            return [1, 2, 3, 4]

        NOT_CALLABLE = 3
    """)
    # the module's own functions, the closest first; not what it imported (nn, F)
    with pytest.raises(SourceError, match=rf"model.source: module '{mod}' has no attribute "
                                          r"'biuld'; did you mean 'build'\?; it defines: "
                                          r"broken, build, one_loader$"):
        build_model(f"{mod}:biuld", (1, 1, 8, 8), 10)
    # a factory that raises names itself, the error and where (not a raw traceback)
    with pytest.raises(SourceError, match=rf"^model.source: '{mod}:broken' raised RuntimeError: "
                                          rf"disk full \(at .*{mod}.py:\d+\)$"):
        build_model(f"{mod}:broken", (1, 1, 8, 8), 10)
    with pytest.raises(SourceError, match="returned int, allowed: a torch.nn.Module"):
        build_model(f"{mod}:build", (1, 1, 8, 8), 10)
    with pytest.raises(SourceError, match="data.source: .* raised RuntimeError: disk full"):
        build_data(DataConfig(source=f"{mod}:broken"), (1, 1, 8, 8))
    with pytest.raises(SourceError, match=r"returned list; allowed: \(train_loader, val_loader\)"):
        build_data(DataConfig(source=f"{mod}:one_loader"), (1, 1, 8, 8))
    with pytest.raises(SourceError, match="data.evaluate: .* is not callable"):
        import_object(f"{mod}:NOT_CALLABLE", "data.evaluate")


def _tiny_resnet(**kw: Any) -> nn.Module:
    return build_model("builtin:resnet_tiny", (1, 1, 8, 8), 10, {"width": 8, **kw}).eval()


def test_checkpoint_round_trip_and_nested_state_dict(tmp_path: Path) -> None:
    src, dst = _tiny_resnet(), _tiny_resnet()
    path = tmp_path / "nested.pt"
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, path)
    load_checkpoint(dst, path)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
    # EMA weights (sweep X): alone they are the model's; beside the raw ones, a warning
    ema = _tiny_resnet()
    torch.save({"ema": ema.state_dict(), "epoch": 9}, path)
    load_checkpoint(dst, path)
    with torch.no_grad():
        assert torch.equal(ema(x), dst(x))
    torch.save({"model": src.state_dict(), "model_ema": ema.state_dict()}, path)
    with pytest.warns(UserWarning, match=r"also holds EMA weights \('model_ema'\); the "
                                         r"'model' ones are loaded"):
        load_checkpoint(dst, path)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_checkpoints_of_wrapped_models_and_older_torch_load(tmp_path: Path) -> None:
    """DataParallel/DDP (``module.``), torch.compile (``_orig_mod.``) and Lightning
    (``state_dict`` of ``model.``) prefixes come off; a BatchNorm step counter may be missing
    (older torch, converted weights), as torch's own strict load allows."""
    src = _tiny_resnet()
    state = src.state_dict()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        ref = src(x)
    wrapped = {
        "ddp.pt": {f"module.{k}": v for k, v in state.items()},
        "compiled_ddp.pt": {f"module._orig_mod.{k}": v for k, v in state.items()},
        "lightning.ckpt": {"state_dict": {f"model.{k}": v for k, v in state.items()},
                           "epoch": 3, "global_step": 10},
        "no_counter.pt": {k: v for k, v in state.items()
                          if not k.endswith("num_batches_tracked")},
    }
    for name, content in wrapped.items():
        torch.save(content, tmp_path / name)
        dst = _tiny_resnet()
        load_checkpoint(dst, tmp_path / name)
        with torch.no_grad():
            assert torch.equal(dst(x), ref), name

    # a prefix the model's own keys have too stays on
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = _tiny_resnet()

    src_h = Holder()
    torch.save(src_h.state_dict(), tmp_path / "holder.pt")
    dst_h = Holder()
    load_checkpoint(dst_h, tmp_path / "holder.pt")
    assert torch.equal(dst_h.model.fc.weight, src_h.model.fc.weight)


def test_checkpoint_with_mismatched_keys(tmp_path: Path) -> None:
    state = _tiny_resnet(blocks=1).state_dict()
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "blocks1.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_tiny_resnet(blocks=2), path)
    msg = str(info.value)
    assert msg.startswith("model.checkpoint: weights do not fit the architecture")
    # Every parameter and buffer of the second blocks (6 layers), the first ten listed; not
    # BatchNorm's step counters, which torch fills itself
    assert "missing keys (30): ['layer1.1.bn1.bias', " in msg
    assert "unexpected keys (1): ['extra.weight']" in msg


def test_checkpoint_with_mismatched_shapes(tmp_path: Path) -> None:
    path = tmp_path / "wide.pt"
    torch.save(build_model("builtin:resnet_tiny", (1, 1, 8, 8), 10, {"width": 16}).state_dict(),
               path)
    target = _tiny_resnet()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"shape mismatches \(46\): \['fc.weight: file "
                                              r"\(10, 64\) vs model \(10, 32\)'"):
        load_checkpoint(target, path, field="export.weights")
    # Nothing was loaded.
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_checkpoint_is_loaded_with_weights_only(tmp_path: Path) -> None:
    model = _tiny_resnet()
    path = tmp_path / "pickle.pt"
    torch.save({"state_dict": model.state_dict(), "extra": _Payload()}, path)
    UNPICKLED.clear()
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(model, path)
    assert UNPICKLED == []
    # The file really holds a pickle payload that a full unpickle would run.
    torch.load(path, weights_only=False)
    assert UNPICKLED == ["payload ran"]


def test_checkpoint_missing_or_not_a_state_dict(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(_tiny_resnet(), tmp_path / "none.pt")
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="holds Tensor; allowed: a state dict"):
        load_checkpoint(_tiny_resnet(), path)
    with warnings.catch_warnings():  # torch.jit.script is deprecated: users still have them
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(_tiny_resnet()), tmp_path / "scripted.pt")
        with pytest.raises(CheckpointError, match="it is a TorchScript archive") as info:
            load_checkpoint(_tiny_resnet(), tmp_path / "scripted.pt")
    assert "weights_only` set to `False`" not in str(info.value)  # torch's unsafe advice


def _image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), train: int = 4,
                  val: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 64, (12, 10, 3)) + 128 * c
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def test_imagefolder_source(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "pets")
    data = build_data(DataConfig(source=f"imagefolder:{root}", batch_size=4, eval_batch_size=8),
                      (1, 3, 16, 16))
    assert data.num_classes == 2
    assert "8 train / 4 val images, 2 classes" in data.description
    x, y = next(iter(data.train))
    assert x.shape == (4, 3, 16, 16)
    xv, yv = next(iter(data.val))
    assert xv.shape == (4, 3, 16, 16)
    assert yv.tolist() == [0, 0, 1, 1]
    # Brighter "dog" images stay brighter after the fixed normalisation.
    assert float(xv[2:].mean()) > float(xv[:2].mean())
    grey = build_data(DataConfig(source=f"imagefolder:{root}", batch_size=2), (1, 1, 8, 8))
    assert next(iter(grey.val))[0].shape == (4, 1, 8, 8)
    model = build_model("builtin:tiny_cnn", (1, 3, 16, 16), data.num_classes, {"width": 4})
    with torch.no_grad():
        assert model.eval()(x).shape == (4, 2)


def test_imagefolder_errors(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    (root / "train" / "cat").mkdir(parents=True)
    with pytest.raises(SourceError, match=rf"{root} has no val/ folder; allowed"):
        build_data(DataConfig(source=f"imagefolder:{root}"), (1, 3, 16, 16))
    with pytest.raises(SourceError, match=r"'imagefolder:no/such/data': there is no folder "
                                          r".*no/such/data \(a relative path is looked for "
                                          r"from the current directory, then from the space"):
        build_data(DataConfig(source="imagefolder:no/such/data"), (1, 3, 16, 16))
    other = _image_folder(tmp_path / "other")
    (other / "val" / "dog").rename(other / "val" / "wolf")
    with pytest.raises(SourceError, match=r"train/ classes \['cat', 'dog'\] differ"):
        build_data(DataConfig(source=f"imagefolder:{other}"), (1, 3, 16, 16))


def test_imagefolder_and_builtin_data_that_cannot_work_fail_at_load(tmp_path: Path) -> None:
    """Each of these gave a torchvision, PIL or StopIteration traceback, some mid-training."""
    root = _image_folder(tmp_path / "pets")
    src = f"imagefolder:{root}"
    with pytest.raises(ConfigError, match=r"model.input_shape: got \[1, 4, 16, 16\]; allowed: "
                                          r"1 or 3 channels"):
        build_data(DataConfig(source=src, batch_size=4), (1, 4, 16, 16))
    for source in (src, "builtin:digits"):
        with pytest.raises(ConfigError, match=r"model.input_shape: got \[1, 64\]; allowed: "
                                              r"\[N, C, H, W\]"):
            build_data(DataConfig(source=source, batch_size=4), (1, 64))
        with pytest.raises(ConfigError, match=r"data.kwargs: got \{'val_fraction': 0.5\}; "
                                              r"allowed: \{\}"):
            build_data(DataConfig(source=source, kwargs={"val_fraction": 0.5}), (1, 1, 8, 8))
    with pytest.raises(ConfigError, match=rf"data.batch_size: got 64; allowed: at most 8, the "
                                          rf"training samples of '{re.escape(src)}'"):
        build_data(DataConfig(source=src), (1, 3, 16, 16))
    with pytest.raises(ConfigError, match=r"data.batch_size: got 5000; allowed: at most 1437"):
        build_data(DataConfig(source="builtin:digits", batch_size=5000), (1, 1, 8, 8))
    (root / "val" / "cat" / "notes.txt").write_text("not an image, skipped")
    build_data(DataConfig(source=src, batch_size=4), (1, 3, 16, 16))
    (root / "train" / "cat" / "9.png").write_text("not an image, named like one")
    data = build_data(DataConfig(source=src, batch_size=9), (1, 3, 16, 16))
    with pytest.raises(SourceError, match=r"cannot read the image .*train/cat/9.png"):
        next(iter(data.train))
    (root / "train" / "cat" / "9.png").unlink()
    for split in ("train", "val"):
        (root / split / "fish").mkdir()
    with pytest.raises(SourceError, match=r"train/: .*fish.*allowed: a folder per class"):
        build_data(DataConfig(source=src, batch_size=4), (1, 3, 16, 16))
    # the cached base model's key follows the images: relabelled ones train it again
    from autoprune.base import code_digest

    before = code_digest(src)
    assert before and code_digest(src) == before
    (root / "train" / "dog" / "0.png").rename(root / "train" / "cat" / "dog0.png")
    assert code_digest(src) != before
    one = _image_folder(tmp_path / "one", classes=("cat",))
    with pytest.raises(SourceError, match=r"has 1 class \(\['cat'\]\); allowed: 2 classes"):
        build_data(DataConfig(source=f"imagefolder:{one}", batch_size=2), (1, 3, 16, 16))


def test_relative_imagefolder_resolves_against_project(space_dict: dict[str, Any], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    _image_folder(project / "data" / "pets")
    space_dict["data"] = {"source": "imagefolder:data/pets", "batch_size": 2}
    space = parse_space(space_dict, base_dir=project)
    monkeypatch.chdir(tmp_path)
    assert space.data.source == f"imagefolder:{project / 'data' / 'pets'}"
    space = space.replace(model=ModelConfig(
        source="builtin:tiny_cnn", input_shape=(1, 3, 8, 8), kwargs={"width": 4}))
    model, data, evaluate_fn = load_sources(space)
    assert data.num_classes == 2 and evaluate_fn is None
    assert model[-1].out_features == 2  # num_classes comes from the data


def test_load_sources_rejects_an_input_shape_the_model_refuses(space: SpaceConfig) -> None:
    bad = space.replace(model=ModelConfig(
        source="builtin:tiny_cnn", input_shape=(1, 1, 8, 8), kwargs={"in_channels": 3}))
    with pytest.raises(SourceError) as info:
        load_sources(bad)
    msg = str(info.value)
    assert msg.startswith("model.input_shape: got [1, 1, 8, 8]; the model 'builtin:tiny_cnn' "
                          "rejects float32 inputs of that shape (RuntimeError")


def test_load_sources_rejects_data_of_another_shape(space: SpaceConfig, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _user_module(tmp_path, monkeypatch, """
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        def loaders():
            ds = TensorDataset(torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long))
            return DataLoader(ds, batch_size=4), DataLoader(ds, batch_size=4)
    """)
    bad = space.replace(
        model=ModelConfig(source="builtin:tiny_cnn", input_shape=(1, 1, 16, 16)),
        data=DataConfig(source=f"{mod}:loaders"))
    with pytest.raises(SourceError, match=r"model.input_shape: got \[1, 1, 16, 16\] but "
                                          rf"'{mod}:loaders' yields validation samples of "
                                          r"shape \[1, 8, 8\]"):
        load_sources(bad)


def test_load_sources_on_the_demo_space(space: SpaceConfig) -> None:
    model, data, evaluate_fn = load_sources(space)
    assert evaluate_fn is None
    assert data.num_classes == 10
    assert not model.training
    x, _y = next(iter(data.val))
    with torch.no_grad():
        assert model(x).shape == (x.shape[0], 10)


def test_load_sources_checks_the_model_covers_the_data_classes(
        space: SpaceConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _user_module(tmp_path, monkeypatch, """
        from torch import nn

        def sized(num_classes=10):
            return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))

        def fixed(width=4):
            return nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    """)
    shape = (1, 1, 8, 8)  # digits: 10 classes
    # model.num_classes reaches a user function that has the parameter
    model, _data, _ = load_sources(space.replace(model=ModelConfig(
        source=f"{mod}:sized", input_shape=shape, num_classes=12)))
    assert model[-1].out_features == 12
    with pytest.raises(SourceError, match=rf"model.num_classes: '{mod}:sized' outputs 5 "
                                          r"classes but 'builtin:digits' has labels up to 9 "
                                          r"\(10 classes\); allowed: a model with at least"):
        load_sources(space.replace(model=ModelConfig(
            source=f"{mod}:sized", input_shape=shape, kwargs={"num_classes": 5})))
    with pytest.raises(SourceError, match=rf"model.num_classes: got 10 but '{mod}:fixed' "
                                          r"outputs 5 classes"):
        load_sources(space.replace(model=ModelConfig(
            source=f"{mod}:fixed", input_shape=shape, num_classes=10)))


def test_user_loaders_that_cannot_work_fail_at_load_and_say_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _user_module(tmp_path, monkeypatch, """
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        def _ds(n):
            return TensorDataset(torch.randn(n, 1, 8, 8), torch.arange(n) % 10)

        def empty_val():
            return DataLoader(_ds(16), batch_size=4), DataLoader(_ds(3), batch_size=4,
                                                                 drop_last=True)

        def generator():
            return (b for b in DataLoader(_ds(8), batch_size=4)), DataLoader(_ds(8), batch_size=4)

        def dicts():
            batches = [{"x": torch.randn(4, 1, 8, 8), "y": torch.zeros(4, dtype=torch.long)}]
            return batches, batches

        class Stream(torch.utils.data.IterableDataset):
            def __iter__(self):
                return iter(_ds(8))

        def iterable():  # no length: training counts epochs in batches
            return DataLoader(Stream(), batch_size=4), DataLoader(_ds(8), batch_size=4)

        def datasets():  # data sets, not loaders: one (x, y) sample passed for a batch
            return _ds(8), _ds(8)

        def iterable_val():  # validation needs no length
            return DataLoader(_ds(8), batch_size=4), DataLoader(Stream(), batch_size=4)
    """)
    shape = (1, 1, 8, 8)
    build_data(DataConfig(source=f"{mod}:iterable_val"), shape)
    for fn, message in (
            ("empty_val", "the validation loader yielded no batches"),
            ("generator", "the training loader is a generator without a length"),
            ("iterable", r"the training loader is a DataLoader without a length \(an "
                         r"IterableDataset"),
            ("datasets", r"the training loader is a TensorDataset, a data set; allowed: a "
                         r"DataLoader of it"),
            ("dicts", r"the training loader yields batches of dict with keys \['x', 'y'\]; "
                      r"allowed: \(inputs, labels\) tuples")):
        with pytest.raises(SourceError, match=rf"data.source: '{mod}:{fn}': {message}"):
            build_data(DataConfig(source=f"{mod}:{fn}"), shape)


def test_int32_labels_train() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from autoprune.finetune import train

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    data = DataLoader(TensorDataset(torch.randn(16, 1, 8, 8),
                                    (torch.arange(16) % 10).to(torch.int32)), batch_size=8)
    log = train(model, data, 2, 0.1, "sgd", 0.9, 0.0, 0.0, "cpu")
    assert log.steps == 2


def test_a_model_with_several_outputs_is_refused_at_load(
        space: SpaceConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _user_module(tmp_path, monkeypatch, """
        from torch import nn

        class TwoHeads(nn.Module):
            def __init__(self, num_classes=10):
                super().__init__()
                self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16))
                self.fc, self.aux = nn.Linear(16, num_classes), nn.Linear(16, num_classes)

            def forward(self, x):
                h = self.body(x)
                return self.fc(h), self.aux(h)

        class AuxInTraining(TwoHeads):
            def forward(self, x):
                out = TwoHeads.forward(self, x)
                return out if self.training else out[0]

        def build(num_classes=10):
            return TwoHeads(num_classes)

        def build_aux(num_classes=10):
            return AuxInTraining(num_classes)
    """)
    # in training mode only too (sweep X: a raw traceback in base training, or every trial
    # failed in its fine-tune)
    for fn, mode in (("build", ""), ("build_aux", " in training mode")):
        with pytest.raises(SourceError, match=rf"model.source: '{mod}:{fn}' returns a tuple"
                                              rf"{mode}; allowed: one tensor of logits"):
            load_sources(space.replace(model=ModelConfig(source=f"{mod}:{fn}",
                                                         input_shape=(1, 1, 8, 8))))


_TASKS = """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    def one_logit(num_classes=1):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))

    def float_labels(shape="n1"):
        x = torch.randn(32, 1, 8, 8)
        y = (x.mean((1, 2, 3)) > 0).float()
        y = y[:, None] if shape == "n1" else y
        ds = TensorDataset(x, y)
        return DataLoader(ds, batch_size=8), DataLoader(ds, batch_size=8)

    def segmenter(num_classes=3):
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, num_classes, 1))

    def masks(void=255, flat=False, train_only=False, dtype="int64"):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(48, 1, 8, 8, generator=g)
        y = (x[:, 0] > 0.5).long() + (x[:, 0] > -0.5).long()  # 3 classes by intensity
        clean = y.clone()
        y[:, :2, :2] = void  # a void border, as in VOC or Cityscapes
        y, clean = y.to(getattr(torch, dtype)), clean.to(getattr(torch, dtype))
        ds = TensorDataset(x, y.flatten(1) if flat else y)
        val = TensorDataset(x, clean) if train_only else ds
        return DataLoader(ds, batch_size=8, shuffle=True), DataLoader(val, batch_size=16)

    class Text(nn.Module):
        def __init__(self, num_classes=2):
            super().__init__()
            self.emb, self.fc = nn.Embedding(50, 8), nn.Linear(8, num_classes)

        def forward(self, ids):
            return self.fc(self.emb(ids).mean(1))

    def text(num_classes=2):
        return Text(num_classes)

    def token_ids():
        ds = TensorDataset(torch.randint(0, 50, (16, 12)), torch.randint(0, 2, (16,)))
        return DataLoader(ds, batch_size=8), DataLoader(ds, batch_size=8)
"""


def test_outputs_and_labels_that_make_no_classification_loss_fail_at_load(
        space: SpaceConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A binary classifier with one logit and float labels trained nothing (cross-entropy over
    one class is 0) and scored 42.0 "accuracy"; void labels (255) crashed inside the loss."""
    mod = _user_module(tmp_path, monkeypatch, _TASKS)

    def load(model: str, data: str, shape: tuple[int, ...] = (1, 1, 8, 8),
             dtype: str = "float32", **data_kw: Any) -> Any:
        return load_sources(space.replace(
            model=ModelConfig(source=f"{mod}:{model}", input_shape=shape, input_dtype=dtype),
            data=DataConfig(source=f"{mod}:{data}", **data_kw)))

    with pytest.raises(SourceError, match=r"yields float32 labels of shape \[8, 1\]; allowed: "
                                          r"integer class ids \(int64\)"):
        load("one_logit", "float_labels")
    with pytest.raises(SourceError, match=r"outputs shape \[1, 1\]; allowed: logits \(N, "
                                          r"classes\) .* at least 2 classes"):
        load("one_logit", "masks", kwargs={"flat": True, "void": 0})
    with pytest.raises(SourceError, match=r"labels of shape \[16, 64\] for outputs of shape "
                                          r"\[1, 3, 8, 8\]; allowed: labels of shape \(N, 8, 8\)"):
        load("segmenter", "masks", kwargs={"flat": True})
    for where in ({}, {"train_only": True}):  # void pixels in the training labels only, too
        with pytest.raises(SourceError, match=r"has labels up to 255 \(256 classes\).* set "
                                              r"data.ignore_index: 255"):
            load("segmenter", "masks", kwargs=where)
    with pytest.raises(SourceError, match=r"set data.ignore_index: 255 \(it is 254 now\)"):
        load("segmenter", "masks", ignore_index=254)  # the wrong void label keeps the hint
    with pytest.raises(SourceError, match=r"model.input_dtype: got 'float32' but .*:token_ids' "
                                          r"yields int64 validation inputs; allowed: 'int64'"):
        load("text", "token_ids", shape=(1, 12))
    load("text", "token_ids", shape=(1, 12), dtype="int64")
    with pytest.raises(SourceError, match=r"model.input_dtype: got 'int64' but .*:masks' "
                                          r"yields float32 validation inputs; allowed: 'float32'"):
        load("segmenter", "masks", dtype="int64", ignore_index=255)

    # with the void label named, the loss and the accuracy leave it out
    from autoprune.finetune import train
    from autoprune.measure import top1_accuracy

    model, data, evaluate_fn = load("segmenter", "masks", ignore_index=255)
    assert evaluate_fn is not None
    train(model, data.train, 60, 0.1, ignore_index=255)
    x, y = (torch.cat(t) for t in zip(*[(b[0], b[1]) for b in data.val], strict=True))
    with torch.no_grad():
        pred = model(x).argmax(1)
    keep = y != 255
    expected = float(((pred == y) & keep).sum() / keep.sum())
    assert evaluate_fn(model, data.val) == pytest.approx(expected)
    assert expected > 0.8  # it learned: the loss saw real labels only
    # without it, a void label is not scored as a wrong answer: it is refused, naming the field
    with pytest.raises(SourceError, match=r"a validation batch has the label 255; allowed: "
                                          r"class ids in \[0, 3\) .* data.ignore_index "
                                          r"\(not set\)"):
        top1_accuracy(model, data.val)

    # masks stored as uint8 (VOC, Cityscapes) and int32 labels train, and gradient importance
    # uses the fine-tune's loss: every taylor trial failed on the void label or the dtype
    from autoprune.finetune import class_loss
    from autoprune.prune import prune_model

    for dtype in ("uint8", "int32"):
        model, data, _ = load("segmenter", "masks", ignore_index=255, kwargs={"dtype": dtype})
        assert next(iter(data.train))[1].dtype == getattr(torch, dtype)
        train(model, data.train, 4, 0.1, ignore_index=255)
        pruned, _ = prune_model(model, torch.zeros(1, 1, 8, 8), {"0": 0.5}, "taylor",
                                grad_batches=data.calibration_batches(2),
                                loss_fn=class_loss(255))
        assert pruned[0].out_channels == 4


def test_a_last_training_batch_of_one_sample_fails_at_load_with_batchnorm(
        space: SpaceConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _user_module(tmp_path, monkeypatch, """
        import torch
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset

        def mlp(num_classes=2):
            return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                 nn.Linear(8, num_classes))

        def images(n=9):
            ds = TensorDataset(torch.randn(n, 1, 8, 8), torch.arange(n) % 10)
            return DataLoader(ds, batch_size=4), DataLoader(ds, batch_size=4)

        def rows(n=9, drop_last=False):
            ds = TensorDataset(torch.randn(n, 6), torch.randint(0, 2, (n,)))
            return DataLoader(ds, batch_size=4, drop_last=drop_last), DataLoader(ds, batch_size=4)
    """)

    def load(**kw: Any) -> Any:
        return load_sources(space.replace(
            model=ModelConfig(source=f"{mod}:mlp", input_shape=(1, 6)),
            data=DataConfig(source=f"{mod}:rows", kwargs=kw)))

    with pytest.raises(SourceError, match=r"the training loader's last batch holds 1 sample \(9 "
                                          r"samples, batch size 4\).*drop_last=True"):
        load()
    load(drop_last=True)
    load(n=10)
    # BatchNorm2d trains on one image (H x W values per channel): nothing to refuse there
    conv = load_sources(space.replace(
        model=ModelConfig(source="builtin:tiny_cnn", input_shape=(1, 1, 8, 8)),
        data=DataConfig(source=f"{mod}:images")))[0]
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in conv.modules())


def test_data_problems_past_the_first_batch_or_in_the_user_s_functions_are_named(
        space: SpaceConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad label after the first batch crashed base training with an IndexError, or was
    scored as a wrong answer; float64 inputs, NaN data and a data.evaluate of the wrong
    signature failed with tracebacks after the base model had trained."""
    mod = _user_module(tmp_path, monkeypatch, """
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        def data(bad="", n=64):
            x, y = torch.randn(n, 1, 8, 8), torch.arange(n) % 10
            xv, yv = x.clone(), y.clone()
            if bad == "train_label":
                y[40] = 12
            if bad == "val_label":
                yv[40] = 12
            if bad == "nan":
                x[3] = float("nan")
            if bad == "val_inf":
                xv[35, 0, 2, 2] = float("inf")
            if bad == "double":
                x, xv = x.double(), xv.double()
            return (DataLoader(TensorDataset(x, y), batch_size=16),
                    DataLoader(TensorDataset(xv, yv), batch_size=16))

        def one_arg(model):
            return 1.0

        def nan_score(model, loader):
            return float("nan")
    """)
    from autoprune.base import base_checkpoint
    from autoprune.finetune import train
    from autoprune.measure import evaluate

    def load(bad: str = "", **data_kw: Any) -> Any:
        return load_sources(space.replace(
            data=DataConfig(source=f"{mod}:data", kwargs={"bad": bad}, **data_kw)))

    model, data, _ = load("train_label")
    with pytest.raises(SourceError, match=r"a training batch has the label 12; allowed: class "
                                          r"ids in \[0, 10\)"):
        train(model, data.train, 4, 0.1)
    model, data, _ = load("val_label")
    with pytest.raises(SourceError, match=r"a validation batch has the label 12"):
        evaluate(model, data.val)
    with pytest.raises(SourceError, match=r"yields float64 validation inputs; allowed: "
                                          r"float32 inputs"):
        load("double")
    with pytest.raises(SourceError, match=r"a training batch has a NaN or infinite input "
                                          r"\(sample 3 of the batch\); allowed: finite"):
        load("nan")
    model, data, _ = load("val_inf")  # past the first batch: scored as a prediction before
    with pytest.raises(SourceError, match=r"a validation batch has a NaN or infinite input "
                                          r"\(sample 3 of the batch\)"):
        evaluate(model, data.val)
    model, data, _ = load()
    steep = dataclasses.replace(space.model,
                                train=dataclasses.replace(space.model.train, lr=1e12))
    with pytest.raises(SourceError, match=r"model.train: training the base model diverged"):
        base_checkpoint(space.replace(runs_dir=str(tmp_path / "runs"), model=steep,
                                      data=DataConfig(source=f"{mod}:data")),
                        model, data, torch.device("cpu"))
    with pytest.raises(SourceError, match=rf"data.evaluate: '{mod}:one_arg' cannot be called as "
                                          r"fn\(model, loader\)"):
        load(evaluate=f"{mod}:one_arg")
    model, data, fn = load(evaluate=f"{mod}:nan_score")
    with pytest.raises(SourceError, match=rf"data.evaluate: '{mod}:nan_score' returned nan; "
                                          r"allowed: a finite score"):
        evaluate(model, data.val, fn=fn)


def test_data_problems_the_first_batch_hides_fail_before_the_base_trains(
        space: SpaceConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sweep U: a float64 training split (only the validation split's dtype was checked), the
    data function's third item, sparse class ids, all-void validation labels, a bad label past
    the first validation batch and a data.evaluate that raises or returns no number each
    failed with a traceback or a misleading message, several after the base model trained
    (and lost it). Each is a named error now, before any training."""
    mod = _user_module(tmp_path, monkeypatch, """
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        def data(bad="", third=None, n=64):
            x, y = torch.randn(n, 1, 8, 8), torch.arange(n) % 10
            xv, yv = x.clone(), y.clone()
            if bad == "train_double":
                x = x.double()
            if bad == "train_shape":
                x = torch.randn(n, 1, 10, 10)
            if bad == "sparse":
                y, yv = y % 3 * 3, yv % 3 * 3  # 0, 3, 6
            if bad == "void":
                yv[:] = -100
            if bad == "late":
                yv[-1] = 12
            out = (DataLoader(TensorDataset(x, y), batch_size=16),
                   DataLoader(TensorDataset(xv, yv), batch_size=16))
            return out if third is None else (*out, third)

        def raises(model, loader):
            raise KeyError("top5")

        def as_dict(model, loader):
            return {"acc": 0.5}

        def nan(model, loader):
            return float("nan")
    """)
    import autoprune.base as base_mod
    from autoprune.base import base_checkpoint

    def load(bad: str = "", third: Any = None, **data_kw: Any) -> Any:
        return load_sources(space.replace(data=DataConfig(
            source=f"{mod}:data", kwargs={"bad": bad, "third": third}, **data_kw)))

    with pytest.raises(SourceError, match=r"yields float64 training inputs; allowed: float32"):
        load("train_double")
    with pytest.raises(SourceError, match=r"data.source: .* yields training samples of shape "
                                          r"\[1, 10, 10\] and validation samples of shape "
                                          r"\[1, 8, 8\] \(model.input_shape"):
        load("train_shape")
    for third, shown in ((["a", "b"], r"\['a', 'b'\]"), (10.7, "10.7"), (1, "1"), (True, "True"),
                         ("10", "'10'")):
        with pytest.raises(SourceError, match=rf"returned {shown} as its third item, the number "
                                              r"of classes.*allowed: an integer of at least 2"):
            load(third=third)
    for third in (torch.tensor(10), 10.0, torch.tensor([9.0]).max() + 1):  # whole numbers
        assert load(third=third)[1].num_classes == 10
    with pytest.raises(SourceError, match=r"gives num_classes 3 but has the label 6; allowed: "
                                          r"class ids 0 to 2 \(map sparse ids"):
        load("sparse", third=3)
    trained: list[int] = []
    monkeypatch.setattr(base_mod, "train_base", lambda *a, **k: trained.append(1))
    runs = str(tmp_path / "runs")
    for bad, evaluate, error in (
            ("void", None, r"every one of the 64 validation labels is -100"),
            ("late", None, r"a validation batch has the label 12"),
            ("", f"{mod}:raises", rf"data.evaluate: '{mod}:raises' raised KeyError: 'top5'"),
            ("", f"{mod}:as_dict", rf"data.evaluate: '{mod}:as_dict' returned dict "
                                   r"\{'acc': 0.5\}; allowed: a finite score")):
        model, data, fn = load(bad, evaluate=evaluate)
        with pytest.raises(SourceError, match=error):
            base_checkpoint(space.replace(runs_dir=runs, data=DataConfig(source=f"{mod}:data")),
                            model, data, torch.device("cpu"), fn)
    assert not trained
    # NaN may be an untrained model's fair score (an undefined mean IoU): judged after the
    # training, which is saved before it is scored
    model, data, fn = load(evaluate=f"{mod}:nan")
    trained_space = space.replace(runs_dir=runs, data=DataConfig(source=f"{mod}:data"))
    with pytest.raises(SourceError, match=rf"data.evaluate: '{mod}:nan' returned nan"):
        base_checkpoint(trained_space, model, data, torch.device("cpu"), fn)
    assert trained == [1] and base_mod.base_cache_path(trained_space).exists()


def test_a_validation_split_without_some_classes_says_so(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Sweep U10: a validation split with no sample of a class was searched without a word,
    although no accuracy on it can see a pruned model lose that class."""
    from autoprune.base import warn_missing_classes
    from autoprune.measure import Tally, top1_accuracy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    x, y = torch.randn(80, 1, 8, 8), torch.arange(80) % 10

    def warned(labels: torch.Tensor, num_classes: int | None) -> str:
        tally = Tally()
        top1_accuracy(model, [(x[:40], labels[:40]), (x[40:], labels[40:])], tally=tally)
        warn_missing_classes(tally, num_classes)
        return capsys.readouterr().err

    assert warned(y, 10) == "" and warned(y, None) == ""
    assert ("warning: the validation split holds no label of 2 of 10 classes (3, 7): the "
            "accuracy cannot see a pruned model lose them") in warned(
        torch.where((y == 3) | (y == 7), 0, y), None)
    # the data says 10 classes, the labels stop at 7: 8 and 9 are missing too
    assert "no label of 2 of 10 classes (8, 9)" in warned(y % 8, 10)
    # a model with more outputs than the data's classes: only the data's classes count
    assert warned(y % 8, 8) == ""


def test_wrapped_scripted_and_parametrized_models_are_unwrapped_or_named(
        space: SpaceConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sweep X: torch.compile(model) counted 0 MACs (every trial then failed dividing by
    them) and failed the base's ONNX export after training; nn.DataParallel(model) failed
    there too; a TorchScript module, an old-style weight_norm and a parametrization
    (weight_norm, spectral_norm) ended in raw tracebacks or in a refusal of every group that
    named Torch-Pruning's internals."""
    mod = _user_module(tmp_path, monkeypatch, """
        import torch
        from torch import nn
        from torch.nn.utils import parametrizations, weight_norm

        def make():
            return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

        def compiled():
            return torch.compile(make())

        def parallel():
            return nn.DataParallel(make())

        def scripted():
            return torch.jit.script(make())

        def old_norm():
            m = make()
            weight_norm(m[0])
            return m

        def spectral_head():
            m = make()
            parametrizations.spectral_norm(m[5])
            return m

        def masked():
            from torch.nn.utils import prune
            m = make()
            prune.l1_unstructured(m[0], "weight", amount=0.3)
            return m

        def new_norm():
            m = make()
            parametrizations.weight_norm(m[0])
            return m
    """)
    from autoprune.sources import build_model

    for wrapped in ("compiled", "parallel"):
        model = build_model(f"{mod}:{wrapped}", (1, 1, 8, 8), None)
        assert isinstance(model, nn.Sequential)
    for name, error in (("scripted", "returns a TorchScript module, which cannot be pruned"),
                        ("old_norm", r"has layers with the old torch.nn.utils weight_norm or "
                                     r"spectral_norm, .*\('0'\); allowed: .*remove_weight_norm"),
                        ("masked", r"has layers with torch.nn.utils.prune masks .*\('0'\); "
                                   r"allowed: .*prune.remove")):
        with pytest.raises(SourceError, match=rf"model.source: '{mod}:{name}' {error}"):
            build_model(f"{mod}:{name}", (1, 1, 8, 8), None)
    # half-precision weights were blamed on model.input_shape (sweep X F12)
    from autoprune.base import example_output

    with pytest.raises(SourceError, match=r"model.source: 'half' has float16 weights; allowed: "
                                          r"float32 weights"):
        example_output(nn.Linear(64, 10).half(), "half", (1, 64), "float32")
    # a new-style parametrization fails only the groups whose layers have it, named there
    # (refused at load, a model whose parametrized head's group was ignored was refused too)
    from autoprune.prune import failing_groups

    example = torch.zeros(1, 1, 8, 8)
    for name, layer in (("spectral_head", "5"), ("new_norm", "0")):
        why = failing_groups(build_model(f"{mod}:{name}", (1, 1, 8, 8), None), example,
                             {"0": 0.5})
        assert why["0"].startswith("pruning it to ratio 0.5 fails (layers with a weight "
                                   "parametrization (weight_norm, spectral_norm) cannot be "
                                   f"pruned ({layer})")


def test_a_model_onnx_cannot_take_is_named_before_the_base_trains(
        space: SpaceConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sweep X: with latency.runtime onnxruntime, a model the exporters cannot take failed
    with a raw traceback when the base latency was measured, after the base model trained."""
    import autoprune.base as base_mod
    from autoprune.base import base_checkpoint

    def cannot(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("ONNX export failed: Couldn't export operator aten::unique")

    trained: list[int] = []
    monkeypatch.setattr(base_mod, "export_onnx", cannot)
    monkeypatch.setattr(base_mod, "train_base", lambda *a, **k: trained.append(1))
    runs = space.replace(runs_dir=str(tmp_path / "runs"),
                         latency=dataclasses.replace(space.latency, runtime="onnxruntime"))
    model, data, fn = load_sources(runs)
    with pytest.raises(SourceError, match=r"cannot be exported to ONNX and run in ONNX Runtime "
                                          r"\(RuntimeError: ONNX export failed: .*allowed: "
                                          r".*latency.runtime: torch"):
        base_checkpoint(runs, model, data, torch.device("cpu"), fn)
    assert not trained


def test_distillation_on_dense_outputs_is_per_prediction() -> None:
    """The KL term is a mean per prediction (per pixel for dense logits), as the cross-entropy
    is: summed over 32 x 32 pixels it swamped the loss and wrecked segmentation fine-tunes."""
    from autoprune.finetune import Trainer

    torch.manual_seed(0)
    student = nn.Conv2d(2, 4, 1)
    teacher = nn.Conv2d(2, 4, 1)
    x, y = torch.randn(3, 2, 32, 32), torch.randint(0, 4, (3, 32, 32))
    trainer = Trainer(student, [(x, y)], 1, 0.1, teacher=teacher, alpha=1.0, temperature=2.0)
    flat = (lambda t: t.permute(0, 2, 3, 1).reshape(-1, 4))  # noqa: E731
    with torch.no_grad():
        expected = nn.functional.kl_div(
            nn.functional.log_softmax(flat(student(x)) / 2, dim=1),
            nn.functional.softmax(flat(teacher(x)) / 2, dim=1), reduction="batchmean") * 4
        assert trainer._loss(x, y) == pytest.approx(float(expected), rel=1e-5)


def test_cached_base_model_follows_the_user_code(space: SpaceConfig, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A base model trained for a user's model/data function is cached by the file that
    defines them too: after an edit it is trained again, not silently reused."""
    import importlib
    import sys

    from autoprune.base import base_checkpoint
    from autoprune.config import TrainConfig

    code = """
        import torch
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset

        def build(num_classes=3):
            return nn.Sequential(nn.Flatten(), nn.Linear(36, num_classes))

        def loaders():
            ds = TensorDataset(torch.randn(8, 1, 6, 6), torch.arange(8) % 3)
            return DataLoader(ds, batch_size=4), DataLoader(ds, batch_size=4)
    """
    mod = _user_module(tmp_path, monkeypatch, code)
    monkeypatch.chdir(tmp_path)  # run from the model's folder, as `cd project && autoprune`
    spec = space.replace(
        model=ModelConfig(source=f"{mod}:build", input_shape=(1, 1, 6, 6),
                          train=TrainConfig(epochs=1)),
        data=DataConfig(source=f"{mod}:loaders"), runs_dir=str(tmp_path / "runs"))
    model, data, _ = load_sources(spec)
    # the file's own hash: torch.ops' relative file name ("_ops.py") had been read from the
    # working directory as one of the project's files, which failed and emptied the hash
    from autoprune.base import code_digest

    own = hashlib.sha256((tmp_path / f"{mod}.py").read_bytes()).hexdigest()[:16]
    assert code_digest(f"{mod}:build") == own
    first = base_checkpoint(spec, model, data, torch.device("cpu"))
    assert base_checkpoint(spec, model, data, torch.device("cpu")) == first  # cached
    edited = textwrap.dedent(code).replace("36, num_classes", "36, num_classes, bias=False")
    (tmp_path / f"{mod}.py").write_text(edited)
    importlib.reload(sys.modules[mod])
    model, data, _ = load_sources(spec)
    second = base_checkpoint(spec, model, data, torch.device("cpu"))
    assert second != first and first.exists() and second.exists()

    # a file of the user's project that the model file imports is the model's code too
    helper = f"{mod}_parts"
    (tmp_path / f"{helper}.py").write_text("def head(n):\n    return n\n")
    (tmp_path / f"{mod}.py").write_text(edited.replace(
        "def build(", f"from {helper} import head\n\ndef build(").replace(
        "num_classes, bias=False", "head(num_classes), bias=False"))
    importlib.reload(sys.modules[mod])
    model, data, _ = load_sources(spec)
    third = base_checkpoint(spec, model, data, torch.device("cpu"))
    assert base_checkpoint(spec, model, data, torch.device("cpu")) == third != second
    (tmp_path / f"{helper}.py").write_text("def head(n):\n    return n + 0  # edited\n")
    importlib.reload(sys.modules[helper])
    model, data, _ = load_sources(spec)
    assert base_checkpoint(spec, model, data, torch.device("cpu")) not in (first, second, third)


def test_a_base_trained_here_gets_the_batchnorm_statistics_trials_get(
        space: SpaceConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a short training BatchNorm's running averages lag the weights: a base scored at
    chance (0.33 on 3 classes, training loss 0.006) while trials, recalibrated, scored 1.0."""
    mod = _user_module(tmp_path, monkeypatch, """
        import torch
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset

        def build(num_classes=3):
            return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

        def loaders():
            g = torch.Generator().manual_seed(0)
            y = torch.arange(96) % 3
            x = torch.randn(96, 1, 6, 6, generator=g) + 40.0 * y[:, None, None, None]
            ds = TensorDataset(x, y)
            return (DataLoader(ds, batch_size=32, shuffle=True, drop_last=True),
                    DataLoader(ds, batch_size=32))
    """)
    import json

    from autoprune.base import base_checkpoint
    from autoprune.config import TrainConfig
    from autoprune.finetune import adaptive_bn
    from autoprune.measure import evaluate

    spec = space.replace(
        model=ModelConfig(source=f"{mod}:build", input_shape=(1, 1, 6, 6),
                          train=TrainConfig(epochs=1, lr=0.05)),
        data=DataConfig(source=f"{mod}:loaders"), runs_dir=str(tmp_path / "runs"))
    model, data, _ = load_sources(spec)
    path = base_checkpoint(spec, model, data, torch.device("cpu"))  # 3 steps of training
    bn = model[1]
    assert int(bn.num_batches_tracked) == spec.finetune.bn_calibration_batches
    recorded = json.loads(path.with_suffix(".json").read_text())["val_accuracy"]
    assert recorded == evaluate(model, data.val)
    again = adaptive_bn(model, data.train, spec.finetune.bn_calibration_batches)
    assert again and evaluate(model, data.val) == pytest.approx(recorded, abs=0.05)
