"""Search efficiency: trial-epochs a sweep spends before some trial reaches a target validation accuracy.

Two strategies on the same space (FW-LSTM and LSTM on ART K=4, learning rate and fast-weight rates),
the same trial budget, 3 searcher seeds each:
  - tpe+asha: Optuna TPE (4 random start-up trials) with ASHA (grace 1 epoch, reduction factor 3);
  - random+fifo: Optuna's random sampler, every trial trained to the end (no early stopping).
Per sweep: the epochs of all trials, in the order they were reported, until the first report at or
above the target ("epochs to target"); the total epochs spent; the best accuracy. One local Ray and one
local MLflow server for all sweeps. Usage: .venv/bin/python benchmarks/search_efficiency.py
[--seeds 3] [--target 0.95]. Writes benchmarks/results/search_efficiency.json; `benchmarks/render.py`
puts the table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import record  # noqa: E402

STRATEGIES = {
    "tpe+asha": ({"name": "optuna", "sampler": "tpe", "n_startup_trials": 4},
                 {"name": "asha", "grace_period": 1, "reduction_factor": 3}),
    "random+fifo": ({"name": "optuna", "sampler": "random"}, {"name": "fifo"}),
}


def spec_for(strategy: str, seed: int, trials: int):  # noqa: ANN201
    from sweep.config import SweepSpec

    searcher, scheduler = STRATEGIES[strategy]
    return SweepSpec.model_validate({
        "name": f"efficiency-{strategy.replace('+', '-')}-s{seed}",
        "task": {"name": "art", "pairs": 4, "train_size": 20000, "val_size": 1000, "test_size": 1000,
                 "seed": 0},
        "train": {"batch_size": 128, "steps_per_epoch": 60, "eval_batch_size": 1000, "keep_checkpoints": 1,
                  "seed": 0},
        "models": ["fw_lstm", "lstm"],
        "space": {
            "common": {"lr": {"loguniform": [5e-4, 2e-2]}, "hidden_size": 50},
            "fw_lstm": {"fast_lr": {"uniform": [0.1, 1.0]}, "decay": {"uniform": [0.7, 0.99]}},
        },
        "searcher": searcher | {"seed": seed},
        "scheduler": scheduler,
        "budget": {"num_samples": trials, "max_epochs": 6, "max_concurrent": 2},
        "resources": {"cpu": 1, "gpu": 0},
    })


def epochs_to_target(records, target: float) -> tuple[int | None, int]:  # noqa: ANN001
    """(trial-epochs reported up to the first one >= target, or None; total trial-epochs)."""
    rows = sorted((row.get("timestamp", 0), row.get("time_total_s", 0), row) for r in records
                  for row in r.history)
    for i, (_, _, row) in enumerate(rows, start=1):
        if row.get("val_accuracy", 0) >= target:
            return i, len(rows)
    return None, len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--target", type=float, default=0.95)
    args = parser.parse_args()
    os.environ.setdefault("FWSWEEP_HOME", tempfile.mkdtemp(prefix="fwsweep-bench-"))

    import ray

    from sweep import tracking
    from sweep.runner import connect_ray

    print(f"load average before: {os.getloadavg()[0]:.2f}")
    connect_ray()
    rows: dict[str, list[tuple[int | None, int, float]]] = {s: [] for s in STRATEGIES}
    start = time.perf_counter()
    with record("search_efficiency", vars(args)) as payload:
        try:
            run_all(args, rows)
        finally:
            ray.shutdown()
            tracking.stop_local_server()
        payload["results"] = {
            "target": args.target, "wall_s": time.perf_counter() - start,
            "strategies": {name: [{"seed": seed, "epochs_to_target": v[0], "total_epochs": v[1], "best": v[2]}
                                  for seed, v in enumerate(values)] for name, values in rows.items()},
        }
    print(f"\n{args.seeds} seeds, {args.trials} trials of <= 6 epochs of 60 steps, "
          f"{time.perf_counter() - start:.0f} s, load average after: {os.getloadavg()[0]:.2f}")


def run_all(args: argparse.Namespace, rows: dict[str, list[tuple[int | None, int, float]]]) -> None:
    from sweep.export import load_trials
    from sweep.runner import run_sweep

    for seed in range(args.seeds):
        for strategy in STRATEGIES:
            spec = spec_for(strategy, seed, args.trials)
            result = run_sweep(spec)
            to_target, total = epochs_to_target(load_trials(spec.name), args.target)
            best = result.best.value("val_accuracy") if result.best else float("nan")
            rows[strategy].append((to_target, total, best))
            print(f"{strategy:12s} seed {seed}: epochs to {args.target:.0%}: {to_target}, "
                  f"total {total}, best {best:.4f}", flush=True)


if __name__ == "__main__":
    main()
