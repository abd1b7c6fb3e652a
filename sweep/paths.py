"""Where fwsweep keeps its state on disk: one root, overridable by FWSWEEP_HOME."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def home() -> Path:
    """Root of all local state (sweeps, local MLflow server, `train` runs); ./fwsweep-runs by default."""
    return Path(os.environ.get("FWSWEEP_HOME", "fwsweep-runs")).resolve()


def check_home() -> Path:
    """The state root, or a UserError when it cannot hold state (a file, an unwritable place).

    Called before a command writes anything, so a bad FWSWEEP_HOME fails with one message, not a traceback
    halfway through a sweep. Leaves nothing behind: the first real write creates the folder.
    """
    from sweep.errors import Problem, UserError

    root = home()
    fix = "set FWSWEEP_HOME to a writable folder (or unset it to use ./fwsweep-runs)"
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise UserError(Problem("FWSWEEP_HOME", f"{root} cannot be a folder: {existing} is a file", fix))
    try:  # a real probe: permissions, read-only mounts and virtual filesystems all answer here
        tempfile.TemporaryDirectory(prefix=".fwsweep-probe-", dir=existing).cleanup()
    except OSError as err:
        raise UserError(Problem("FWSWEEP_HOME", f"{root} is not writable ({existing}: {err.strerror})",
                                fix)) from None
    return root


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
