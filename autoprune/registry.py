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
                   dtype: str = "float32", metadata: dict[str, Any] | None = None,
                   experiment_id: str | None = None, run_tags: dict[str, str] | None = None,
                   torch_flavour: bool = True) -> str:
    """Log the PyTorch and ONNX flavours on ``run_id`` (the trial's run), register the ONNX
    one, set the alias. ``metadata`` (the data source and its preprocessing) goes into both
    MLmodel files.

    Without a trial run, a run is started in ``experiment_id`` (the study's experiment, so its
    artifacts live with the study's) with ``run_tags``. ``torch_flavour=False`` (``torch.export``
    could not take the model: MLflow's PyTorch flavour is a ``torch.export`` program too) logs
    the ONNX flavour alone, with a warning; so does a PyTorch flavour MLflow fails to log. Both
    are logged before the version is made: a failure leaves no version without its alias.

    Returns:
        The new registered model version.

    Raises:
        AutopruneError: MLflow refused to log or register (its message), after the export's
            files were written.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    # the registry is the tracking store's, whatever MLFLOW_REGISTRY_URI says: with it set,
    # the version went to one store and its alias and tags to the other (sweep W)
    mlflow.set_registry_uri(tracking_uri)
    try:
        return _register(tracking_uri, run_id, name, alias, model, onnx_path, input_shape,
                         dtype, metadata, experiment_id, run_tags or {}, torch_flavour)
    except MlflowException as e:
        raise AutopruneError(f"--register {name}: MLflow at {tracking_uri} refused it "
                             f"({e.message.splitlines()[0] if e.message else e}); the "
                             "export's files are written, only the registry entry is "
                             "missing") from None


def _register(tracking_uri: str, run_id: str | None, name: str, alias: str, model: nn.Module,
              onnx_path: Path, input_shape: tuple[int, ...], dtype: str,
              metadata: dict[str, Any] | None, experiment_id: str | None,
              run_tags: dict[str, str], torch_flavour: bool) -> str:
    import mlflow
    import onnx
    import onnxruntime
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    from autoprune.measure import example_input

    x = example_input(input_shape, dtype, random=True, batch=2)
    example = x.numpy()
    with torch.no_grad():
        output = model.eval()(x).numpy()
    graph = onnx.load(str(onnx_path))
    # the ONNX flavour feeds and returns by the graph's names ("input", "output"): a consumer
    # may pass {"input": x}, and the schema describes the dict predict returns
    named = infer_signature({graph.graph.input[0].name: example},
                            {graph.graph.output[0].name: output})
    run = (mlflow.start_run(run_id=run_id) if run_id else
           mlflow.start_run(experiment_id=experiment_id, run_name=run_tags.get(
               "mlflow.runName", "export"), tags=run_tags))
    with run, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if torch_flavour:
            try:
                mlflow.pytorch.log_model(
                    model, name="pytorch_model", signature=infer_signature(example, output),
                    input_example=example, metadata=metadata, serialization_format="pt2",
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
            except Exception as e:  # MLflow runs torch.export itself, with its own shapes
                torch_flavour = False
                reason = f"MLflow could not log it: {type(e).__name__}: " + \
                    (str(e).splitlines()[0] if str(e) else "")
        else:
            reason = "torch.export could not take the model (no model.pt2 either)"
        info = mlflow.onnx.log_model(
            graph, name="onnx_model", signature=named, input_example={
                graph.graph.input[0].name: example}, metadata=metadata,
            pip_requirements=[f"onnx=={onnx.__version__}",
                              f"onnxruntime=={onnxruntime.__version__}"])
    if not torch_flavour:
        warnings.warn(f"--register {name}: the ONNX flavour alone was logged; the PyTorch "
                      f"flavour was not ({reason}). The export folder keeps weights.pt, "
                      "which autoprune.load_pruned rebuilds.", stacklevel=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        version = str(mlflow.register_model(info.model_uri, name).version)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "autoprune.pytorch_flavour",
                                 "logged" if torch_flavour else f"not logged: {reason}"[:5000])
    if run_id:
        client.set_model_version_tag(name, version, "autoprune.trial_run", run_id)
    return version
