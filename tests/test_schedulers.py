"""sweep.schedulers: ASHA's bootstrap_count, on Ray's own scheduler and in a real sweep."""

from __future__ import annotations

import re

import pytest
from ray.tune.schedulers import TrialScheduler

from sweep.schedulers import BootstrappedASHA

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


class _Trial:
    """What ASHA reads of a trial: its id."""

    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id


def _decisions(bootstrap_count: int, mode: str, results: list[tuple[str, int, float]]) -> list[str]:
    asha = BootstrappedASHA(bootstrap_count=bootstrap_count, max_t=12, grace_period=1, reduction_factor=3,
                            time_attr="epoch", metric="m", mode=mode)
    trials = {}
    out = []
    for trial_id, epoch, value in results:
        if trial_id not in trials:
            trials[trial_id] = _Trial(trial_id)
            asha.on_trial_add(None, trials[trial_id])
        out.append(asha.on_trial_result(None, trials[trial_id], {"epoch": epoch, "m": value}))
    return out


@pytest.mark.parametrize("mode, sign", [("max", 1.0), ("min", -1.0)])
def test_the_first_trial_at_a_rung_goes_on_in_rays_asha_and_stops_with_a_bootstrap(mode: str,
                                                                                   sign: float) -> None:
    """Rungs at epochs 1, 3 and 9: with bootstrap_count 1, the first trial at each rung is stopped there
    however good it is; the next is measured against it as in Ray's ASHA."""
    results = [("a", 1, sign * 0.9), ("b", 1, sign * 0.5), ("c", 1, sign * 0.95), ("c", 2, sign * 0.96),
               ("c", 3, sign * 0.97)]
    assert _decisions(0, mode, results) == [CONTINUE, STOP, CONTINUE, CONTINUE, CONTINUE]
    assert _decisions(1, mode, results) == [STOP, STOP, CONTINUE, CONTINUE, STOP]
    assert _decisions(2, mode, results) == [STOP, STOP, CONTINUE, CONTINUE, STOP]
    assert _decisions(2, mode, results[:2] + [("c", 1, sign * 0.4)]) == [STOP, STOP, STOP]


def test_a_bootstrapped_asha_pickles_with_its_count() -> None:
    """Tune pickles the scheduler with the experiment; a resumed sweep keeps the rule."""
    import pickle

    asha = pickle.loads(pickle.dumps(BootstrappedASHA(bootstrap_count=2, max_t=9, metric="m", mode="max")))
    assert [b.bootstrap_count for b in asha._brackets] == [2]


def test_a_sweep_with_a_bootstrap_stops_its_first_trial_at_the_first_rung(tmp_path, home,  # noqa: ANN001
                                                                          mlflow_server: str) -> None:
    """One trial at a time, so the first trial is the first at the first rung: Ray's ASHA would train it
    to the end; bootstrap_count 1 stops it after grace_period epochs, and the sweep goes on."""
    from conftest import run_to_end, trial_rows, write_spec

    spec = write_spec(tmp_path, "boot", budget={"num_samples": 3, "max_concurrent": 1},
                      scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2,
                                 "bootstrap_count": 1})
    out = run_to_end(["run", str(spec), "--tracking-uri", mlflow_server], home)
    started = re.findall(r"^started\s+lstm (\w+)", out, re.MULTILINE)  # the sweep's lines, in start order
    epochs = {trial: [row["epoch"] for row in rows] for trial, rows in trial_rows(home, "boot").items()}
    assert len(started) == 3 and set(started) == set(epochs), out
    assert epochs[started[0]] == [1], (epochs, out)
