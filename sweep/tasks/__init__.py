"""The tasks (plain NumPy and PyTorch). Import-light: configs import the registry without torch."""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING

from sweep.tasks.registry import TASKS, task_names

if TYPE_CHECKING:
    from sweep.config import TaskConfig
    from sweep.tasks.retrieval import Splits

__all__ = ["TASKS", "make_splits", "task_names"]


def make_splits(cfg: TaskConfig) -> Splits:
    """The train/val/test splits of the task `cfg.name` (deterministic in `cfg.seed`).

    Kept for the process's next trials: Tune reuses a worker for trial after trial of one sweep, all on
    the same task, and generating it costs 0.2-0.3 s at the default sizes (seconds where few sequences
    are distinct, as at K = 2), which is most of a short trial's start. The splits are only read."""
    return _cached_splits(cfg.model_dump_json())


@functools.lru_cache(maxsize=2)
def _cached_splits(cfg_json: str) -> Splits:
    from sweep.config import TaskConfig

    cfg = TaskConfig.model_validate_json(cfg_json)
    module_name, func_name = TASKS[cfg.name].generator.split(":")
    return getattr(importlib.import_module(module_name), func_name)(cfg)
