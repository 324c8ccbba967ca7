"""Model sources: a timm-style registry of built-in models, torchvision, and user factories.

``builtin:<name>``      small CNNs/ResNets sized for the built-in data (see ``list_models()``)
``torchvision:<name>``  any torchvision classification model, built with ``weights=None``
``pkg.module:function`` the user's factory, called with ``**model.kwargs``
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoprune.errors import CheckpointError, SourceError
from autoprune.sources._imports import import_object

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: make ``fn(in_channels, num_classes, **kw)`` available as ``builtin:<name>``."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Names of the built-in models matching a glob pattern."""
    import autoprune.sources._builtin_models  # noqa: F401  (registers the catalogue)

    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def build_model(source: str, input_shape: tuple[int, ...], num_classes: int | None,
                kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build the model named by ``source``; nothing is downloaded.

    Args:
        source: ``builtin:<name>``, ``torchvision:<name>`` or ``pkg.module:function``.
        input_shape: e.g. ``(1, 3, 32, 32)``; its channel count sizes built-in models.
        num_classes: classifier size, or None to keep the factory's default; passed to a
            user factory only when it has a ``num_classes`` parameter.
        kwargs: extra keyword arguments for the factory.
    """
    kwargs = dict(kwargs or {})
    kind, _, name = source.partition(":")
    if kind == "builtin":
        names = list_models()
        if name not in _REGISTRY:
            raise SourceError(f"model.source: got {source!r}; allowed builtin models: {names}")
        if num_classes is not None:
            kwargs.setdefault("num_classes", num_classes)
        kwargs.setdefault("in_channels", input_shape[1])
        return _call(_REGISTRY[name], kwargs, source)
    if kind == "torchvision":
        return _torchvision_model(name, num_classes, kwargs)
    if ":" in source:
        factory = import_object(source, "model.source")
        if num_classes is not None and _takes(factory, "num_classes"):
            kwargs.setdefault("num_classes", num_classes)
        model = _call(factory, kwargs, source)
        if not isinstance(model, nn.Module):
            raise SourceError(f"model.source: {source!r} returned {type(model).__name__}, "
                              "allowed: a torch.nn.Module")
        return prunable(model, source)
    raise SourceError(f"model.source: got {source!r}; allowed: 'builtin:<name>', "
                      "'torchvision:<name>' or 'package.module:function'")


#: How to get on with a layer whose weight is parametrized (weight_norm, spectral_norm).
PARAMETRIZED_FIX = (
    "the layers without it: after loading your weights in the model function, "
    "torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight') (or "
    "torch.nn.utils.remove_weight_norm(layer) for the old weight_norm) keeps what they "
    "compute, with plain weights")


def prunable(model: nn.Module, source: str) -> nn.Module:
    """The plain module behind a wrapper autoprune can see through (``torch.compile``'s,
    ``nn.DataParallel``'s: the checkpoint loader already drops their key prefixes), or a
    :class:`SourceError` for what Torch-Pruning cannot prune: a TorchScript module, and layers
    with a parametrization (``weight_norm``, ``spectral_norm``), new or old style. Each had
    ended in a raw traceback, some after the base model trained, or in a refusal of every
    group that named Torch-Pruning's internals."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile(model)
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            break
    if isinstance(model, torch.jit.ScriptModule):
        raise SourceError(f"model.source: {source!r} returns a TorchScript module, which "
                          "cannot be pruned (its code is compiled); allowed: the nn.Module "
                          "before torch.jit.script or torch.jit.trace (script the exported "
                          "model instead)")
    scripted = [n for n, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)]
    # the old weight_norm / spectral_norm hooks fail Torch-Pruning on any layer (a deepcopy of
    # their non-leaf weight); a new-style parametrization only on a layer pruned, which
    # prune_model names (one on the head, never pruned, is fine)
    normed = [n for n, m in model.named_modules() if any(
        type(h).__name__ in ("WeightNorm", "SpectralNorm")
        for h in m._forward_pre_hooks.values())]
    masked = [n for n, m in model.named_modules() if any(
        type(h).__module__ == "torch.nn.utils.prune" for h in m._forward_pre_hooks.values())]
    for found, what, fix in (
            (scripted, "TorchScript submodules", "plain nn.Modules"),
            (masked, "torch.nn.utils.prune masks (weight_orig and weight_mask)",
             "the layers with their masks made permanent: torch.nn.utils.prune.remove(layer, "
             "'weight') in the model function, after loading your weights"),
            (normed, "the old torch.nn.utils weight_norm or spectral_norm", PARAMETRIZED_FIX)):
        if found:
            shown = ", ".join(repr(n) for n in found[:4]) + (", ..." if len(found) > 4 else "")
            raise SourceError(f"model.source: {source!r} has layers with {what}, which "
                              f"Torch-Pruning cannot prune ({shown}); allowed: {fix}")
    return model


def _call(factory: Any, kwargs: dict[str, Any], source: str) -> Any:
    """``factory(**kwargs)``; arguments it does not take are a ``model.kwargs`` error."""
    import inspect

    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no signature to read: let the call tell
        params = None
    if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise SourceError(f"model.kwargs: got {unknown} for {source}; allowed: its "
                              f"parameters {sorted(params)}")
    try:
        return factory(**kwargs)
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's factory: say which and where
        if isinstance(e, TypeError) and "unexpected keyword argument" in str(e):
            raise SourceError(f"model.kwargs: {source} does not take them ({e})") from None
        raise SourceError(f"model.source: {source!r} raised {type(e).__name__}: {e}"
                          f"{_where(e)}") from e


def _where(e: BaseException) -> str:
    """`` (at file:line)``, the innermost frame of the traceback, where it is not torch's."""
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "site-packages" not in f.filename and "/autoprune/" not in f.filename]
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def _takes(fn: Any, name: str) -> bool:
    """Whether ``fn`` has a parameter called ``name`` (not just ``**kwargs``)."""
    import inspect

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _torchvision_model(name: str, num_classes: int | None, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        import difflib

        close = difflib.get_close_matches(name, available, n=3)
        raise SourceError(f"model.source: got 'torchvision:{name}'; close matches: {close}; "
                          f"allowed: any of the {len(available)} torchvision classification "
                          "models")
    if kwargs.get("weights") not in (None, "None"):
        raise SourceError("model.kwargs.weights: autoprune never downloads weights; allowed: "
                          "null (use model.checkpoint for pretrained weights)")
    kwargs["weights"] = None
    if num_classes is not None:
        kwargs.setdefault("num_classes", num_classes)
    if name in ("googlenet", "inception_v3"):
        # Aux heads only exist in training mode and break a fixed graph; the scipy-based init
        # is slow.
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", False)
    return _call(lambda **kw: torchvision.models.get_model(name, **kw), kwargs,
                 f"torchvision:{name}")


#: Keys under which trainers keep a model's EMA weights beside (or in place of) its own.
EMA_KEYS = ("state_dict_ema", "model_ema", "ema", "ema_state_dict")


def load_checkpoint(model: nn.Module, path: str | Path, field: str = "model.checkpoint") -> None:
    """Load a state dict with ``weights_only=True``; mismatches are listed key by key."""
    path = Path(path)
    if not path.exists():
        where = "" if path.is_absolute() else (
            f" (a relative path is looked for from {Path.cwd()}"
            + (", then from the space file's folder)" if field == "model.checkpoint" else ")"))
        raise CheckpointError(f"{field}: file {str(path)!r} does not exist{where}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the user's file
        raise CheckpointError(f"{field}: cannot read {str(path)!r} as a state dict with "
                              f"weights_only=True: {_unreadable(e)}; allowed: a file written by "
                              "torch.save(model.state_dict(), path)") from e
    ema = [k for k in EMA_KEYS if isinstance(state, dict) and isinstance(state.get(k), dict)]
    keys = [k for k in ("state_dict", "model_state_dict", "model")
            if isinstance(state, dict) and isinstance(state.get(k), dict)]
    if ema and keys:  # the raw weights are loaded; the EMA ones were passed over silently
        warnings.warn(f"{field}: {str(path)!r} also holds EMA weights ({ema[0]!r}); the "
                      f"{keys[0]!r} ones are loaded (to prune the EMA weights, save them as a "
                      "state dict of their own)", stacklevel=2)
    elif ema:  # only EMA weights (timm's 'ema', 'model_ema'): those are the model's
        state = state[ema[0]]
    for key in keys:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"{field}: {str(path)!r} holds {type(state).__name__}; "
                              "allowed: a state dict (mapping of tensor names to tensors)")
    load_state_dict_strict(model, unwrapped(state, model.state_dict().keys()), field)


def unwrapped(state: dict[str, Any], own: Any) -> dict[str, Any]:
    """``state`` with wrappers' prefixes taken off every key, as far as makes the most keys
    match the model's; as it is when none helps. Wrappers put a name before every key:
    DataParallel/DDP ``module.``, torch.compile ``_orig_mod.``, a Lightning or trainer module
    holding the network as ``self.model`` (``module._orig_mod.x`` -> ``x``)."""
    own = set(own)
    best, score = state, len(own & set(state))
    while state:
        heads = {k.partition(".")[0] for k in state}
        if len(heads) != 1 or not all("." in k for k in state):
            break
        prefix = heads.pop() + "."
        state = {k[len(prefix):]: v for k, v in state.items()}
        if len(own & set(state)) > score:
            best, score = state, len(own & set(state))
    return best


def _unreadable(e: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, without torch's advice to unpickle
    arbitrary objects (wrong for a corrupt file, unsafe for one from elsewhere)."""
    import re

    text = str(e)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return (f"it holds a pickled {found.group(1)} object, not only tensors (load it in your "
                "own code and save its state_dict())")
    if "TorchScript archive" in text:
        return ("it is a TorchScript archive (torch.jit.save), not a state dict (load it with "
                "torch.jit.load and save its state_dict())")
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if found:
        return f"it is not a torch state dict file ({found.group(1).strip()})"
    return text.split("\n")[0].strip() or type(e).__name__


def cpu_state(state: Mapping[str, torch.Tensor], clone: bool = False) -> dict[str, Any]:
    """``state`` detached on the CPU (copied with ``clone``), keeping the module versions a
    state dict carries (``_metadata``): a plain ``{k: v}`` copy dropped them, and a model that
    checks its version when loading (torchvision's MNASNet) refused the kept trial weights."""
    out = OrderedDict((k, v.detach().cpu().clone() if clone else v.detach().cpu())
                      for k, v in state.items())
    meta = getattr(state, "_metadata", None)
    if meta is not None:
        out._metadata = copy.deepcopy(meta)  # type: ignore[attr-defined]
    return out


def load_state_dict_strict(model: nn.Module, state: dict[str, Any], field: str) -> None:
    """``model.load_state_dict`` whose error lists missing, unexpected and mis-shaped keys.

    A state dict without module versions (a plain dict of tensors, a checkpoint whose keys
    were renamed) that holds exactly the model's keys is read as of the model's own versions,
    the layout its keys and shapes were just checked against; torch would take it for the
    oldest layout, which MNASNet refuses. One that lacks keys an older layout lacked (BatchNorm's
    step counter) keeps torch's reading, which fills them in.
    """
    own = model.state_dict()
    # BatchNorm fills a missing step counter itself (files from older torch, converted weights)
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state))
              if hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing[:10]}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:10]}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {shapes[:10]}")
        raise CheckpointError(f"{field}: weights do not fit the architecture; " + "; ".join(parts))
    if getattr(state, "_metadata", None) is None and set(state) == set(own):
        state = OrderedDict(state)
        state._metadata = own._metadata  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=True)
