"""Tune's callback hooks -> `sweep.events` objects for a listener (the terminal view lives in sweep.cli).

Reads only what the hooks hand over: a trial's id, config, status, last result and error text.
"""

from __future__ import annotations

import logging
from typing import Any

from sweep import events
from sweep.config import SweepSpec
from sweep.live_callbacks import LiveCallback

log = logging.getLogger(__name__)


class SweepEvents(LiveCallback):
    """Emits TrialStarted/TrialReport/TrialEnded per trial and Counts whenever they change."""

    def __init__(self, listener: events.Listener, spec: SweepSpec) -> None:
        self.listener: events.Listener | None = listener
        self.metric, self.max_epochs, self.total = spec.metric.name, spec.max_epochs, spec.budget.num_samples
        self.scheduler, self.searched = spec.scheduler.name, events.searched_keys(spec)
        self._counts: events.Counts | None = None
        self._ended: set[str] = set()
        super().__init__(spec.name)  # pickled by Tune as a reference to this session's view (a restore too)

    def _emit(self, event: events.Event) -> None:
        if self.listener is None:
            return
        try:
            self.listener(event)
        except Exception:  # the view must never stop a sweep
            log.exception("sweep display failed on %r", event)

    @staticmethod
    def _model(trial: Any) -> str:
        return str(trial.config.get("model", "trial"))

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        resumed = bool((trial.last_result or {}).get("training_iteration"))  # a retry or `sweep resume`
        params = events.searched_params(trial.config, self.searched)
        self._emit(events.TrialStarted(trial.trial_id, self._model(trial), params, resumed=resumed))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        epoch = int(result.get("epoch", result.get("training_iteration", 0)) or 0)
        self._emit(events.TrialReport(trial.trial_id, epoch, events.metric_value(result, self.metric)))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        if not last:
            return  # a pending trial dropped at the end (budget or time limit): it never ran
        self._ended_event(trial, events.trial_state("TERMINATED", last, self.max_epochs), last)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended_event(trial, events.FAILED, trial.last_result or {}, error=self._error(trial))

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        running = sum(t.status == "RUNNING" for t in trials)
        total = max(self.total, len(trials))
        counts = events.Counts(done, running, pending=max(0, total - done - running), total=total)
        if counts != self._counts:
            self._counts = counts
            self._emit(counts)

    def _ended_event(self, trial: Any, state: str, last: dict, error: str = "") -> None:
        if trial.trial_id in self._ended:
            return
        self._ended.add(trial.trial_id)
        epochs = int(last.get("epoch", last.get("training_iteration", 0)) or 0)
        params = events.searched_params(trial.config, self.searched)
        self._emit(events.TrialEnded(trial.trial_id, self._model(trial), state, epochs,
                                     events.metric_value(last, self.metric), params,
                                     self._reason(state, last, error)))

    def _reason(self, state: str, last: dict, error: str) -> str:
        if state == events.STOPPED_EARLY:
            return f"by {self.scheduler.upper()}"
        if state == events.DIVERGED:
            return f"training loss became {last.get('train_loss')}"
        if state == events.FAILED:
            return error or "failed"
        return "reached the target accuracy" if last.get("target_reached") else ""

    @staticmethod
    def _error(trial: Any) -> str:
        try:
            text = str(trial.get_error() or "")
        except Exception:
            return ""
        lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
        return lines[-1][:200] if lines else ""
