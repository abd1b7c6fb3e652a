"""Search efficiency: trial-epochs a sweep spends before some trial reaches a target validation accuracy.

Two strategies on the same space (FW-LSTM and LSTM on ART, learning rate and fast-weight rates), the same
trial budget, `--seeds` searcher seeds each:
  - tpe+asha: Optuna TPE (4 random start-up trials) with ASHA (grace 1 epoch, reduction factor 3);
  - random+fifo: Optuna's random sampler, every trial trained to the end (no early stopping).
Each sweep searches until a trial reaches the target (`budget.target`, which ends the sweep, and the
same `train.target_accuracy`, so that trial ends with its test report) or its trials run out. Per sweep:
the epochs of all trials, in the order they were reported, until the first report at or above the target
("epochs to target"); the total epochs spent; the best accuracy. The figure of merit is the ratio of the
mean epochs to target, tpe+asha over random+fifo, paired by seed, with a bootstrap 95% interval (scipy);
a sweep that never reaches the target counts its whole budget (trials x epochs), so the ratio does not
reward giving up early. One local Ray and one local MLflow server for all sweeps.

Usage: .venv/bin/python benchmarks/search_efficiency.py [--seeds 3] [--target 0.95] [--pairs 4]
[--epochs 6] [--steps 60] [--trials 24] [--first-seed 0] [--extend FILE]; issue 14's setting: --seeds 10
--pairs 8 --target 0.99 --epochs 12 --steps 150 --trials 40. `--extend` adds this run's seeds (from
`--first-seed` on) to an earlier run's file with the same settings, so a long interval can be narrowed in
several sittings; the ratio and its interval are then over all seeds, and each run's commit, times and
load are kept. `--bootstrap-count N` sets ASHA's scheduler.bootstrap_count (0: Ray's ASHA as is);
`--pair-with FILE` takes the random+fifo searches of the same seeds from an earlier run (random+fifo does
not depend on ASHA's settings) and runs tpe+asha only. Writes benchmarks/results/NAME.json (`--name`,
default search_efficiency); `benchmarks/render.py` puts the table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import record, scratch_home  # noqa: E402

STRATEGIES = {
    "tpe+asha": ({"name": "optuna", "sampler": "tpe", "n_startup_trials": 4},
                 {"name": "asha", "grace_period": 1, "reduction_factor": 3}),  # + --bootstrap-count
    "random+fifo": ({"name": "optuna", "sampler": "random"}, {"name": "fifo"}),
}


def spec_for(strategy: str, seed: int, args: argparse.Namespace):  # noqa: ANN201
    from sweep.config import SweepSpec

    searcher, scheduler = STRATEGIES[strategy]
    if scheduler["name"] == "asha":
        scheduler = scheduler | {"bootstrap_count": args.bootstrap_count}
    return SweepSpec.model_validate({
        "name": f"efficiency-{strategy.replace('+', '-')}-s{seed}",
        "task": {"name": "art", "pairs": args.pairs, "train_size": 20000, "val_size": 1000, "test_size": 1000,
                 "seed": 0},
        "train": {"batch_size": 128, "steps_per_epoch": args.steps, "eval_batch_size": 1000,
                  "keep_checkpoints": 1, "seed": 0, "target_accuracy": args.target},
        "models": ["fw_lstm", "lstm"],
        "space": {
            "common": {"lr": {"loguniform": [5e-4, 2e-2]}, "hidden_size": 50},
            "fw_lstm": {"fast_lr": {"uniform": [0.1, 1.0]}, "decay": {"uniform": [0.7, 0.99]}},
        },
        "searcher": searcher | {"seed": seed},
        "scheduler": scheduler,
        "budget": {"num_samples": args.trials, "max_epochs": args.epochs, "max_concurrent": 2,
                   "target": args.target},
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


def efficiency_ratio(strategies: dict[str, list[dict]], budget: int) -> dict[str, float]:
    """Mean epochs to target of tpe+asha over random+fifo, paired by seed, with a bootstrap 95% interval;
    a seed that never reached the target counts `budget` epochs (censored: a lower bound of its cost)."""
    import numpy as np
    from scipy.stats import bootstrap

    cost = {name: np.array([s["epochs_to_target"] or budget for s in seeds], dtype=float)
            for name, seeds in strategies.items()}
    smart, plain = cost["tpe+asha"], cost["random+fifo"]

    def ratio(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean(a, axis=axis) / np.mean(b, axis=axis)

    out = {"ratio": float(ratio(smart, plain)), "censored_at": budget, "seeds": len(smart)}
    if len(smart) >= 3:
        ci = bootstrap((smart, plain), ratio, paired=True, vectorized=True, n_resamples=10_000,
                       method="percentile", random_state=0).confidence_interval
        out |= {"ci_low": float(ci.low), "ci_high": float(ci.high)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=24, help="trials at most, per sweep")
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--pairs", type=int, default=4, help="ART's K")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per trial at most")
    parser.add_argument("--steps", type=int, default=60, help="steps per epoch")
    parser.add_argument("--first-seed", type=int, default=0, help="searcher seeds from this one on")
    parser.add_argument("--extend", type=Path, help="an earlier run's JSON with the same settings: add to it")
    parser.add_argument("--bootstrap-count", type=int, default=0,
                        help="ASHA's scheduler.bootstrap_count (0: Ray's ASHA as is)")
    parser.add_argument("--pair-with", type=Path,
                        help="an earlier run's JSON (same trials, epochs, target): take its random+fifo "
                        "searches of these seeds instead of running them again (random+fifo does not "
                        "depend on the ASHA settings), and run tpe+asha only")
    parser.add_argument("--name", default="search_efficiency",
                        help="results file benchmarks/results/NAME.json")
    args = parser.parse_args()
    try:
        earlier = earlier_run(args)
        paired = paired_searches(args)
    except SystemExit as e:
        parser.error(str(e))  # exit status 2, as for any bad argument
    import ray

    from sweep import tracking
    from sweep.runner import connect_ray

    print(f"load average before: {os.getloadavg()[0]:.2f}")
    rows: dict[str, list[tuple[int, int | None, int, float, int]]] = {s: [] for s in STRATEGIES}
    start = time.perf_counter()
    with scratch_home(), record(args.name, vars(args), kind="search_efficiency") as payload:
        try:
            connect_ray()
            run_all(args, rows, skip={"random+fifo"} if paired else set())
        finally:
            ray.shutdown()
            tracking.stop_local_server()
        keys = ("seed", "epochs_to_target", "total_epochs", "best", "trials")
        strategies = {name: [dict(zip(keys, v, strict=True)) for v in values]
                      for name, values in rows.items()}
        if paired:
            strategies["random+fifo"] = paired["searches"]
        strategies, earlier_runs = with_earlier_seeds(strategies, earlier)
        payload["results"] = {
            "target": args.target, "pairs": args.pairs,
            "trials": args.trials, "epochs": args.epochs, "steps_per_epoch": args.steps,
            "bootstrap_count": args.bootstrap_count,
            "paired_with": paired_with(paired, earlier),
            "wall_s": time.perf_counter() - start + sum(run["wall_s"] for run in earlier_runs),
            "strategies": strategies, "earlier_runs": earlier_runs,
            "seeds_this_run": list(range(args.first_seed, args.first_seed + args.seeds)),
            "efficiency": efficiency_ratio(strategies, args.trials * args.epochs),
        }
    print(f"\n{args.seeds} seeds, {args.trials} trials of <= {args.epochs} epochs of {args.steps} steps, "
          f"{time.perf_counter() - start:.0f} s, load average after: {os.getloadavg()[0]:.2f}; "
          f"{payload['results']['efficiency']}")


def run_of(payload: dict) -> dict:
    """The provenance of the run that wrote `payload` (without the runs it extended), and its seeds."""
    results = payload["results"]
    seeds = results.get("seeds_this_run") or [s["seed"] for s in results["strategies"]["tpe+asha"]]
    wall_s = results["wall_s"] - sum(run["wall_s"] for run in results.get("earlier_runs", []))
    keys = ("command", "git_commit", "started_utc", "finished_utc", "load_average_before",
            "load_average_after", "machine")
    return {key: payload.get(key) for key in keys} | {"wall_s": wall_s, "seeds": seeds}


def with_earlier_seeds(strategies: dict[str, list[dict]], earlier: dict | None
                       ) -> tuple[dict[str, list[dict]], list[dict]]:
    """This run's seeds with those of the run it extends (sorted by seed), and the earlier runs'
    provenance (this run's is the file's own)."""
    if earlier is None:
        return strategies, []
    earlier_runs = [*earlier["results"].get("earlier_runs", []), run_of(earlier)]
    merged = {name: sorted(earlier["results"]["strategies"][name] + seeds, key=lambda s: s["seed"])
              for name, seeds in strategies.items()}
    return merged, earlier_runs


TASK_SETTINGS = {"target": "target", "pairs": "pairs", "trials": "trials", "epochs": "epochs",
                 "steps": "steps_per_epoch"}  # argument -> results key: what both strategies' searches share
RUN_SETTINGS = TASK_SETTINGS | {"bootstrap_count": "bootstrap_count"}  # and ASHA's (absent before: 0)


def load_run(path: Path, flag: str) -> dict:
    """An earlier run's JSON, or SystemExit naming `flag` when it is not a search_efficiency result."""
    try:
        payload = json.loads(path.read_text())
        results = payload["results"]
        missing = [key for key in TASK_SETTINGS.values() if key not in results]
        missing += [name for name in STRATEGIES if not all("seed" in s for s in results["strategies"][name])]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{flag} {path}: not a search_efficiency result ({e})") from None
    if missing:
        raise SystemExit(f"{flag} {path}: not a search_efficiency result (no {', '.join(missing)})")
    return payload


