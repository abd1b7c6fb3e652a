"""The one small interface through which a trial reports, so `run_trial` runs under Ray Tune or alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Reporter(Protocol):
    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        """Called once per epoch with every metric, and the folder of a fresh checkpoint (or None)."""

    def restore_dir(self) -> Path | None:
        """A checkpoint folder to resume from (Tune's restore or `train --resume`), else None."""


class NullReporter:
    """Collects reports in memory; for tests and library use."""

    def __init__(self, restore: Path | None = None) -> None:
        self.history: list[dict[str, Any]] = []
        self.checkpoints: list[Path | None] = []
        self._restore = restore

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        self.history.append(dict(metrics))
        self.checkpoints.append(checkpoint_dir)

    def restore_dir(self) -> Path | None:
        return self._restore
