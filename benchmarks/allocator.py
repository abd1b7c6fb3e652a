"""Train-step time and page faults with malloc's thresholds as glibc sets them and as trials set them.

    .venv/bin/python benchmarks/allocator.py              # H in {20, 100}, 3 pairs of processes
    .venv/bin/python benchmarks/allocator.py --pairs 5

`run_trial` raises glibc's mmap and trim thresholds (sweep/allocator.py) so that the memory one train step
frees stays mapped for the next. The setting is process-wide and cannot be undone, so the baseline runs in
processes of its own: pairs of fresh processes, one with glibc's defaults and one with the trial setting,
one after the other. Each process trains one model, as a trial does (LN-LSTM or FW-LSTM, fused), one
torch thread, batch 128, ART K=8, and counts the minor page faults of its timed steps (getrusage). The
ratio per model is the median step time with the trial setting over the median with glibc's defaults,
over all pairs.

Writes benchmarks/results/allocator.json; `benchmarks/render.py` renders it into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch  # noqa: F401 (recorded: record() notes the torch version of the measuring processes)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import options_label  # noqa: E402
from record import record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [("ln_lstm", {"cell_form": "fused"}), ("fw_lstm", {"fw_form": "fused"})]

# One process, one model: three warm-up steps, then `steps` timed steps; prints JSON.
PROCESS = r"""
import json, resource, sys, time
import torch
sys.path.insert(0, sys.argv[1])
from models import VOCAB, CLASSES, art_shaped_batch, params_class, train_step_fn
from sweep.allocator import keep_freed_memory
from sweep.models import build_model
mode, hidden, steps = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
name, options = json.loads(sys.argv[5])
torch.set_num_threads(1)
if mode == "kept":
    assert keep_freed_memory()
x, y = art_shaped_batch(128, 8)
torch.manual_seed(0)
step = train_step_fn(build_model(params_class(name)(hidden_size=hidden, **options), VOCAB, CLASSES), x, y)
step(); step(); step()
times, faults = [], 0
for _ in range(steps):
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.thread_time()
    step()
    times.append(1e3 * (time.thread_time() - start))
    faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"ms": times, "faults_per_step": faults / steps}))
"""


def run_process(mode: str, hidden: int, steps: int, config: tuple[str, dict]) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", PROCESS, str(Path(__file__).parent), mode, str(hidden),
                           str(steps), json.dumps(config)], capture_output=True, text=True, env=env,
                          check=True, timeout=600)
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--pairs", type=int, default=3, help="pairs of processes (default, kept) per H")
    parser.add_argument("--steps", type=int, default=9, help="timed rounds per process")
    args = parser.parse_args()
    with record("allocator", vars(args), kind="allocator") as payload:
        rows = []
        for hidden in args.hidden:
            for name, options in CONFIGS:
                runs: dict[str, list[dict]] = {"default": [], "kept": []}
                for _ in range(args.pairs):
                    for mode in runs:
                        runs[mode].append(run_process(mode, hidden, args.steps, (name, options)))
                ms = {m: statistics.median(t for run in rs for t in run["ms"]) for m, rs in runs.items()}
                faults = {m: statistics.median(r["faults_per_step"] for r in rs) for m, rs in runs.items()}
                rows.append({"model": name, "options": options_label(options),
                             "hidden_size": hidden, "ms_default": ms["default"], "ms_kept": ms["kept"],
                             "ratio": ms["kept"] / ms["default"], "faults_default": faults["default"],
                             "faults_kept": faults["kept"]})
                print(f"H={hidden} {name}: {ms['default']:.1f} -> {ms['kept']:.1f} ms "
                      f"({ms['kept'] / ms['default']:.2f}x), page faults per step {faults['default']:.0f} -> "
                      f"{faults['kept']:.0f}")
        payload["results"] = {"rows": rows}


if __name__ == "__main__":
    main()
