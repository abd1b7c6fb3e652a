"""Trial checkpoints: one folder per save, written atomically, the last few kept.

A checkpoint folder holds `state.pt` (model, optimizer and RNG tensors), `meta.json` (epoch, step,
history and loop counters, readable without torch) and `config.yaml` (the trial it belongs to). It is
written into a temporary folder and renamed into place, so a crash mid-write leaves the earlier
checkpoints intact and never a half-written one under a real name.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from sweep.errors import Problem, UserError

STATE_FILE = "state.pt"
META_FILE = "meta.json"
CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"  # sub-folder of a trial's workdir
_PREFIX = "step-"
_TEMP = ".tmp-"
# what a resume reads from each file (sweep.train.Trial.save writes them)
META_KEYS = ("epoch", "step", "status", "best_val_accuracy", "history", "elapsed_s", "epoch_loss_sum",
             "epoch_steps", "epoch_train_s", "config")
STATE_KEYS = ("model", "optimizer", "torch_rng")


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def save_checkpoint(
    root: Path, step: int, state: dict[str, Any], meta: dict[str, Any], config_yaml: str
) -> Path:
    """Write a checkpoint for `step` under `root` and return its folder."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TEMP}{final.name}-", dir=root))
    try:
        torch.save(state, tmp / STATE_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        (tmp / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")
        if final.exists():  # the same step saved again (after a resume): swap, then drop the old one
            old = Path(tempfile.mkdtemp(prefix=f"{_TEMP}old-", dir=root))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def is_checkpoint(path: Path) -> bool:
    return (path / STATE_FILE).is_file() and (path / META_FILE).is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and is_checkpoint(p)]
    return sorted(found, key=lambda p: p.name)


def find_checkpoint(path: Path) -> Path | None:
    """The newest checkpoint at `path`: a checkpoint folder itself, a run folder, or its checkpoints/."""
    if is_checkpoint(path):
        return path
    for root in (path / CHECKPOINTS, path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    return None


def load_checkpoint(
    path: Path, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state tensors, meta) of a checkpoint folder; a file that does not parse is a UserError naming it."""
    file = path / META_FILE
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _damaged(file, str(err).splitlines()[0][:160]) from None
    try:
        state = torch.load(path / STATE_FILE, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, OSError) as err:
        raise _damaged(path / STATE_FILE, f"not a whole torch checkpoint: {type(err).__name__}") from None
    return state, meta


def load_resumable(
    path: Path, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """load_checkpoint, and every field a resume reads there (what sweep.train.Trial.save writes)."""
    state, meta = load_checkpoint(path, map_location)
    for file, found, keys in ((META_FILE, meta, META_KEYS), (STATE_FILE, state, STATE_KEYS)):
        missing = [k for k in keys if not isinstance(found, dict) or k not in found]
        if missing:
            raise _damaged(path / file, f"no {', '.join(missing)}")
    return state, meta


def _damaged(file: Path, why: str) -> UserError:
    """A damaged checkpoint file: the fix names the checkpoint before it, if there is one."""
    folder = file.parent
    older = [p for p in list_checkpoints(folder.parent) if p.name < folder.name]
    fix = (f"remove {folder} to resume from the checkpoint before it ({older[-1].name})" if older
           else "restore it from a copy, or start a new run (there is no earlier checkpoint)")
    return UserError(Problem(str(file), f"is damaged ({why}): the checkpoint cannot be resumed", fix))


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (and leftovers of failed writes); return what went."""
    removed = list_checkpoints(root)[:-keep] if keep > 0 else list_checkpoints(root)
    if root.is_dir():
        removed += [p for p in root.iterdir() if p.name.startswith(_TEMP)]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
