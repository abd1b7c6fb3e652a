"""The pacing of Tune's experiment-state snapshots (sweep/tune_snapshots.py), on Tune's snapshot manager."""

from __future__ import annotations

import pytest

from sweep import tune_snapshots


def _manager(period: str, keep: int | None = 1):
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    return _ExperimentCheckpointManager(storage=None, checkpoint_period=period,
                                        sync_every_n_trial_checkpoints=keep)


def test_the_period_is_two_seconds_or_nineteen_snapshots_long():
    assert tune_snapshots.install(), "Tune's snapshot manager is not as this module expects"
    assert tune_snapshots.snapshot_period() == "auto"
    manager = _manager("auto")
    for took, period in ((0.001, 2.0), (0.1, 2.0), (0.5, 9.5), (2.0, 38.0)):
        manager._update_auto_checkpoint_time(time_taken=took)
        assert manager._checkpoint_period == pytest.approx(period), took
    fixed = _manager("5")  # a TUNE_GLOBAL_CHECKPOINT_S the user set stays a fixed period
    fixed._update_auto_checkpoint_time(time_taken=2.0)
    assert fixed._checkpoint_period == 5.0


def test_a_trials_checkpoints_force_no_snapshot():
    """Unpaced, Tune forces a snapshot once a trial has saved `num_to_keep` checkpoints since the last one
    (every epoch with keep_checkpoints: 1); `sweep resume` repairs a state naming a deleted checkpoint."""
    tune_snapshots.install()
    manager = _manager("auto", keep=1)
    for _ in range(3):
        manager.on_trial_checkpoint(object())
    assert manager._should_force_sync_up is False
