"""How often Tune snapshots a sweep's experiment state: every 2 s, or 19 times as long as the last snapshot
took when that is longer (at most about 5% of the driver's time), and never forced by a trial's checkpoint.

Why: a snapshot writes Tune's whole experiment state (each trial's status, last result and statistics of
every metric it reported, about 20 KB a trial, and the searcher's pickle), so its cost grows with the
number of trials, on the driver's event loop. Two rules made a sweep's total quadratic in its trials:
a fixed 2 s period (TUNE_GLOBAL_CHECKPOINT_S=2, so that a killed driver forgets little), and Tune forcing a
snapshot whenever a trial has saved `num_to_keep` checkpoints since the last one (so that the saved state
never names a checkpoint Tune has deleted since): with `keep_checkpoints: 1` that is one snapshot per epoch
of every trial. Measured (docs/benchmarks.md, "Experiment-state snapshots"): 400 one-epoch trials on
2 cores took 408 snapshots, 38 s of the driver's time in a 178 s sweep; paced, 38 snapshots, 4 s, 137 s.

Here the period follows Tune's own "auto" rule (19x the last snapshot's time) with a 2 s floor instead of
Tune's 10 s, and trial checkpoints force nothing: a saved state naming a checkpoint that Tune deleted
after it is what `sweep resume` repairs before Tune restores anything (tune_checkpoints.py). Both rules
live in a private Tune class (ray.tune.execution.experiment_state._ExperimentCheckpointManager); where it
is not as expected, `snapshot_period()` returns the fixed 2 s and Tune keeps its forced snapshots, as
before this module. A TUNE_GLOBAL_CHECKPOINT_S the user set is a fixed period and is kept.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

FLOOR_S = 2.0  # the shortest period: what a killed driver forgets, where a snapshot takes < FLOOR_S / 19
SNAPSHOT_SHARE = 1 / 19  # of the time between snapshots, the most a snapshot may take (Tune's own rule)
FIXED_PERIOD = "2"  # TUNE_GLOBAL_CHECKPOINT_S where the pacing cannot be installed


def _paced_period(self: Any, time_taken: float) -> None:
    """Tune's `_update_auto_checkpoint_time`, with FLOOR_S where Tune has 10 s."""
    if self._auto_checkpoint_enabled:
        self._checkpoint_period = max(FLOOR_S, time_taken / SNAPSHOT_SHARE)


def _no_forced_snapshot(self: Any, trial: Any) -> None:
    """Tune's `on_trial_checkpoint`, which forces a snapshot after `num_to_keep` checkpoints: nothing."""


# Tune's methods (of _ExperimentCheckpointManager) and what replaces each
RULES: dict[str, Callable[..., None]] = {"_update_auto_checkpoint_time": _paced_period,
                                         "on_trial_checkpoint": _no_forced_snapshot}


@functools.cache
def install() -> bool:
    """Replace the two rules on Tune's snapshot manager (once per process); False where it is not there."""
    try:
        from ray.tune.execution.experiment_state import _ExperimentCheckpointManager as manager
    except ImportError as err:
        log.debug("Tune's snapshot manager not found (%s): fixed %s s period", err, FIXED_PERIOD)
        return False
    if not all(callable(getattr(manager, name, None)) for name in RULES):
        log.debug("Tune's snapshot manager has changed: fixed %s s period", FIXED_PERIOD)
        return False
    for name, rule in RULES.items():
        setattr(manager, name, rule)
    return True


def snapshot_period() -> str:
    """The TUNE_GLOBAL_CHECKPOINT_S a sweep's driver runs Tune with: "auto" (paced, see the module's
    docstring) where the pacing is installed, else a fixed 2 s."""
    return "auto" if install() else FIXED_PERIOD
