"""Sweep overhead: how much of the machine's cores a sweep spends training.

Long trials (default): 16 trials of about 20 s of training each (an LSTM on ART K=4, sized by a
calibration run in this process) on the local Ray with every core, one core per trial, FIFO (no early
stopping), tracked in a real local MLflow server. Short trials (`--short`, the common case under ASHA):
200 trials of about 0.16 s of training (ART K=2, one epoch), FIFO, 2 at a time. Reports

    core utilisation = sum of the trials' own training time / (wall time x cores)
    overhead per trial = (wall time x cores - sum of training time) / trials   (core-seconds)

with wall time measured around `run_sweep` (Ray start, MLflow, Tune, exports: what the user waits for).
Targets (issue 14): utilisation >= 0.93 for the long case (cold server); <= 0.2 core-s of overhead per
short trial. Usage:

    .venv/bin/python benchmarks/sweep_overhead.py [--warm-server]      # results/sweep_overhead[_warm].json
    .venv/bin/python benchmarks/sweep_overhead.py --short              # results/sweep_overhead_short.json
    .venv/bin/python benchmarks/sweep_overhead.py --snapshots          # results/sweep_snapshots.json
    .venv/bin/python benchmarks/sweep_overhead.py --against COMMIT     # results/sweep_against_COMMIT.json

then `benchmarks/render.py` to update docs/benchmarks.md. Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import record, scratch_home  # noqa: E402


def calibrate(seconds: float, task: dict, epochs: int) -> int:
    """Steps per epoch so that `epochs` epochs take about `seconds` on one thread of this machine."""
    import torch

    from sweep.config import TrialConfig
    from sweep.reporter import NullReporter
    from sweep.train import run_trial

    torch.set_num_threads(1)
    train = BASE_TRIAL["train"] | {"epochs": 3, "steps_per_epoch": 60}  # the first epoch warms up
    config = TrialConfig.model_validate({**BASE_TRIAL, "task": task, "train": train})
    reporter = NullReporter()
    run_trial(config, reporter, Path(tempfile.mkdtemp(dir=os.environ["FWSWEEP_HOME"])))
    steps_per_s = min(r["steps_per_s"] for r in reporter.history[1:])
    return max(2, int(steps_per_s * seconds / epochs))


SHORT_SECONDS, SHORT_PAIRS = 0.16, 2  # the short-trial case: ~0.16 s of training on ART K=2

BASE_TRIAL = {
    "task": {"name": "art", "pairs": 4, "train_size": 20000, "val_size": 1000, "test_size": 1000, "seed": 0},
    "model": {"name": "lstm", "hidden_size": 50},
    "train": {"batch_size": 128, "eval_batch_size": 1000, "device": "cpu", "num_threads": 1,
              "keep_checkpoints": 1},
}


@functools.cache
def _rule_sets() -> dict[str, dict[str, Any]]:
    """Tune's own snapshot rules and sweep/tune_snapshots.py's, read once, before the sweep installs its."""
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager as manager

    from sweep import tune_snapshots

    tune = {name: manager.__dict__[name] for name in tune_snapshots.RULES}
    if not tune_snapshots.install():  # once per process: the sweep's own call then changes nothing
        raise SystemExit("sweep/tune_snapshots.py could not install its rules on this Ray")
    return {"tune": tune, "paced": tune_snapshots.RULES}


@contextlib.contextmanager
def snapshot_rules(rules: str) -> Iterator[dict[str, float]]:
    """Tune's experiment-state snapshots for one sweep: "paced" (sweep/tune_snapshots.py, as shipped) or
    "tune" (the baseline: Tune's own rules, a fixed 2 s period and a snapshot forced after `num_to_keep`
    checkpoints of a trial). Yields the count and seconds of the snapshots the sweep took, on the driver."""
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager as manager
    from ray.tune.execution.tune_controller import TuneController

    from sweep import tune_snapshots

    sets = _rule_sets()
    for name, rule in sets[rules].items():
        setattr(manager, name, rule)
    save, taken = TuneController.save_to_dir, {"snapshots": 0, "snapshot_s": 0.0}

    def timed_save(self: Any, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        try:
            save(self, *args, **kwargs)
        finally:
            taken["snapshots"] += 1
            taken["snapshot_s"] += time.perf_counter() - start

    before = os.environ.get("TUNE_GLOBAL_CHECKPOINT_S")
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "auto" if rules == "paced" else tune_snapshots.FIXED_PERIOD
    TuneController.save_to_dir = timed_save
    try:
        yield taken
    finally:
        TuneController.save_to_dir = save
        for name, rule in sets["paced"].items():
            setattr(manager, name, rule)
        if before is None:
            os.environ.pop("TUNE_GLOBAL_CHECKPOINT_S", None)
        else:
            os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = before


def measure(trials: int, seconds: float, pairs: int, epochs: int, concurrent: int | None,
            warm_server: bool, snapshots: str = "paced", name: str = "overhead",
            steps: int | None = None) -> dict:
    from sweep import tracking
    from sweep.config import SweepSpec
    from sweep.export import load_trials
    from sweep.runner import run_sweep

    cores = len(os.sched_getaffinity(0))
    task = BASE_TRIAL["task"] | {"pairs": pairs}
    steps = steps or calibrate(seconds, task, epochs)
    spec = SweepSpec.model_validate({
        "name": name,
        "task": task,
        "train": BASE_TRIAL["train"] | {"epochs": epochs, "steps_per_epoch": steps},
        "models": ["lstm"],
        "space": {"common": {"lr": {"loguniform": [1e-3, 1e-2]}, "hidden_size": 50}},
        "scheduler": {"name": "fifo"},
        "budget": {"num_samples": trials, "max_concurrent": concurrent or cores},
        "resources": {"cpu": 1, "gpu": 0},
    })
    if warm_server:
        with tracking.tracking_server(None, keep=True):
            pass
    start, cpu_start = time.perf_counter(), _process_cpu_s()
    try:
        with snapshot_rules(snapshots) as taken:
            result = run_sweep(spec)
    finally:
        wall, driver_cpu = time.perf_counter() - start, _process_cpu_s() - cpu_start
        tracking.stop_local_server()
    records = load_trials(spec.name)
    train_s = sum(r.metrics.get("elapsed_s", 0.0) for r in records)
    # the Tune phase (first trial start to last trial end): the fixed start-up cost (MLflow server, Ray,
    # imports) left out, the per-trial scheduling cost kept
    first = min(r.history[0]["timestamp"] - r.history[0]["time_total_s"] for r in records if r.history)
    last = max(r.metrics["timestamp"] for r in records if r.metrics)
    tune_wall = last - first
    return {
        "trials": len(records), "status_counts": result.status_counts, "steps_per_epoch": steps,
        "epochs": epochs, "pairs": pairs, "cores": cores, "concurrent": concurrent or cores,
        "server": "warm" if warm_server else "cold",
        "train_s": train_s, "train_s_per_trial": train_s / len(records), "wall_s": wall,
        "utilisation": train_s / (wall * cores),
        "overhead_core_s_per_trial": (wall * cores - train_s) / len(records),
        "tune_wall_s": tune_wall, "tune_utilisation": train_s / (tune_wall * cores),
        "tune_overhead_core_s_per_trial": (tune_wall * cores - train_s) / len(records),
        "fixed_cost_s": wall - tune_wall,
        "driver_cpu_s": driver_cpu, "driver_cpu_s_per_trial": driver_cpu / len(records),
        "snapshot_rules": snapshots, **taken,
    }


def _process_cpu_s() -> float:
    """CPU seconds (user + system, all threads) this process has used: the sweep driver's own share of
    the cores, which py-spy's samples overstate (it counts threads blocked in waits)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true",
                        help="the short-trial case: 200 trials of ~0.16 s, ART K=2, 1 epoch, 2 at a time")
    parser.add_argument("--trials", type=int, help="default 16 (200 with --short)")
    parser.add_argument("--seconds", type=float,
                        help="training time per trial (default 20; 0.16 with --short)")
    parser.add_argument("--warm-server", action="store_true",
                        help="start the local MLflow server before timing, as `sweep ui --detach` leaves it")
    parser.add_argument("--snapshots", action="store_true",
                        help="the short-trial case twice in one process: Tune's own experiment-state "
                             "snapshot rules (the baseline), then the shipped pacing "
                             "(sweep/tune_snapshots.py); 400 trials unless --trials")
    parser.add_argument("--against", metavar="COMMIT",
                        help="the short-trial case twice, each in a fresh process with one calibration: the "
                             "`sweep` package as of COMMIT (the baseline), then this checkout's; 400 trials "
                             "unless --trials (results/sweep_against_<COMMIT's short hash>.json)")
    parser.add_argument("--steps", type=int, help="steps per epoch (default: calibrated to --seconds)")
    parser.add_argument("--result-json", type=Path, help=argparse.SUPPRESS)  # one run of --against
    args = parser.parse_args()
    if args.snapshots:
        compare_snapshot_rules(args)
        return
    if args.against:
        compare_against(args)
        return
    if args.short:
        trials, seconds, pairs = args.trials or 200, args.seconds or SHORT_SECONDS, SHORT_PAIRS
        epochs, concurrent = 1, 2
        name = "sweep_overhead_short"
    else:
        trials, seconds, pairs, epochs, concurrent = args.trials or 16, args.seconds or 20.0, 4, 4, None
        name = "sweep_overhead_warm" if args.warm_server else "sweep_overhead"
    if args.result_json:  # one run of --against: its figures go to the parent process, not to results/
        with scratch_home():
            r = measure(trials, seconds, pairs, epochs, concurrent, args.warm_server, name="against",
                        steps=args.steps)
        import sweep

        args.result_json.write_text(json.dumps(r | {"sweep_source": str(Path(sweep.__file__).parent)}))
        return
    with scratch_home(), record(name, vars(args), kind="sweep_overhead") as payload:
        r = payload["results"] = measure(trials, seconds, pairs, epochs, concurrent, args.warm_server,
                                         steps=args.steps)
    print(f"{r['trials']} trials ({r['status_counts']}), {r['steps_per_epoch']} steps x {epochs} epochs; "
          f"sum of training {r['train_s']:.1f} s, wall {r['wall_s']:.1f} s on {r['cores']} cores "
          f"({r['server']} MLflow server)")
    print(f"core utilisation {r['utilisation']:.3f}; overhead {r['overhead_core_s_per_trial']:.2f} "
          f"core-s per trial; Tune phase {r['tune_wall_s']:.0f} s (utilisation "
          f"{r['tune_utilisation']:.3f}), fixed start/stop cost {r['fixed_cost_s']:.0f} s")


