"""Where the sweep driver's time goes: `sweep run` of many short trials under py-spy, stacks summarised.

A sweep of `--trials` tiny trials (LSTM, hidden 8, 2 epochs of 4 steps: ~0.1-0.2 s of training each),
FIFO, 2 at a time, against a local MLflow server, run by the `sweep` CLI under `py-spy record --threads
--format raw` (the driver process only: trials run in Ray workers). The samples (on-CPU, all threads of
the driver) are grouped by what they are in: matplotlib, MLflow client calls, on Tune's event loop (main
thread) or fwsweep's writer thread, and the rest. `--source DIR` profiles another checkout of the package
(e.g. `git archive` of an older commit) with this venv, for a before/after comparison.

Usage: .venv/bin/python benchmarks/driver_profile.py [--trials 40] [--source DIR] [--out FILE.txt]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLI = "import sys; from sweep.cli import main; sys.argv[0] = 'sweep'; main()"  # the `sweep` command
GROUPS = (  # first match wins, checked on the whole stack
    ("matplotlib (per-trial PNG)", re.compile(r"matplotlib")),
    ("MLflow requests", re.compile(r"mlflow|requests/|urllib3")),
    ("Tune: trial results, state snapshots", re.compile(r"ray/tune/")),
    ("Ray core (object store, RPC)", re.compile(r"ray/_private|ray/_raylet|ray/util")),
    ("imports, start-up", re.compile(r"<frozen importlib")),
)


def summarise(raw: Path) -> tuple[Counter, int, Counter]:
    """(samples per group, total samples, samples per thread) of a py-spy raw (collapsed) file."""
    groups: Counter = Counter()
    threads: Counter = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        thread = stack.split(";", 1)[0]
        threads["writer thread" if "fwsweep-mlflow-writer" in thread or "_loop (sweep/mlflow_runs" in stack
                else "main thread" if "MainThread" in thread or "0x" not in thread else thread[:40]] += n
        name = next((g for g, pattern in GROUPS if pattern.search(stack)), "other")
        groups[name] += n
    return groups, total, threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--source", type=Path, default=ROOT, help="checkout whose `sweep` package runs")
    parser.add_argument("--out", type=Path, default=None, help="raw py-spy output (default: a temp file)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fwsweep-prof-"))
    spec = yaml.safe_load((ROOT / "search_spaces/tests/faults_tiny.yaml").read_text())
    spec |= {"name": "driver-profile", "budget": {"num_samples": args.trials, "max_concurrent": 2}}
    spec["train"] |= {"epochs": 2}
    (work / "spec.yaml").write_text(yaml.safe_dump(spec))
    raw = args.out or work / "profile.txt"
    env = os.environ | {"FWSWEEP_HOME": str(work / "home"), "PYTHONPATH": str(args.source.resolve())}
    env.pop("MLFLOW_TRACKING_URI", None)
    py_spy = Path(sys.executable).with_name("py-spy")
    load = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run([str(py_spy), "record", "--threads", "--format", "raw", "--rate", "50", "-o", str(raw),
                    "--", sys.executable, "-c", CLI, "run", str(work / "spec.yaml")],
                   env=env, cwd=work, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    groups, total, threads = summarise(raw)
    print(f"source {args.source}: {args.trials} trials in {wall:.0f} s (load average {load:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after); {total} on-CPU samples of the driver at 50 Hz")
    for name, n in groups.most_common():
        print(f"  {name:40s} {100 * n / max(total, 1):5.1f} %")
    for name, n in threads.most_common(4):
        print(f"  thread {name:33s} {100 * n / max(total, 1):5.1f} %")


if __name__ == "__main__":
    main()
