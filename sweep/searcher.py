"""Ray Tune's Optuna searcher, and a failed trial that `sweep resume` runs again.

Tune tells the searcher a trial's end once. A resume restarts the trials that failed (Tuner.restore with
resume_errored): OptunaSearch already told Optuna FAIL for those, so it drops the new run's results with a
warning per epoch (the whole result dict) and the study keeps only the failure, and ConcurrencyLimiter,
which no longer counts the trial as live, drops its end before OptunaSearch sees it. Here the new run's
end reaches the study as Optuna's own RetryFailedTrialCallback records a retry: a new trial with the same
parameters whose system attribute `failed_trial` names the failed one; the Tune trial then maps to it.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

RETRY_ATTR = "failed_trial"  # optuna.storages.RetryFailedTrialCallback's name for the trial retried


class SweepOptunaSearch(OptunaSearch):
    """OptunaSearch that records the rerun of a trial it already told Optuna had failed."""

    def _rerun_of_failed(self, trial_id: str) -> optuna.trial.FrozenTrial | None:
        if trial_id not in self._completed_trials or trial_id not in self._ot_trials:
            return None
        told = self._ot_study._storage.get_trial(self._ot_trials[trial_id]._trial_id)
        return told if told.state == TrialState.FAIL else None

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id in self._completed_trials:
            return  # Optuna's trial is finished (a rerun is told when it ends); OptunaSearch would warn
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        failed = self._rerun_of_failed(trial_id)
        if failed is None:
            # told already: a resume repeats the end of a trial whose end Tune's saved state missed
            if trial_id not in self._completed_trials:
                super().on_trial_complete(trial_id, result=result, error=error)
            return
        value = (result or {}).get(self.metric)
        state = TrialState.COMPLETE if value is not None else TrialState.FAIL if error else TrialState.PRUNED
        self._ot_study.add_trial(optuna.trial.create_trial(
            params=failed.params, distributions=failed.distributions, state=state,
            value=value if state == TrialState.COMPLETE else None,
            system_attrs={RETRY_ATTR: failed.number}))
        newest = self._ot_study._storage.get_all_trials(self._ot_study._study_id, deepcopy=False)[-1]
        self._ot_trials[trial_id] = optuna.Trial(self._ot_study, newest._trial_id)


class SweepConcurrencyLimiter(ConcurrencyLimiter):
    """ConcurrencyLimiter that passes on the end of a trial it no longer counts as live (a failed trial
    that a resume runs again); the searcher decides what it means."""

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        if trial_id in self.live_trials or not self._limit_concurrency:
            super().on_trial_complete(trial_id, result=result, error=error)
        else:
            self.searcher.on_trial_complete(trial_id, result=result, error=error)
