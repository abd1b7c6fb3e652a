"""Where fwsweep keeps its state on disk: one root, overridable by FWSWEEP_HOME."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def home() -> Path:
    """Root of this machine's state (the local MLflow server, `train` runs, and sweeps unless
    $FWSWEEP_STORAGE / --storage puts them elsewhere); ./fwsweep-runs by default.

    Always a local folder: a URI here (s3://...) is refused by check_home, never mangled into a path.
    """
    value = os.environ.get("FWSWEEP_HOME", "fwsweep-runs")
    if "://" in value:
        return Path(value)  # check_home names the fix; resolve() would turn s3://b into ./s3:/b
    return Path(value).expanduser().resolve()


def check_home() -> Path:
    """The state root, or a UserError when it cannot hold state (a file, an unwritable place).

    Called before a command writes anything, so a bad FWSWEEP_HOME fails with one message, not a traceback
    halfway through a sweep. Leaves nothing behind: the first real write creates the folder.
    """
    from sweep.errors import Problem, UserError

    value = os.environ.get("FWSWEEP_HOME", "")
    if "://" in value:
        raise UserError(Problem("FWSWEEP_HOME", f"{value} is a URI; FWSWEEP_HOME is this machine's folder",
                                "put sweeps in object storage with FWSWEEP_STORAGE (or --storage, or the "
                                "spec's storage:) and leave FWSWEEP_HOME a local folder"))
    return check_writable_folder(home(), "FWSWEEP_HOME",
                                 "set FWSWEEP_HOME to a writable folder (or unset it to use ./fwsweep-runs)")


PROBE = ".fwsweep-probe"  # the prefix of the files and objects written to check that storage takes writes


def check_writable_folder(root: Path, setting: str, fix: str) -> Path:
    """`root`, or a UserError naming `setting` when it cannot hold state (a file, an unwritable place).
    Leaves nothing behind: the first real write creates the folder."""
    from sweep.errors import Problem, UserError

    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise UserError(Problem(setting, f"{root} cannot be a folder: {existing} is a file", fix))
    try:  # a real probe: permissions, read-only mounts and virtual filesystems all answer here
        tempfile.TemporaryDirectory(prefix=f"{PROBE}-", dir=existing).cleanup()
    except OSError as err:
        problem = f"{root} is not writable ({existing}: {err.strerror})"
        raise UserError(Problem(setting, problem, fix)) from None
    return root


def sweeps_dir() -> Path:
    """The default sweep storage (sweep.store owns the layout): one sub-folder per sweep name."""
    return home() / "sweeps"


def sweep_dir(name: str) -> Path:
    return sweeps_dir() / name


def mlflow_dir() -> Path:
    """The local MLflow server's SQLite database, artifacts and pid/url files."""
    return home() / "mlflow"


def train_dir() -> Path:
    """Default output folder of `sweep train` runs."""
    return home() / "train"


TRIAL_SCRATCH_PREFIX = "fwsweep-trial-"


def trial_scratch_dir() -> Path:
    """A new scratch folder for one trial on this node (its checkpoints until Tune persists them), named
    after this process. A trial removes its own when it ends; a worker killed mid-trial (a crash, Ctrl-C
    on the sweep, a lost node) cannot, so folders whose process is gone are removed here first."""
    import shutil

    import psutil

    temp = Path(tempfile.gettempdir())
    for old in temp.glob(f"{TRIAL_SCRATCH_PREFIX}*"):
        pid = old.name.removeprefix(TRIAL_SCRATCH_PREFIX).split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{TRIAL_SCRATCH_PREFIX}{os.getpid()}-", dir=temp))
