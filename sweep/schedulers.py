"""Ray Tune's early-stopping schedulers, built from a spec's `scheduler:` section.

Ray's asynchronous successive halving (ASHA) decides when a trial reaches a rung: it continues if its
value is at least the (1 - 1/reduction_factor) quantile of those already recorded there. The first trial
to reach a rung has nothing to compare against and always continues, so one of a sweep's first trials
usually trains to the last epoch whatever it is worth. `bootstrap_count` is Optuna's
SuccessiveHalvingPruner knob of that name: a trial that reaches a rung before that many others have is
stopped there (the original ASHA, too, promotes from a rung only once it holds reduction_factor trials).
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule
from ray.tune.schedulers.async_hyperband import _Bracket

from sweep.config import SweepSpec


class _BootstrappedBracket(_Bracket):
    def __init__(self, bootstrap_count: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bootstrap_count = bootstrap_count

    def cutoff(self, recorded: dict) -> Any:
        if len(recorded) < self.bootstrap_count:
            return float("inf")  # values are sign-corrected to 'higher is better': every trial is below it
        return super().cutoff(recorded)


class BootstrappedASHA(AsyncHyperBandScheduler):
    """Ray's ASHA whose rungs stop a trial until `bootstrap_count` others have reached them."""

    def __init__(self, *, bootstrap_count: int = 0, grace_period: int = 1, max_t: int = 100,
                 reduction_factor: float = 4, brackets: int = 1, stop_last_trials: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(grace_period=grace_period, max_t=max_t, reduction_factor=reduction_factor,
                         brackets=brackets, stop_last_trials=stop_last_trials, **kwargs)
        self._brackets = [_BootstrappedBracket(bootstrap_count, grace_period, max_t, reduction_factor, s,
                                               stop_last_trials=stop_last_trials) for s in range(brackets)]


def build_scheduler(spec: SweepSpec) -> Any:
    """The Tune scheduler of `spec` (one iteration = one epoch)."""
    s, metric, mode = spec.scheduler, spec.metric.name, spec.metric.mode
    common = {"time_attr": "training_iteration", "metric": metric, "mode": mode}
    if s.name == "asha":
        return BootstrappedASHA(max_t=spec.max_epochs, grace_period=s.grace_period,
                                reduction_factor=s.reduction_factor, brackets=s.brackets,
                                bootstrap_count=s.bootstrap_count, **common)
    if s.name == "hyperband":
        return HyperBandScheduler(max_t=spec.max_epochs, reduction_factor=s.reduction_factor, **common)
    if s.name == "median":
        return MedianStoppingRule(grace_period=s.grace_period, **common)
    return FIFOScheduler()
