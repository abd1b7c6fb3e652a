"""Which trial is best, and a sweep's summary: one definition, used by export, show, list and MLflow.

**Best trial**: the trial whose *last* reported value of the sweep's metric is best (max or min), among
trials that did not fail or diverge. The last value, not the best over epochs: it is what the trial's
exported config re-runs to (`train.epochs` set to the epochs it ran), so `sweep train` reproduces it.

**A trial's state** (done, stopped early, diverged, failed, running, pending, paused, interrupted) is
`sweep.events.trial_state`, from Tune's status and the last report: "stopped early" is a trial Tune ended
before `max_epochs` without the final `test_accuracy` that `run_trial` reports when it completes or
reaches its target accuracy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sweep import events

STATES = (events.DONE, events.STOPPED_EARLY, events.DIVERGED, events.FAILED, events.RUNNING, events.PENDING,
          events.PAUSED, events.INTERRUPTED)
ENDED = events.FINISHED_STATES
value = events.metric_value


class Record(Protocol):  # sweep.store.TrialRecord: what these definitions need
    trial_id: str
    model: str
    status: str
    metrics: dict[str, Any]


def best_trials(records: Sequence[Record], metric: str, mode: str, k: int = 1,
                per_model: bool = False) -> list[Any]:
    """The k best trials by their last reported `metric`; with per_model, the k best of each model."""
    scored = [r for r in records if value(r.metrics, metric) is not None and r.status != "ERROR"
              and not r.metrics.get("diverged")]  # a NaN model's accuracy is not a result to re-run
    scored.sort(key=lambda r: value(r.metrics, metric), reverse=(mode == "max"))
    if not per_model:
        return scored[:k]
    out: list[Any] = []
    for model in sorted({r.model for r in scored}):
        out += [r for r in scored if r.model == model][:k]
    return out


def reached_target(spec: Any, records: Sequence[Any]) -> tuple[str, int] | None:
    """(trial, epoch) of the first recorded report that reached `budget.target`, or None: the sweep
    ended there by design, not short of its budget."""
    target = spec.budget.target
    if target is None:
        return None
    hits = [(row.get("timestamp", 0), r.trial_id, int(row.get("epoch", 0) or 0)) for r in records
            for row in r.history if events.reaches(row, spec.metric.name, spec.metric.mode, target)]
    return min(hits)[1:] if hits else None


def budget_spent(spec: Any, records: Sequence[Any]) -> bool:
    """No trial is still due: all `num_samples` were made, or Tune ended the sweep on purpose (its time
    budget, or a trial reached the target)."""
    return (len(records) >= spec.budget.num_samples or spec.budget.time_budget_s is not None
            or reached_target(spec, records) is not None)


@dataclass
class Summary:
    """A sweep's counts per state and its best trials (overall and per model), computed once."""

    metric: str
    mode: str
    counts: dict[str, int] = field(default_factory=dict)
    best: Any | None = None
    best_per_model: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def summarize(records: Sequence[Record], metric: str, mode: str, max_epochs: int) -> Summary:
    kinds = Counter(events.trial_state(r.status, r.metrics, max_epochs) for r in records)
    best = best_trials(records, metric, mode, k=1)
    per_model = {r.model: r for r in best_trials(records, metric, mode, k=1, per_model=True)}
    return Summary(metric, mode, {k: kinds.get(k, 0) for k in STATES}, best[0] if best else None, per_model)
