"""Where the sweep driver's time goes: `sweep run` of many short trials under py-spy, stacks summarised.

A sweep of `--trials` tiny trials (LSTM, hidden 8, 2 epochs of 4 steps: ~0.1-0.2 s of training each),
FIFO, 2 at a time, against a local MLflow server, run by the `sweep` CLI under `py-spy record --threads
--format raw` (the driver process only: trials run in Ray workers). The samples (on-CPU, all threads of
the driver) are grouped by where they are: on Tune's event loop (matplotlib, MLflow requests, the rest),
before Tune starts, after it (exports and the MLflow reconcile), fwsweep's MLflow writer thread.
`--source DIR` profiles another checkout of the package (e.g. `git archive` of an older commit) with this
venv, for a before/after comparison.

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RATE_HZ = 50  # py-spy samples per second
CLI = "import sys; from sweep.cli import main; sys.argv[0] = 'sweep'; main()"  # the `sweep` command
GROUPS = (  # (name, test on (thread, stack)); first match wins
    ("Tune's event loop: matplotlib", lambda t, st: "Tuner.fit" in st and "matplotlib" in st),
    ("Tune's event loop: MLflow requests", lambda t, st: "Tuner.fit" in st and "mlflow" in st),
    ("Tune's event loop: the rest", lambda t, st: "Tuner.fit" in st),
    ("after Tune: exports + MLflow reconcile", lambda t, st: "sync_after" in st or "write_exports" in st
     or "_log_summary" in st or ".close (sweep/mlflow" in st),
    ("before Tune: imports, Ray, server start", lambda t, st: "MainThread" in t),
    ("MLflow writer thread (off the loop)", lambda t, st: "fwsweep-mlflow-writer" in t),
)


THREAD_ID = re.compile(r"^\s*thread\s*\((?:0x)?[0-9a-fA-F]+\):?\s*|-\d+\b")  # "thread (4504): Thread-203"


def thread_name(thread: str) -> str:
    """A thread's name without its id or counter: the same kind of thread in every trial is one row."""
    return THREAD_ID.sub("", thread).strip(' "') or "(unnamed)"


def summarise(raw: Path) -> tuple[Counter, int, Counter]:
    """(samples per group, total samples, samples per thread name within "other threads") of a py-spy raw
    (collapsed, --threads) file."""
    groups: Counter = Counter()
    others: Counter = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        thread, _, frames = stack.partition(";")
        total += int(count)
        name = next((g for g, test in GROUPS if test(thread, frames)), "other threads")
        groups[name] += int(count)
        if name == "other threads":
            others[thread_name(thread)] += int(count)
    return groups, total, others


def profile() -> dict:
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
    subprocess.run([str(py_spy), "record", "--threads", "--format", "raw", "--rate", str(RATE_HZ),
                    "-o", str(raw), "--", sys.executable, "-c", CLI, "run", str(work / "spec.yaml")],
                   env=env, cwd=work, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    groups, total, others = summarise(raw)
    print(f"source {args.source}: {args.trials} trials in {wall:.0f} s (load average {load:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after); {total} on-CPU samples of the driver at 50 Hz")
    for name, n in groups.most_common():
        print(f"  {name:40s} {100 * n / max(total, 1):5.1f} %")
    for name, n in others.most_common(8):
        print(f"    other thread {name[:60]:60s} {100 * n / max(total, 1):5.1f} %")
    return {"trials": args.trials, "wall_s": wall, "samples": total, "rate_hz": RATE_HZ,
            "driver_cpu_s": total / RATE_HZ, "driver_cpu_s_per_trial": total / RATE_HZ / max(args.trials, 1),
            "groups": dict(groups.most_common()), "other_threads": dict(others.most_common(12))}


def main() -> None:
    name = "driver_profile" if "--source" not in sys.argv else "driver_profile_source"
    with record(name, {"argv": sys.argv[1:]}, kind="driver_profile") as payload:
        payload["results"] = profile()


if __name__ == "__main__":
    main()
