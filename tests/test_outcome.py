"""The one definition of the best trial and of a sweep's summary (sweep.outcome), over trial states
(sweep.events.trial_state), used by export, show, list and MLflow alike."""

from __future__ import annotations

import math
from types import SimpleNamespace

from sweep import events
from sweep.outcome import best_trials, budget_spent, reached_target, summarize


def _rec(tid: str, model: str, status: str, **last: float) -> SimpleNamespace:
    return SimpleNamespace(trial_id=tid, model=model, status=status, metrics=last,
                           value=lambda metric, m=last: m.get(metric))


def test_states_from_status_and_last_report() -> None:
    state = events.trial_state
    assert state("TERMINATED", {"epoch": 5, "val_accuracy": 0.9}, max_epochs=5) == events.DONE
    assert state("TERMINATED", {"epoch": 2, "val_accuracy": 0.9}, max_epochs=5) == events.STOPPED_EARLY
    # reached train.target_accuracy at epoch 2: run_trial adds the final test metrics, so not "early"
    assert state("TERMINATED", {"epoch": 2, "test_accuracy": 0.99}, max_epochs=5) == events.DONE
    assert state("TERMINATED", {"epoch": 1, "diverged": 1}, max_epochs=5) == events.DIVERGED
    assert state("ERROR", {"epoch": 3}, max_epochs=5) == events.FAILED


def test_best_is_the_last_value_and_never_a_failed_or_diverged_trial() -> None:
    records = [
        _rec("a", "lstm", "TERMINATED", epoch=5, val_accuracy=0.8),
        _rec("b", "fw_lstm", "TERMINATED", epoch=2, val_accuracy=0.9),
        _rec("c", "fw_lstm", "ERROR", epoch=3, val_accuracy=0.99),
        _rec("d", "lstm", "TERMINATED", epoch=1, val_accuracy=0.95, diverged=1),
        _rec("e", "lstm", "TERMINATED", epoch=1, val_accuracy=math.nan),
    ]
    assert [r.trial_id for r in best_trials(records, "val_accuracy", "max", k=5)] == ["b", "a"]
    summary = summarize(records, "val_accuracy", "max", max_epochs=5)
    assert summary.best.trial_id == "b"
    assert {m: r.trial_id for m, r in summary.best_per_model.items()} == {"fw_lstm": "b", "lstm": "a"}
    assert summary.counts[events.DONE] == 1 and summary.counts[events.STOPPED_EARLY] == 2
    assert (summary.counts[events.FAILED], summary.counts[events.DIVERGED], summary.total) == (1, 1, 5)


def _spec(target: float | None, mode: str = "max", metric: str = "val_accuracy", samples: int = 8):
    return SimpleNamespace(metric=SimpleNamespace(name=metric, mode=mode),
                           budget=SimpleNamespace(target=target, num_samples=samples, time_budget_s=None))


def test_the_target_is_the_first_report_to_reach_it_in_the_metrics_direction() -> None:
    a = SimpleNamespace(trial_id="a", history=[{"timestamp": 10, "epoch": 1, "val_loss": 0.5},
                                               {"timestamp": 30, "epoch": 2, "val_loss": 0.09}])
    b = SimpleNamespace(trial_id="b", history=[{"timestamp": 20, "epoch": 1, "val_loss": 0.1},
                                               {"timestamp": 25, "epoch": 2, "val_loss": math.nan}])
    assert reached_target(_spec(0.1, "min", "val_loss"), [a, b]) == ("b", 1)
    assert reached_target(_spec(0.05, "min", "val_loss"), [a, b]) is None
    assert reached_target(_spec(0.5, "max", "val_loss"), [a, b]) == ("a", 1)  # max: >= 0.5
    assert reached_target(_spec(None), [a, b]) is None
    # 2 of 8 trials: short of the budget unless the target was reached (then the sweep ended by design)
    assert not budget_spent(_spec(0.05, "min", "val_loss"), [a, b])
    assert budget_spent(_spec(0.1, "min", "val_loss"), [a, b])


def test_the_stopper_ends_the_whole_sweep_at_the_first_report_that_reaches_the_target() -> None:
    from sweep.stopping import TargetReached

    stop = TargetReached("val_accuracy", "max", 0.9)
    assert stop("t1", {"val_accuracy": 0.5}) is False and not stop.stop_all()
    assert stop("t1", {"val_accuracy": math.nan}) is False and not stop.stop_all()
    assert stop("t2", {"val_accuracy": 0.95}) is False and stop.stop_all() and stop.reached_by == "t2"
    stop("t1", {"val_accuracy": 0.99})
    assert stop.reached_by == "t2"  # the first one
