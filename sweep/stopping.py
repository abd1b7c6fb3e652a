"""Ending a whole sweep once it found what the user asked for (`budget.target`).

A search for "a config that reaches 99%" need not train out the rest of its budget once one trial got
there. Tune's `Stopper.stop_all` ends the experiment the way `time_budget_s` does: the searcher is
finished, running trials stop (they count as stopped early), no new ones start. The stopper lives in
Tune's pickled run config, so a resumed sweep keeps it.
"""

from __future__ import annotations

from typing import Any

from ray.tune.stopper import Stopper

from sweep.events import reaches


class TargetReached(Stopper):
    def __init__(self, metric: str, mode: str, target: float) -> None:
        self.metric, self.mode, self.target = metric, mode, target
        self.reached_by: str | None = None

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        if self.reached_by is None and reaches(result, self.metric, self.mode, self.target):
            self.reached_by = trial_id
        return False  # the trial itself is stopped with all the others, by stop_all

    def stop_all(self) -> bool:
        return self.reached_by is not None
