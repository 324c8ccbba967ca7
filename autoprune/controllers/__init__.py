"""Controllers propose ratios and schedule trials; both call :func:`autoprune.trial.run_trial`."""

from autoprune.controllers.optuna_local import run_local

__all__ = ["run_local"]
