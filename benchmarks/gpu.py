"""GPU benchmark, for when a CUDA device is lent: step time and peak memory vs H, B and T for every form,
eager and graphed, and the throughput of 1, 2 or 4 trials sharing one GPU (as `resources: {gpu: 0.5}` or
`{gpu: 0.25}` do). benchmarks/gpu_lease.sh runs it, with the CUDA tests, in one call.

    .venv/bin/python benchmarks/gpu.py                    # the whole grid, then the sharing test
    .venv/bin/python benchmarks/gpu.py --quick            # a few points only (a short device lease)
    .venv/bin/python benchmarks/gpu.py --budget-s 240     # time only the points that fit in 240 s

Writes benchmarks/results/gpu.json (see record.py); `benchmarks/render.py` makes its tables in
docs/benchmarks.md. Without CUDA it stops at once with exit code 2 and says so.

Step: a trial's own step (sweep.train.train_step: forward, cross-entropy, backward, clipping, Adam) on
ART-shaped input (benchmarks/models.py), eagerly and as a CUDA graph (sweep/cuda_graph.py, what trials do
on CUDA), timed with CUDA events after a warm-up, median of `--steps`, with the host's time to queue it;
peak memory is torch.cuda.max_memory_allocated over one step above the memory held before it; kernels per
step at the base point. Sharing: N processes (spawned, each its own CUDA context, as N Tune trials on one
GPU would be) train FW-LSTM (fused), eager then graphed, for `--share-seconds` after a common start; steps
per second per process, in all, and against one process alone.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import CLASSES, CONFIGS, MATRIX_CONFIGS, NATIVE, VOCAB, art_shaped_batch, options_label  # noqa: E402
from record import record  # noqa: E402

BASE = {"hidden": 100, "batch": 128, "length": 19}
SWEEPS = {"hidden": [20, 50, 100, 200, 400], "batch": [32, 128, 512, 2048], "length": [11, 19, 35, 67]}
QUICK_SWEEPS = {"hidden": [50, 100], "batch": [128, 1024], "length": [19, 35]}
# every model and form of benchmarks/models.py; its "C kernels off" rows are left out, since the C kernels
# run on the CPU only: on CUDA the fused forms are always the torch-ops code those rows time
FORMS = [(name, options) for name, options in CONFIGS + MATRIX_CONFIGS if NATIVE not in options]
GRAPH = "cuda_graph"  # not a model option: "on" replays the step as one CUDA graph (sweep/cuda_graph.py)
# what trials run on a GPU by default (train.cuda_graph: true); the matrix forms stay eager-only (their
# graph's pool would hold every A(t) for good)
GRAPHED_FORMS = [(name, opts | {GRAPH: "on"}) for name, opts in FORMS if opts.get("fw_form") != "matrix"]
MATRIX_LIMIT_BYTES = 8 * 2**30  # skip a matrix form whose stored A(t) alone would pass this (B·D²·T floats)


def grid(sweeps: dict[str, list[int]], base: dict[str, int] = BASE) -> list[dict[str, int]]:
    """The base point, and one axis varied at a time around it (no duplicates, base first)."""
    points = [dict(base)]
    for axis, values in sweeps.items():
        for value in values:
            point = base | {axis: value}
            if point not in points:
                points.append(point)
    return points


def too_big(name: str, options: dict, point: dict[str, int]) -> bool:
    """The matrix form keeps every A(t): skip points where that alone exceeds MATRIX_LIMIT_BYTES."""
    if options.get("fw_form") != "matrix":
        return False
    D = 4 * point["hidden"] if name == "fw_lstm" else point["hidden"]
    return 4 * point["batch"] * D * D * point["length"] > MATRIX_LIMIT_BYTES


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        print(
            f"benchmarks/gpu.py needs a CUDA GPU, and torch {torch.__version__} sees none "
            "(torch.cuda.is_available() is False). Run it on a machine with a GPU and a CUDA build of torch.",
            file=sys.stderr,
        )
        raise SystemExit(2)


def build(name: str, options: dict, point: dict[str, int], device: str):  # noqa: ANN201
    """The model and its train step as a trial takes it (sweep.train.train_step: Adam, clipping at 1),
    graphed when options ask for it."""
    import torch

    from sweep.config import TrainConfig
    from sweep.cuda_graph import graphed_if_cuda
    from sweep.models import build_model, params_class
    from sweep.train import make_optimizer, train_step

    torch.manual_seed(0)
    fields = {k: v for k, v in options.items() if k != GRAPH}
    model = build_model(params_class(name)(hidden_size=point["hidden"], **fields), VOCAB, CLASSES).to(device)
    x, y = art_shaped_batch(point["batch"], (point["length"] - 3) // 2)
    x, y = x.to(device), y.to(device)
    train = TrainConfig()
    optimizer = make_optimizer(train, model)
    eager = lambda bx, by: train_step(model, optimizer, bx, by, train.grad_clip)  # noqa: E731
    step = graphed_if_cuda(eager, optimizer, torch.device(device), options.get(GRAPH) == "on")
    return model, lambda: step(x, y)


def warm_up(step, device: str) -> None:  # noqa: ANN001
    """Kernels, allocator, Adam's state; and for a graphed step its eager steps and its capture."""
    from sweep.cuda_graph import WARMUP_STEPS

    for _ in range(WARMUP_STEPS + 2):
        step()
    synchronize(device)


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def timed_ms(step, device: str) -> tuple[float, float]:  # noqa: ANN001
    """One step's (device ms, host ms): CUDA events around it on a GPU, and the host's time to queue the
    step's work (when the two are close, the step is bound by kernel launches, not by the GPU)."""
    import torch

    if device != "cuda":
        start = time.perf_counter()
        step()
        ms = 1000 * (time.perf_counter() - start)
        return ms, ms
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    host = time.perf_counter()
    step()
    host = time.perf_counter() - host
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end), 1000 * host


