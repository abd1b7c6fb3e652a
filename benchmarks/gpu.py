"""GPU benchmark, for when a CUDA device is lent: step time and peak memory vs H, B and T for every form,
and the throughput of 1, 2 or 4 trials sharing one GPU (as `resources: {gpu: 0.5}` or `{gpu: 0.25}` do).

    .venv/bin/python benchmarks/gpu.py                    # the whole grid, then the sharing test
    .venv/bin/python benchmarks/gpu.py --quick            # a few points only (a short device lease)

Writes benchmarks/results/gpu.json (see record.py); `benchmarks/render.py` makes its tables in
docs/benchmarks.md. Without CUDA it stops at once with exit code 2 and says so.

Step: zero_grad + forward + cross-entropy + backward + Adam step on ART-shaped input (benchmarks/models.py),
timed with CUDA events after a warm-up, median of `--steps`; peak memory is torch.cuda.max_memory_allocated
over one step above the memory held before it. Sharing: N processes (spawned, each its own CUDA context,
as N Tune trials on one GPU would be) train FW-LSTM (fused) for `--share-seconds` after a common start;
steps per second per process, in all, and against one process alone.
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
from models import CONFIGS, MATRIX_CONFIGS, art_shaped_batch, options_label, train_step_fn  # noqa: E402
from record import record  # noqa: E402

BASE = {"hidden": 100, "batch": 128, "length": 19}
SWEEPS = {"hidden": [20, 50, 100, 200, 400], "batch": [32, 128, 512, 2048], "length": [11, 19, 35, 67]}
QUICK_SWEEPS = {"hidden": [50, 100], "batch": [128, 1024], "length": [19, 35]}
FORMS = CONFIGS + MATRIX_CONFIGS  # every model and form of benchmarks/models.py
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


def build(name: str, options: dict, point: dict[str, int]):  # noqa: ANN201
    import torch

    from sweep.models import build_model, params_class

    torch.manual_seed(0)
    model = build_model(params_class(name)(hidden_size=point["hidden"], **options), 37, 10).cuda()
    x, y = art_shaped_batch(point["batch"], (point["length"] - 3) // 2)
    return model, train_step_fn(model, x.cuda(), y.cuda())


def time_step(name: str, options: dict, point: dict[str, int], steps: int) -> dict[str, Any]:
    import torch

    _, step = build(name, options, point)
    step()  # warm-up: kernels, allocator, Adam state
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - held
    return {
        "model": name,
        "options": options_label(options),
        "hidden_size": point["hidden"],
        "batch": point["batch"],
        "length": point["length"],
        "ms": statistics.median(times),
        "peak_mib": peak / 2**20,
    }


def _share_worker(point: dict[str, int], seconds: float, barrier, results) -> None:  # noqa: ANN001
    import torch

    _, step = build("fw_lstm", {"fw_form": "fused"}, point)
    step()
    torch.cuda.synchronize()
    barrier.wait()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += 1
    torch.cuda.synchronize()
    results.put(count / (time.perf_counter() - start))


def sharing(point: dict[str, int], processes: list[int], seconds: float) -> list[dict[str, float]]:
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    rows = []
    for n in processes:
        barrier, results = ctx.Barrier(n), ctx.Queue()
        workers = [
            ctx.Process(target=_share_worker, args=(point, seconds, barrier, results)) for _ in range(n)
        ]
        for w in workers:
            w.start()
        rates = [results.get(timeout=seconds + 300) for _ in workers]
        for w in workers:
            w.join()
        rows.append(
            {"processes": n, "steps_per_s_per_trial": statistics.mean(rates), "steps_per_s_total": sum(rates)}
        )
    alone = rows[0]["steps_per_s_total"]
    for row in rows:
        row["speedup_vs_one"] = row["steps_per_s_total"] / alone
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer points (for a short device lease)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per point")
    parser.add_argument("--share", type=int, nargs="+", default=[1, 2, 4], help="processes sharing the GPU")
    parser.add_argument("--share-seconds", type=float, default=20.0)
    args = parser.parse_args()
    require_cuda()
    points = grid(QUICK_SWEEPS if args.quick else SWEEPS)
    with record("gpu", vars(args), kind="gpu") as payload:
        steps = []
        for point in points:
            for name, options in FORMS:
                if too_big(name, options, point):
                    continue
                row = time_step(name, options, point, args.steps)
                steps.append(row)
                print(
                    f"{point} {name} {row['options']}: {row['ms']:.2f} ms, {row['peak_mib']:.1f} MiB",
                    flush=True,
                )
        payload["results"] = {"steps": steps, "sharing": sharing(BASE, args.share, args.share_seconds)}
    for row in payload["results"]["sharing"]:
        print(
            f"{row['processes']} trial(s) on one GPU: {row['steps_per_s_total']:.1f} steps/s in all "
            f"({row['speedup_vs_one']:.2f}x one alone)"
        )


if __name__ == "__main__":
    main()
