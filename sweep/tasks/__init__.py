"""The tasks (plain NumPy and PyTorch). Import-light: configs import the registry without torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from sweep.tasks.registry import TASKS, task_names

if TYPE_CHECKING:
    from sweep.config import TaskConfig
    from sweep.tasks.retrieval import Splits

__all__ = ["TASKS", "make_splits", "task_names"]


def make_splits(cfg: TaskConfig) -> Splits:
    """Generate the train/val/test splits of the task `cfg.name` (deterministic in `cfg.seed`)."""
    module_name, func_name = TASKS[cfg.name].generator.split(":")
    return getattr(importlib.import_module(module_name), func_name)(cfg)
