"""What `sweep show` and `sweep list` print: readable at 80 columns, trial states in users' words."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from rich import box
from rich.table import Table

from sweep import events, outcome
from sweep.cli.live import fmt_metric, fmt_value
from sweep.config import SweepSpec


@dataclass
class SweepOverview:
    """One sweep on disk, summed up."""

    name: str
    spec: SweepSpec
    records: list  # sweep.export.TrialRecord
    status: str  # finished, running, interrupted, not started
    states: Counter  # trial state (sweep.events words) -> count
    best: object | None  # the best TrialRecord

    @property
    def trials(self) -> str:
        return f"{sum(self.states[s] for s in events.FINISHED_STATES)}/{self.spec.budget.num_samples}"

    def best_text(self, with_id: bool = False) -> str:
        if self.best is None:
            return "-"
        trial = f" {self.best.trial_id}" if with_id else ""
        return f"{fmt_metric(self.best.value(self.spec.metric.name))} ({self.best.model}{trial})"

    def state_of(self, record) -> str:  # noqa: ANN001  (sweep.export.TrialRecord)
        """The trial's state in users' words. Tune saves a RUNNING trial as PENDING (it would go on from its
        checkpoint if restored), so while the sweep runs, one that has epochs is running, not interrupted,
        and so is one that Tune started (its result log exists) before its first epoch ended."""
        return _state_of(record, self.spec.max_epochs, self.status == "running")

    def states_text(self) -> str:
        order = [*events.FINISHED_STATES, events.RUNNING, events.PAUSED, events.INTERRUPTED, events.PENDING]
        return ", ".join(f"{self.states[s]} {s}" for s in order if self.states[s]) or "none yet"


def overview(store) -> SweepOverview:  # noqa: ANN001  (sweep.store.SweepStore)
    from sweep.export import best_trials

    spec = store.load_spec()
    records = store.load_trials(spec)
    states = Counter(r.state(spec.max_epochs) for r in records)
    finished = sum(states[s] for s in events.FINISHED_STATES)
    ended = bool(records) and finished == len(records)
    if finished >= spec.budget.num_samples or ended and outcome.reached_target(spec, records) is not None:
        status = "finished"
    elif records:
        status = "running" if _is_running(store) else \
            "finished" if ended and outcome.budget_spent(spec, records) else "interrupted"  # its time budget
    else:
        status = "not started"
    best = best_trials(records, spec.metric.name, spec.metric.mode)
    shown = Counter(_state_of(r, spec.max_epochs, status == "running") for r in records)
    return SweepOverview(store.name, spec, records, status, shown, best[0] if best else None)


def _state_of(record, max_epochs: int, sweep_runs: bool) -> str:  # noqa: ANN001  (sweep.store.TrialRecord)
    state = record.state(max_epochs)
    if sweep_runs and (state == events.INTERRUPTED or state == events.PENDING and record.started):
        return events.RUNNING
    return state


def _is_running(store) -> bool:  # noqa: ANN001
    """A Tune driver updates the experiment state at least every few seconds while it runs."""
    saved = store.state_mtime()
    return saved is not None and time.time() - saved < 30


def trials_table(view: SweepOverview, top: int) -> Table:
    """The `top` best trials, then every failed, running or pending one; one searched parameter a line."""
    from sweep.export import best_trials

    spec = view.spec
    ranked = best_trials(view.records, spec.metric.name, spec.metric.mode, k=top)
    listed = {r.trial_id for r in ranked}
    rest = [r for r in view.records if r.trial_id not in listed
            and r.state(spec.max_epochs) not in (events.DONE, events.STOPPED_EARLY)]
    searched = events.searched_keys(spec)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for column in ("trial", "model", spec.metric.name, "epochs", "state", "parameters"):
        table.add_column(column, overflow="fold")
    for r in ranked + rest:
        params = "\n".join(f"{k}={fmt_value(v)}"
                           for k, v in events.searched_params(r.params, searched).items())
        table.add_row(r.trial_id, r.model, fmt_metric(r.value(spec.metric.name)),
                      f"{r.epochs}/{spec.max_epochs}", view.state_of(r), params or "-")
    return table


def sweeps_table(views: list[SweepOverview], in_mlflow: dict[str, str], corrupt: list[str] = ()) -> Table:
    """One line per sweep in the storage (per unreadable one, and per sweep only MLflow knows)."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for column in ("name", "status", "trials", "best", "models", "MLflow run"):
        table.add_column(column, overflow="fold")
    for view in views:
        failed = view.states[events.FAILED] + view.states[events.DIVERGED]
        trials = view.trials + (f"\n{failed} failed" if failed else "")
        table.add_row(view.name, view.status, trials, view.best_text(), " ".join(view.spec.models),
                      in_mlflow.get(view.name, "-").lower())
    for name in corrupt:
        table.add_row(name, "corrupt", "-", "-", "-", in_mlflow.get(name, "-").lower())
    for name in sorted(set(in_mlflow) - {v.name for v in views} - set(corrupt)):
        table.add_row(name, "only in MLflow", "-", "-", "-", in_mlflow[name].lower())
    return table
