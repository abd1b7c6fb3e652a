"""What happens during a sweep, as plain objects: the runner emits them, `sweep.cli` shows them.

No Ray here: `sweep.tune_events` turns Tune's callback hooks into these events, and the same words for a
trial's state (`trial_state`) serve the live view, `sweep show` and `sweep list`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sweep.config import Distribution, SweepSpec

# A trial's state in users' words (Tune says PENDING, RUNNING, PAUSED, TERMINATED, ERROR).
DONE, STOPPED_EARLY, DIVERGED, FAILED = "done", "stopped early", "diverged", "failed"
RUNNING, PENDING, PAUSED, INTERRUPTED = "running", "pending", "paused", "interrupted"
FINISHED_STATES = (DONE, STOPPED_EARLY, DIVERGED, FAILED)
UNFINISHED = "unfinished"  # any of the others, once a sweep stopped: `sweep resume` continues them


def final_report(last: Mapping[str, Any]) -> bool:
    """A result the trial itself ended with: the test report `run_trial` makes after its last epoch (or on
    reaching its target accuracy), or the report of a diverged loss."""
    return bool(last.get("diverged")) or "test_accuracy" in last or bool(last.get("target_reached"))


def trial_state(tune_status: str, last: Mapping[str, Any], max_epochs: int) -> str:
    """One trial's state in users' words. A TERMINATED trial was stopped early when the scheduler ended it
    before `max_epochs` without the final test report `run_trial` makes when it completes (or reaches its
    target accuracy); a diverged one ended normally for Tune (no retry of a hopeless trial)."""
    if tune_status == "ERROR":
        return FAILED
    if tune_status == "TERMINATED":
        if last.get("diverged"):
            return DIVERGED
        epoch = int(last.get("epoch", last.get("training_iteration", 0)) or 0)
        if not final_report(last) and 0 < epoch < max_epochs:
            return STOPPED_EARLY
        return DONE
    if tune_status == "RUNNING":
        return RUNNING
    if tune_status == "PAUSED":
        return PAUSED
    ran = last.get("epoch") or last.get("training_iteration")
    return INTERRUPTED if ran else PENDING  # a pending trial that already ran epochs was cut by a stop


def metric_value(last: Mapping[str, Any], metric: str) -> float | None:
    v = last.get(metric)
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


def reaches(report: Mapping[str, Any], metric: str, mode: str, target: float) -> bool:
    """The report's metric at or past the sweep's target (budget.target), in the metric's direction."""
    value = metric_value(report, metric)
    return value is not None and (value >= target if mode == "max" else value <= target)


def searched_keys(spec: SweepSpec) -> set[str]:
    """The Tune config keys that were searched (`lr`, `fw_lstm.decay`); constants and the model are not."""
    keys = set()
    for section, params in spec.space.items():
        for key, value in params.items():
            if isinstance(value, Distribution):
                keys.add(key if section == "common" else f"{section}.{key}")
    return keys


def searched_params(config: Mapping[str, Any], keys: set[str]) -> dict[str, Any]:
    """A trial's searched parameters (`keys`), per-model ones under their short name (`decay`)."""
    return {k.split(".", 1)[-1]: v for k, v in config.items() if k in keys}


@dataclass(frozen=True)
class Phase:
    """The sweep moved on (starting Ray, waiting for MLflow, trials started): one line for people."""

    text: str


@dataclass(frozen=True)
class SweepStarted:
    """Tune is about to run the sweep's trials."""

    name: str
    metric: str
    mode: str  # max or min
    total: int  # budget.num_samples
    max_epochs: int
    max_concurrent: int
    resumed: bool = False


@dataclass(frozen=True)
class SweepEnded:
    """Tune returned (finished, interrupted or failed): a live view closes."""

    name: str


@dataclass(frozen=True)
class TrialStarted:
    trial_id: str
    model: str
    params: dict[str, Any] = field(default_factory=dict)
    resumed: bool = False  # continued from a checkpoint (a retry or `sweep resume`)


@dataclass(frozen=True)
class TrialReport:
    """One epoch of a trial: its metric value (None if not finite)."""

    trial_id: str
    epoch: int
    value: float | None


@dataclass(frozen=True)
class TrialEnded:
    trial_id: str
    model: str
    state: str  # done, stopped early, diverged, failed
    epochs: int
    value: float | None
    params: dict[str, Any] = field(default_factory=dict)
    reason: str = ""  # e.g. "ASHA stopped it after epoch 3", the error's last line


@dataclass(frozen=True)
class Counts:
    """How many trials are where, whenever that changes."""

    done: int  # finished in any way: done, stopped early, diverged, failed
    running: int
    pending: int
    total: int  # the sweep's budget.num_samples


Event = Phase | SweepStarted | SweepEnded | TrialStarted | TrialReport | TrialEnded | Counts
Listener = Callable[[Event], None]
