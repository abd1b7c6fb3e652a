"""Tracking cost in the Tune driver: time per report, fwsweep's callback against Ray's stock logging.

Both log the same reports (the metrics `run_trial` sends per epoch plus Tune's numeric bookkeeping) to one
real local MLflow server (`--workers 1`, SQLite), in this process:

    stock  = ray.air._internal.mlflow._MLflowLoggerUtil.log_metrics, what MLflowLoggerCallback calls per
             result: one get_run plus one log_metric request per metric
    fwsweep = the run writer's log_rows, which the live callback's background thread calls: one log_batch
              request per report

and what Tune's event loop pays per report with fwsweep (the hook only enqueues), timed against an
unreachable server (the stock client retries each request with back-off for minutes: not timed).
Reports the ratio stock / fwsweep.
Usage: .venv/bin/python benchmarks/tracking.py [--reports 60]. Writes benchmarks/results/tracking.json;
`benchmarks/render.py` puts the table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import record  # noqa: E402

REPORT = {  # one epoch of run_trial, plus the numeric fields Tune adds to every result
    "epoch": 1, "step": 100, "train_loss": 0.5, "val_loss": 0.6, "val_accuracy": 0.8,
    "best_val_accuracy": 0.8,
    "steps_per_s": 40.0, "sequences_per_s": 5000.0, "elapsed_s": 2.5, "num_params": 12345, "diverged": 0,
    "time_this_iter_s": 2.5, "time_total_s": 2.5, "time_since_restore": 2.5, "training_iteration": 1,
    "iterations_since_restore": 1, "timestamp": 0, "pid": 1,
}


def _report(epoch: int) -> dict:
    return REPORT | {"epoch": epoch, "training_iteration": epoch, "val_accuracy": 0.5 + epoch / 1000}


def time_stock(url: str, reports: int) -> list[float]:
    from mlflow.tracking import MlflowClient
    from ray.air._internal.mlflow import _MLflowLoggerUtil

    util = _MLflowLoggerUtil()
    util.setup_mlflow(tracking_uri=url, experiment_name="bench-stock", create_experiment_if_not_exists=True)
    run_id = MlflowClient(url).create_run(util.experiment_id).info.run_id
    times = []
    for epoch in range(1, reports + 1):
        start = time.perf_counter()
        util.log_metrics(step=epoch, metrics_to_log=_report(epoch), run_id=run_id)
        times.append(time.perf_counter() - start)
    return times


def time_fwsweep(url: str, reports: int, name: str) -> list[float]:
    """fwsweep's request per report (the run writer's log_rows: one log_batch, deduped by step), as the
    live callback's background thread makes it."""
    from sweep.mlflow_runs import identity
    from sweep.mlflow_runs.writer import RunWriter, rows_of

    writer = RunWriter(url)
    run_id = writer.create_run(identity.experiment_id(writer.client, name), name, {})
    times = []
    for epoch in range(1, reports + 1):
        start = time.perf_counter()
        writer.log_rows(run_id, rows_of([_report(epoch) | {"step": 100 * epoch}]))
        times.append(time.perf_counter() - start)
    return times


def time_hook(url: str, reports: int) -> list[float]:
    """What Tune's event loop pays per report: MlflowSweepCallback.on_trial_result only enqueues."""
    from ray.tune.experiment import Trial

    from sweep.config import SweepSpec
    from sweep.mlflow_runs.callback import MlflowSweepCallback

    spec = SweepSpec.model_validate({"name": "bench-hook", "models": ["lstm"]})
    callback = MlflowSweepCallback(url, spec)
    trial = Trial("bench", config={"model": "lstm"}, trial_id="bench_0", stub=True)
    callback.setup()
    callback.on_trial_start(0, [trial], trial)
    times = []
    for epoch in range(1, reports + 1):
        start = time.perf_counter()
        callback.on_trial_result(0, [trial], trial, _report(epoch))
        times.append(time.perf_counter() - start)
    callback.close(timeout_s=2.0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=60)
    args = parser.parse_args()

    from sweep.tracking import free_port, start_server, stop_process_tree

    with record("tracking", vars(args)) as payload:
        server = start_server(Path(tempfile.mkdtemp(prefix="fwsweep-bench-mlflow-")))
        try:
            time_fwsweep(server.url, 5, "bench-warmup")  # imports and connection pools, for both
            stock = time_stock(server.url, args.reports)
            ours = time_fwsweep(server.url, args.reports, "bench-fwsweep")
        finally:
            stop_process_tree(server.pid)
        down = time_hook(f"http://127.0.0.1:{free_port()}", args.reports)
        payload["results"] = {
            "reports": args.reports, "fields": len(REPORT),
            "seconds_per_report": {"stock": stock, "fwsweep": ours, "fwsweep_server_down": down},
        }

    def ms(xs: list[float]) -> str:
        p90 = sorted(xs)[int(0.9 * len(xs))]
        return f"median {1000 * statistics.median(xs):7.1f} ms, p90 {1000 * p90:7.1f} ms"

    metrics = sum(1 for k, v in REPORT.items() if isinstance(v, int | float))
    print(f"{args.reports} reports of {len(REPORT)} fields ({metrics} numeric) to a local MLflow server")
    print(f"stock (one request per metric): {ms(stock)}")
    print(f"fwsweep (one log_batch):        {ms(ours)}")
    print(f"fwsweep Tune hook, server down: {ms(down)}")
    print(f"ratio stock / fwsweep (median): {statistics.median(stock) / statistics.median(ours):.1f}x")


if __name__ == "__main__":
    main()