def compare_snapshot_rules(args: argparse.Namespace) -> None:
    """Both snapshot rules on the same short sweep, one after the other in this process (baseline first)."""
    trials, seconds, pairs = args.trials or 400, args.seconds or SHORT_SECONDS, SHORT_PAIRS
    with scratch_home(), record("sweep_snapshots", vars(args), kind="sweep_snapshots") as payload:
        steps = calibrate(seconds, BASE_TRIAL["task"] | {"pairs": pairs}, 1)  # the same work in both
        runs = [measure(trials, seconds, pairs, 1, 2, args.warm_server, snapshots=rules,
                        name=f"snapshots-{rules}", steps=steps) for rules in ("tune", "paced")]
        payload["results"] = {"trials": trials, "runs": runs}
    for r in runs:
        print(f"{r['snapshot_rules']:>5}: wall {r['wall_s']:.1f} s, {r['snapshots']} snapshots taking "
              f"{r['snapshot_s']:.1f} s, driver CPU {r['driver_cpu_s']:.1f} s, overhead "
              f"{r['overhead_core_s_per_trial']:.2f} core-s per trial")


def compare_against(args: argparse.Namespace) -> None:
    """The same short sweep with the `sweep` package of another commit (`git archive` of its sweep/, first
    on PYTHONPATH: the driver and Ray's workers import it), then with this checkout's; each run in a
    fresh process (a package cannot be swapped inside one), with the steps of one calibration. Written to
    results/sweep_against_<baseline's short hash>.json: each baseline keeps its own figures."""
    trials = args.trials or 400
    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "rev-parse", args.against], cwd=root, check=True, capture_output=True,
                            text=True).stdout.strip()
    with scratch_home(), record(f"sweep_against_{commit[:7]}", vars(args), kind="sweep_against") as payload, \
            tempfile.TemporaryDirectory(prefix="fwsweep-against-") as tmp:
        task = BASE_TRIAL["task"] | {"pairs": SHORT_PAIRS}
        steps = args.steps or calibrate(args.seconds or SHORT_SECONDS, task, 1)
        source = Path(tmp, "source")
        source.mkdir()
        archive = subprocess.run(["git", "archive", commit, "sweep"], cwd=root, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
        runs = []
        for label, path in ((f"{commit[:7]} (baseline)", source), ("this checkout", None)):
            out = Path(tmp, "run.json")
            env = {k: v for k, v in os.environ.items() if k != "FWSWEEP_HOME"}  # each its own scratch home
            if path is not None:
                env["PYTHONPATH"] = os.pathsep.join([str(path), *filter(None, [env.get("PYTHONPATH")])])
            subprocess.run([sys.executable, __file__, "--short", "--trials", str(trials), "--steps",
                            str(steps), "--result-json", str(out)], env=env, check=True)
            runs.append(json.loads(out.read_text()) | {"package": label})
        payload["results"] = {"trials": trials, "against": commit, "runs": runs}
    for r in runs:
        print(f"{r['package']:>20}: wall {r['wall_s']:.1f} s, driver CPU {r['driver_cpu_s']:.1f} s, overhead "
              f"{r['overhead_core_s_per_trial']:.2f} core-s per trial, fixed {r['fixed_cost_s']:.1f} s")


if __name__ == "__main__":
    main()
