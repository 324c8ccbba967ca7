"""Rebuild a pruned model from an exported ``prune_config.json``: no search, no importance.

The config follows a published JSON Schema (``autoprune/schemas/prune_config.schema.json``) and
is validated on read. The architecture comes from the base model's source plus the pruning record
(:func:`autoprune.prune.replay`), the same code the trials used.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

import autoprune
from autoprune.base import sha256_file
from autoprune.errors import AutopruneError, CheckpointError
from autoprune.measure import example_input
from autoprune.prune import PruneRecord, replay
from autoprune.sources import build_model, load_checkpoint

SCHEMA_VERSION = 1


def schema() -> dict[str, Any]:
    text = resources.files("autoprune").joinpath("schemas/prune_config.schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def validate_config(data: Any, where: str = "prune_config.json") -> dict[str, Any]:
    """Check a config against the published JSON Schema; errors name the JSON path."""
    import jsonschema

    if isinstance(data, dict) and data.get("schema_version") not in (SCHEMA_VERSION, None):
        raise AutopruneError(f"{where}: schema_version {data.get('schema_version')!r} is not "
                             f"supported; allowed: {SCHEMA_VERSION} (autoprune "
                             f"{autoprune.__version__})")
    errors = sorted(jsonschema.Draft202012Validator(schema()).iter_errors(data),
                    key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
                 for e in errors[:10]]
        raise AutopruneError(f"{where}: does not follow the prune_config schema:\n"
                             + "\n".join(lines))
    return dict(data)


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise AutopruneError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise AutopruneError(f"{path}: not valid JSON ({e})") from e
    return validate_config(data, str(path))


def base_architecture(config: dict[str, Any]) -> nn.Module:
    """The base model, built through ``model.source`` as it is now: code that is not the
    export's (another project's package of the same name, an edit since) is said, as it may
    compute something else with the same weights (sweep W: outputs 16.9 apart, no word)."""
    m = config["model"]
    if m.get("code_digest"):
        from autoprune.base import code_digest

        now = code_digest(m["source"])
        if now and now != m["code_digest"]:
            import warnings

            warnings.warn(f"model.source {m['source']!r}: the code imported here is not the code "
                          "the model was exported with (its files differ: edited since, or "
                          "another project's module of that name); the rebuilt model may "
                          "compute something else with the same weights", stacklevel=3)
    return build_model(m["source"], tuple(m["input_shape"]), m.get("num_classes"),
                       m.get("kwargs") or {}).eval()


def rebuild(config: dict[str, Any], checkpoint: str | Path | None = None,
            weights: str | Path | None = None, force: bool = False) -> nn.Module:
    """The pruned architecture from a config: base model, (base checkpoint,) record, weights.

    Args:
        config: a validated prune config.
        checkpoint: the base checkpoint; its SHA-256 must match the config unless ``force``.
        weights: the pruned model's fine-tuned state dict.
        force: accept a base checkpoint whose hash differs.
    """
    for flag, path in (("--checkpoint", checkpoint), ("--weights", weights)):
        if path is not None and not Path(path).is_file():
            raise CheckpointError(f"{flag}: {path}: no such file; allowed: a state dict "
                                  "saved with torch.save (the export's weights.pt for "
                                  "--weights, the base model's for --checkpoint)")
    model = base_architecture(config)
    if checkpoint is not None:
        digest = sha256_file(checkpoint)
        if digest != config["model"]["checkpoint_sha256"] and not force:
            raise CheckpointError(
                f"--checkpoint: {checkpoint} has SHA-256 {digest[:16]}..., the config was made "
                f"from {config['model']['checkpoint_sha256'][:16]}...; allowed: the same base "
                "checkpoint, or --force to rebuild anyway")
        load_checkpoint(model, checkpoint, "--checkpoint")
    record = PruneRecord.from_dict({k: config["pruning"].get(k, [] if k == "ignore" else None)
                                    for k in ("ratios", "kept_channels", "base_channels",
                                              "importance", "round_to", "ignore", "history")})
    pruned = replay(model, example_input(config["model"]["input_shape"],
                                         config["model"].get("input_dtype", "float32")), record)
    if weights is not None:
        load_checkpoint(pruned, weights, "--weights")
    return pruned.eval()


def load_pruned(config_path: str | Path, weights_path: str | Path) -> nn.Module:
    """Rebuild an exported pruned model, ready for inference.

    Example:
        >>> import autoprune  # doctest: +SKIP
        >>> model = autoprune.load_pruned("runs/export/prune_config.json",
        ...                               "runs/export/weights.pt")  # doctest: +SKIP
        >>> logits = model(torch.randn(8, 1, 8, 8))  # doctest: +SKIP
    """
    return rebuild(read_config(config_path), weights=weights_path)