def check_settings(path: Path, flag: str, results: dict, args: argparse.Namespace, names: list[str]) -> None:
    """SystemExit when the run at `path` had other `names` settings than this one (a run from before
    bootstrap_count existed had 0)."""
    differ = ", ".join(f"--{n.replace('_', '-')} {results.get(RUN_SETTINGS[n], 0)} (not {getattr(args, n)})"
                       for n in names if results.get(RUN_SETTINGS[n], 0) != getattr(args, n))
    if differ:
        raise SystemExit(f"{flag} {path} was run with {differ}: use the same settings")


def earlier_run(args: argparse.Namespace) -> dict | None:
    """The run `--extend` names, checked before anything starts: same settings, no seed measured twice."""
    if args.extend is None:
        return None
    payload = load_run(args.extend, "--extend")
    check_settings(args.extend, "--extend", payload["results"], args, list(RUN_SETTINGS))
    seeds = {s["seed"] for s in payload["results"]["strategies"]["tpe+asha"]}
    overlap = seeds & set(range(args.first_seed, args.first_seed + args.seeds))
    if overlap:
        raise SystemExit(f"--extend {args.extend} already has seeds {sorted(overlap)}: set --first-seed "
                         f"{max(seeds) + 1}")
    return payload


def paired_with(paired: dict | None, earlier: dict | None) -> dict | None:
    """Where the random+fifo side came from, over this run and the one it extends."""
    before = (earlier or {}).get("results", {}).get("paired_with")
    if not paired:
        return before
    commits = sorted({*paired["git_commits"], *(before or {}).get("git_commits", [])})
    return {"file": paired["file"], "git_commits": commits}


