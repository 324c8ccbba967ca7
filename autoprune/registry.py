"""MLflow Model Registry: log the exported model on its trial's run and register a version.

Notes from MLflow 3: ``mlflow.pytorch.log_model`` defaults to the ``pt2`` format, which needs an
input example, and a batch-1 example pins the loaded model to batch 1, so the example has batch
2. ``pip_requirements`` is given to skip a slow inference of the environment.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoprune.errors import AutopruneError


def check_names(name: str | None, alias: str) -> None:
    """``--register`` and ``--alias`` as MLflow's registry takes them, checked before any work
    (MLflow checks them only once the model is logged, or the version made).

    Raises:
        AutopruneError: naming the option, the value and MLflow's rule.
    """
    if name is None:
        return
    from mlflow.exceptions import MlflowException
    from mlflow.utils import validation

    checks = (("--register", name, ("_validate_model_name",)),
              ("--alias", alias, ("_validate_model_alias_name",
                                  "_validate_model_alias_name_reserved")))
    for option, value, names in checks:
        for check in names:
            try:
                getattr(validation, check, lambda _v: None)(value)
            except MlflowException as e:
                raise AutopruneError(f"{option}: got {value!r}; allowed: a name MLflow's "
                                     f"registry takes ({e.message})") from None


def register_model(tracking_uri: str, run_id: str | None, name: str, alias: str,
                   model: nn.Module, onnx_path: Path, input_shape: tuple[int, ...],
                   dtype: str = "float32", metadata: dict[str, Any] | None = None) -> str:
    """Log ONNX and PyTorch flavours on ``run_id`` (the trial's run), register, set the alias.
    ``metadata`` (the data source and its preprocessing) goes into both MLmodel files.

    Returns:
        The new registered model version.
    """
    import mlflow
    import onnx
    import onnxruntime
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(tracking_uri)
    from autoprune.measure import example_input

    x = example_input(input_shape, dtype, random=True, batch=2)
    example = x.numpy()
    with torch.no_grad():
        output = model.eval()(x).numpy()
    signature = infer_signature(example, output)
    run = mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name="export")
    with run, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)), name="onnx_model", signature=signature,
            input_example=example, registered_model_name=name, metadata=metadata,
            pip_requirements=[f"onnx=={onnx.__version__}",
                              f"onnxruntime=={onnxruntime.__version__}"])
        mlflow.pytorch.log_model(model, name="pytorch_model", signature=signature,
                                 input_example=example, metadata=metadata,
                                 pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    version = str(info.registered_model_version)
    client = MlflowClient(tracking_uri)
    client.set_registered_model_alias(name, alias, version)
    if run_id:
        client.set_model_version_tag(name, version, "autoprune.trial_run", run_id)
    return version
