"""Where a sweep's fixed cost goes: the processes it starts and the imports its workers pay, in wall time
and CPU time, each measured alone, then one small sweep's phases.

    .venv/bin/python benchmarks/fixed_cost.py [--trials 6]     # results/fixed_cost.json

Parts, each on an otherwise idle machine (run nothing beside it):
- the local MLflow server (`sweep`'s own start, SQLite store): boot to /health on a new store and on an
  existing one, CPU seconds per process of its tree, and the stop;
- a local Ray (`ray.init` as `sweep run` calls it): wall time, CPU seconds per process it started, stop;
- imports a trial worker pays once per process (fresh interpreters): torch, and torch's first optimizer,
  which imports torch._dynamo;
- a sweep of `--trials` short trials: time stamps of its phases (Ray start, Tune set-up, first report,
  end of Tune, exports and reconcile, Ray and server stop).
These are what the sweep-overhead targets are made of (docs/benchmarks.md, "Where the fixed cost goes").
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import record  # noqa: E402

IMPORTS = {  # what -> (set-up, not timed; the timed statement), each in a fresh interpreter
    "import torch": ("", "import torch"),
    "torch's first optimizer (it imports torch._dynamo)":
        ("import torch; m = torch.nn.Linear(2, 2)", "torch.optim.Adam(m.parameters())"),
    "import mlflow": ("", "import mlflow"),
    "import mlflow.server (`mlflow server` loads it, then starts uvicorn)": ("", "import mlflow.server"),
    "from ray import tune": ("", "from ray import tune"),
}


@contextmanager
def fresh_home() -> Iterator[Path]:
    """FWSWEEP_HOME in a new temporary folder (its own MLflow store), restored afterwards."""
    before = os.environ.get("FWSWEEP_HOME")
    home = Path(tempfile.mkdtemp(prefix="fwsweep-fixed-"))
    os.environ["FWSWEEP_HOME"] = str(home)
    try:
        yield home
    finally:
        if before is None:
            os.environ.pop("FWSWEEP_HOME", None)
        else:
            os.environ["FWSWEEP_HOME"] = before


def cpu_s(proc: Any) -> float:
    """User + system CPU seconds of a process and of its children it has waited for."""
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def mlflow_boot() -> dict[str, Any]:
    import psutil

    from sweep import tracking

    out: dict[str, Any] = {}
    with fresh_home():
        for store in ("new store", "existing store"):
            start = time.perf_counter()
            with tracking.tracking_server(None):
                ready = time.perf_counter() - start
                root = psutil.Process(tracking.read_state()["pid"])
                tree = [root, *root.children(recursive=True)]
                per_process = {("`mlflow server` (parent)" if p.pid == root.pid else "uvicorn (the server)"):
                               round(cpu_s(p), 2) for p in tree}
                stop = time.perf_counter()
            out[store] = {"ready_s": round(ready, 2), "cpu_s": per_process,
                          "stop_s": round(time.perf_counter() - stop, 2)}
    return out


def process_kind(cmdline: list[str]) -> str:
    text = " ".join(cmdline)
    kinds = (("gcs_server", "gcs_server"), ("raylet/raylet", "raylet"), ("log_monitor", "log_monitor"),
             ("monitor.py", "autoscaler monitor"), ("dashboard/dashboard.py", "dashboard (head)"),
             ("DashboardAgent", "dashboard agent"), ("RuntimeEnvAgent", "runtime env agent"),
             ("ray::IDLE", "idle worker"))  # log_monitor.py before monitor.py, which it contains
    for key, name in kinds:
        if key in text:
            return name
    return text[:60]


def ray_boot(settle_s: float = 3.0) -> dict[str, Any]:
    import psutil
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    init_s = time.perf_counter() - start
    time.sleep(settle_s)  # the processes it started finish their own start-up
    per_kind: dict[str, float] = {}
    for child in psutil.Process().children(recursive=True):
        try:
            kind = process_kind(child.cmdline())
            per_kind[kind] = round(per_kind.get(kind, 0.0) + cpu_s(child), 2)
        except psutil.Error:
            continue
    stop = time.perf_counter()
    ray.shutdown()
    return {"init_s": round(init_s, 2), "cpu_s": per_kind, "shutdown_s": round(time.perf_counter() - stop, 2)}


def import_costs() -> dict[str, dict[str, float]]:
    """Wall and CPU seconds of each timed statement, in a fresh interpreter after its set-up."""
    out = {}
    for name, (setup, timed) in IMPORTS.items():
        probe = (f"import json, time\n{setup}\nt, c = time.perf_counter(), time.process_time()\n{timed}\n"
                 "print(json.dumps([time.perf_counter() - t, time.process_time() - c]))")
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
        wall, cpu = json.loads(done.stdout.strip().splitlines()[-1])
        out[name] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
    return out


def sweep_phases(trials: int) -> dict[str, Any]:
    """A sweep of short trials with its phases time-stamped (seconds from the start of run_sweep)."""
    import ray
    from ray import tune

    from sweep import export, runner, tracking
    from sweep.config import SweepSpec

    marks: list[tuple[float, str]] = []
    t0 = time.perf_counter()

    def timed(owner: Any, name: str) -> Callable[[], None]:
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            marks.append((time.perf_counter() - t0, f"{name} starts"))
            try:
                return original(*args, **kwargs)
            finally:
                marks.append((time.perf_counter() - t0, f"{name} ends"))

        setattr(owner, name, wrapper)
        return lambda: setattr(owner, name, original)

    undo = [timed(runner, "connect_ray"), timed(tune.Tuner, "fit"), timed(runner, "sync_after"),
            timed(ray, "shutdown"), timed(tracking, "stop_local_server")]
    spec = SweepSpec.model_validate({
        "name": "fixed-cost",
        "task": {"name": "art", "pairs": 2, "train_size": 2000, "val_size": 300, "test_size": 300},
        "train": {"batch_size": 64, "epochs": 1, "steps_per_epoch": 40, "eval_batch_size": 300,
                  "num_threads": 1},
        "models": ["lstm"], "space": {"common": {"lr": {"loguniform": [1e-3, 1e-2]}, "hidden_size": 16}},
        "scheduler": {"name": "fifo"}, "budget": {"num_samples": trials, "max_concurrent": 2}})
    try:
        with fresh_home():
            start_wall = time.time() - (time.perf_counter() - t0)
            runner.run_sweep(spec)
            returned = time.perf_counter() - t0
            records = export.load_trials(spec.name)
    finally:
        for restore in undo:
            restore()
    first_report = min(r.history[0]["timestamp"] for r in records if r.history) - start_wall
    marks += [(first_report, "first report (Tune's time stamps are whole seconds)"),
              (returned, "run_sweep returns")]
    return {"trials": trials, "marks": [[round(t, 2), what] for t, what in sorted(marks)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6, help="trials of the timed sweep (default 6)")
    args = parser.parse_args()
    with record("fixed_cost", vars(args)) as payload:
        results = payload["results"] = {}
        results["imports"] = import_costs()
        results["mlflow_server"] = mlflow_boot()
        results["ray"] = ray_boot()
        results["sweep"] = sweep_phases(args.trials)
    print(json.dumps(payload["results"], indent=1))


if __name__ == "__main__":
    main()
