"""Sweep overhead: how much of the machine's cores a sweep spends training.

16 trials of about 20 s of training each (an LSTM on ART K=4, sized by a calibration run in this process)
on the local Ray with every core, one core per trial, FIFO (no early stopping), tracked in a real local
MLflow server. Reports

    core utilisation = sum of the trials' own training time / (wall time x cores)
    overhead per trial = (wall time x concurrent trials - sum of training time) / trials

with wall time measured around `run_sweep` (Ray start, MLflow, Tune, exports: what the user waits for).
Target: utilisation >= 0.90. Usage: .venv/bin/python benchmarks/sweep_overhead.py [--trials 16]
[--seconds 20]. Write the numbers, `uptime` and `lscpu | head` to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def calibrate(seconds: float) -> int:
    """Steps per epoch so that 4 epochs take about `seconds` on one thread of this machine."""
    import torch

    from sweep.config import TrialConfig
    from sweep.reporter import NullReporter
    from sweep.train import run_trial

    torch.set_num_threads(1)
    train = BASE_TRIAL["train"] | {"epochs": 3, "steps_per_epoch": 60}  # the first epoch warms up
    config = TrialConfig.model_validate({**BASE_TRIAL, "train": train})
    reporter = NullReporter()
    run_trial(config, reporter, Path(tempfile.mkdtemp()))
    steps_per_s = min(r["steps_per_s"] for r in reporter.history[1:])
    return max(10, int(steps_per_s * seconds / 4))


BASE_TRIAL = {
    "task": {"name": "art", "pairs": 4, "train_size": 20000, "val_size": 1000, "test_size": 1000, "seed": 0},
    "model": {"name": "lstm", "hidden_size": 50},
    "train": {"batch_size": 128, "eval_batch_size": 1000, "device": "cpu", "num_threads": 1,
              "keep_checkpoints": 1},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0, help="training time per trial")
    parser.add_argument("--warm-server", action="store_true",
                        help="start the local MLflow server before timing, as `sweep ui --detach` leaves it")
    args = parser.parse_args()

    os.environ.setdefault("FWSWEEP_HOME", tempfile.mkdtemp(prefix="fwsweep-bench-"))
    from sweep import tracking
    from sweep.config import SweepSpec
    from sweep.export import load_trials
    from sweep.runner import run_sweep

    cores = len(os.sched_getaffinity(0))
    steps = calibrate(args.seconds)
    spec = SweepSpec.model_validate({
        "name": "overhead",
        "task": BASE_TRIAL["task"],
        "train": BASE_TRIAL["train"] | {"epochs": 4, "steps_per_epoch": steps},
        "models": ["lstm"],
        "space": {"common": {"lr": {"loguniform": [1e-3, 1e-2]}, "hidden_size": 50}},
        "scheduler": {"name": "fifo"},
        "budget": {"num_samples": args.trials, "max_concurrent": cores},
        "resources": {"cpu": 1, "gpu": 0},
    })
    if args.warm_server:
        with tracking.tracking_server(None, keep=True):
            pass
    load = os.getloadavg()
    start = time.perf_counter()
    try:
        result = run_sweep(spec)
    finally:
        wall = time.perf_counter() - start
        tracking.stop_local_server()
    records = load_trials(spec.name)
    train_s = sum(r.metrics.get("elapsed_s", 0.0) for r in records)
    utilisation = train_s / (wall * cores)
    overhead = (wall * cores - train_s) / len(records)
    print(f"machine: {cores} cores, load average before {load[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print(f"{len(records)} trials ({result.status_counts}), {steps} steps x 4 epochs each")
    print(f"sum of training time {train_s:.1f} s, mean {train_s / len(records):.1f} s per trial")
    print(f"wall {wall:.1f} s on {cores} cores ({'warm' if args.warm_server else 'cold'} MLflow server)")
    print(f"core utilisation {utilisation:.3f} (target >= 0.90); overhead {overhead:.2f} s per trial")
    # The same over the Tune phase only (first trial start to last trial end): the fixed start-up cost
    # (MLflow server, Ray, imports) left out, the per-trial scheduling cost kept.
    first = min(r.history[0]["timestamp"] - r.history[0]["time_total_s"] for r in records if r.history)
    last = max(r.metrics["timestamp"] for r in records if r.metrics)
    tune_wall = last - first
    print(f"Tune phase {tune_wall:.0f} s: utilisation {train_s / (tune_wall * cores):.3f}, "
          f"overhead {(tune_wall * cores - train_s) / len(records):.2f} s per trial; "
          f"fixed start/stop cost {wall - tune_wall:.0f} s")


if __name__ == "__main__":
    main()
