"""Where fwsweep keeps its state on disk: one root, overridable by FWSWEEP_HOME."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """Root of all local state (sweeps, local MLflow server, `train` runs); ./fwsweep-runs by default."""
    return Path(os.environ.get("FWSWEEP_HOME", "fwsweep-runs")).resolve()


def sweeps_dir() -> Path:
    """Ray Tune's storage path: one sub-folder per sweep name."""
    return home() / "sweeps"


def sweep_dir(name: str) -> Path:
    return sweeps_dir() / name


def mlflow_dir() -> Path:
    """The local MLflow server's SQLite database, artifacts and pid/url files."""
    return home() / "mlflow"


def train_dir() -> Path:
    """Default output folder of `sweep train` runs."""
    return home() / "train"
