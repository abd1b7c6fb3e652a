"""Moved: the Tune callback is `sweep.mlflow_runs.callback.MlflowSweepCallback` (kept importable here)."""

from sweep.mlflow_runs.callback import MlflowSweepCallback
from sweep.mlflow_runs.content import git_commit

__all__ = ["MlflowSweepCallback", "git_commit"]
