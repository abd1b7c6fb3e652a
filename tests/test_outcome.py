"""The one definition of the best trial and of a sweep's summary (sweep.outcome), over trial states
(sweep.events.trial_state), used by export, show, list and MLflow alike."""

from __future__ import annotations

import math
from types import SimpleNamespace

from sweep import events
from sweep.outcome import best_trials, summarize


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