def kernels_per_step(step, device: str) -> int | None:  # noqa: ANN001
    """How many GPU kernels one step launches (torch's profiler): what a launch-bound step pays for."""
    if device != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            synchronize(device)
        return sum(e.count for e in prof.key_averages() if e.device_type == DeviceType.CUDA)
    except Exception as error:  # noqa: BLE001 (a diagnostic: the timings matter more)
        print(f"kernel count unavailable: {error!r}", file=sys.stderr)
        return None


def peak_mib(step, device: str) -> float | None:  # noqa: ANN001
    """Memory one step takes above what the model and optimizer hold (CUDA's allocator counts it)."""
    import torch

    if device != "cuda":
        return None
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - held) / 2**20


def time_step(name: str, options: dict, point: dict[str, int], steps: int, device: str = "cuda",
              count_kernels: bool = False) -> dict[str, Any]:
    model, step = build(name, options, point, device)
    warm_up(step, device)
    device_ms, host_ms = zip(*(timed_ms(step, device) for _ in range(steps)), strict=True)
    row = {
        "model": name,
        "options": options_label(options),
        "hidden_size": point["hidden"],
        "batch": point["batch"],
        "length": point["length"],
        "ms": statistics.median(device_ms),
        "host_ms": statistics.median(host_ms),
        "peak_mib": peak_mib(step, device),
        "kernels": kernels_per_step(step, device) if count_kernels else None,
    }
    del model, step
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()  # the next point starts from an empty cache, as its own trial would
    return row


def _share_worker(point: dict[str, int], options: dict, seconds: float, device: str, barrier, results
                  ) -> None:  # noqa: ANN001
    _, step = build("fw_lstm", options, point, device)
    warm_up(step, device)
    barrier.wait()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += 1
    synchronize(device)
    results.put(count / (time.perf_counter() - start))


def sharing(point: dict[str, int], processes: list[int], seconds: float, device: str = "cuda",
            graphed: bool = False) -> list[dict[str, Any]]:
    """FW-LSTM (fused) trials as N processes on one GPU, eager or graphed."""
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    options = {"fw_form": "fused"} | ({GRAPH: "on"} if graphed else {})
    rows: list[dict[str, Any]] = []
    for n in processes:
        barrier, results = ctx.Barrier(n), ctx.Queue()
        args = (point, options, seconds, device, barrier, results)
        workers = [ctx.Process(target=_share_worker, args=args) for _ in range(n)]
        for w in workers:
            w.start()
        rates = [results.get(timeout=seconds + 300) for _ in workers]
        for w in workers:
            w.join()
        rows.append({"processes": n, "cuda_graph": graphed, "steps_per_s_per_trial": statistics.mean(rates),
                     "steps_per_s_total": sum(rates)})
    alone = rows[0]["steps_per_s_total"]
    for row in rows:
        row["speedup_vs_one"] = row["steps_per_s_total"] / alone
    return rows


def time_grid(points: list[dict[str, int]], steps: int, budget_s: float | None, device: str = "cuda"
              ) -> tuple[list[dict[str, Any]], list[dict[str, int]]]:
    """Every form at every point, in order, until `budget_s` runs out (the first point, the base, always
    runs): (rows, points left untimed)."""
    started = time.perf_counter()
    rows = []
    for i, point in enumerate(points):
        if i and budget_s is not None and time.perf_counter() - started > budget_s:
            return rows, points[i:]
        for name, options in FORMS + GRAPHED_FORMS:
            if too_big(name, options, point):
                continue
            row = time_step(name, options, point, steps, device, count_kernels=i == 0)
            rows.append(row)
            peak = "" if row["peak_mib"] is None else f", {row['peak_mib']:.1f} MiB"
            kernels = "" if row["kernels"] is None else f", {row['kernels']} kernels"
            timing = f"{row['ms']:.2f} ms (host {row['host_ms']:.2f})"
            print(f"{point} {name} {row['options']}: {timing}{peak}{kernels}", flush=True)
    return rows, []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer points (for a short device lease)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per point")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new grid point after this many seconds (the sharing test still runs)")
    parser.add_argument("--share", type=int, nargs="+", default=[1, 2, 4], help="processes sharing the GPU")
    parser.add_argument("--share-seconds", type=float, default=20.0)
    args = parser.parse_args()
    require_cuda()
    points = grid(QUICK_SWEEPS if args.quick else SWEEPS)
    with record("gpu", vars(args), kind="gpu") as payload:
        steps, untimed = time_grid(points, args.steps, args.budget_s)
        payload["results"] = {
            "steps": steps,
            "untimed_points": untimed,
            "sharing": [
                *sharing(BASE, args.share, args.share_seconds, graphed=False),
                *sharing(BASE, args.share, args.share_seconds, graphed=True),
            ],
        }
    for row in payload["results"]["sharing"]:
        print(
            f"{row['processes']} trial(s) on one GPU{' (graphed)' if row['cuda_graph'] else ''}: "
            f"{row['steps_per_s_total']:.1f} steps/s in all ({row['speedup_vs_one']:.2f}x one alone)"
        )


if __name__ == "__main__":
    main()