def paired_searches(args: argparse.Namespace) -> dict | None:
    """The random+fifo searches of this run's seeds from `--pair-with`'s file, with where they come from."""
    if args.pair_with is None:
        return None
    payload = load_run(args.pair_with, "--pair-with")
    results = payload["results"]
    check_settings(args.pair_with, "--pair-with", results, args, list(TASK_SETTINGS))  # FIFO has no ASHA
    searches = {s["seed"]: s for s in results["strategies"]["random+fifo"]}
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    missing = [seed for seed in seeds if seed not in searches]
    if missing:
        raise SystemExit(f"--pair-with {args.pair_with} has no random+fifo search of seeds {missing}")
    runs = [*results.get("earlier_runs", []), run_of(payload)]
    return {"file": args.pair_with.name, "searches": [searches[seed] for seed in seeds],
            "git_commits": sorted({run["git_commit"] for run in runs
                                   if set(run["seeds"]) & set(seeds)})}


def run_all(args: argparse.Namespace, rows: dict[str, list[tuple[int, int | None, int, float, int]]],
            skip: set[str]) -> None:
    from sweep.export import load_trials
    from sweep.runner import run_sweep

    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for strategy in (s for s in STRATEGIES if s not in skip):
            spec = spec_for(strategy, seed, args)
            result = run_sweep(spec)
            records = load_trials(spec.name)
            to_target, total = epochs_to_target(records, args.target)
            best = result.best.value("val_accuracy") if result.best else float("nan")
            rows[strategy].append((seed, to_target, total, best, len(records)))
            print(f"{strategy:12s} seed {seed}: epochs to {args.target:.0%}: {to_target}, "
                  f"total {total} in {len(records)} trials, best {best:.4f}", flush=True)


if __name__ == "__main__":
    main()
