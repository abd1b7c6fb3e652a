"""Train-step throughput and peak memory of every model and both fast-weight forms, in one process.

    .venv/bin/python benchmarks/models.py                    # H in {20, 50, 100}, batch 128, ART K=8
    .venv/bin/python benchmarks/models.py --hidden 100 --steps 3 --json out.json

A train step is zero_grad + forward + cross-entropy + backward + Adam step on one batch of ART-shaped
input (K=8 pairs: T=19 tokens, vocabulary 37, 10 classes). Configurations of one hidden size are timed
round-robin (one step of each, `--steps` rounds) so that load from other processes spreads evenly
over them.

Time: with one torch thread (the default here) the whole step, backward included, runs on the calling
thread, so its CPU time (time.thread_time) is the step's own cost even when other processes compete for
the cores; wall-clock time is reported beside it. Speed ratios and sequences per second use the median
CPU time (sequences per CPU-second).

Peak memory, two honest measures of one train step:
- tensor peak: the highest total size of live torch tensors allocated during the step, above the level at
  its start (torch.profiler with profile_memory=True; allocations and frees summed in op order, so it is
  exact up to op granularity). Parameters, Adam state and the input batch exist before the step and are
  not counted; activations saved for backward are.
- RSS peak: growth of the process's resident memory high-water mark (VmHWM) over the step, after
  malloc_trim and a reset of VmHWM through /proc/self/clear_refs (Linux only; includes allocator
  overhead and anything else the process touches).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from sweep.models import build_model, count_parameters, params_class

VOCAB, CLASSES = 37, 10

CONFIGS: list[tuple[str, dict]] = [
    ("lstm", {}),
    ("ln_lstm", {}),
    ("fw_rnn", {"fw_form": "matrix"}),
    ("fw_rnn", {"fw_form": "attention"}),
    ("fw_lstm", {"fw_form": "matrix"}),
    ("fw_lstm", {"fw_form": "attention"}),
    ("fw_lstm", {"memory": "candidate", "fw_form": "matrix"}),
    ("fw_lstm", {"memory": "candidate", "fw_form": "attention"}),
]


@dataclass
class Result:
    model: str
    options: str
    hidden_size: int
    num_params: int
    cpu_ms: float  # median CPU time of the step
    wall_ms: float  # median wall-clock time of the step
    sequences_per_s: float  # batch / cpu time
    tensor_peak_mb: float
    rss_peak_mb: float | None


def art_shaped_batch(batch: int, pairs: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids with the ART layout (letters, digits, '?', query); content does not affect speed."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(0, 26, (batch, pairs), generator=g)
    values = torch.randint(0, 10, (batch, pairs), generator=g)
    body = torch.stack([keys, values + 26], dim=2).reshape(batch, 2 * pairs)
    x = torch.cat([body, torch.full((batch, 2), 36), keys[:, :1]], dim=1)
    return x, values[:, 0]


def train_step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def tensor_peak_bytes(step: Callable[[], None]) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def rss_peak_bytes(step: Callable[[], None]) -> int | None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        start = _proc_status_bytes("VmRSS:")
        step()
        return _proc_status_bytes("VmHWM:") - start
    except OSError:
        return None


def options_label(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "-"


def bench_hidden_size(hidden: int, batch: int, pairs: int, steps: int) -> list[Result]:
    x, y = art_shaped_batch(batch, pairs)
    built = []
    for name, options in CONFIGS:
        torch.manual_seed(0)
        model = build_model(params_class(name)(hidden_size=hidden, **options), VOCAB, CLASSES)
        step = train_step_fn(model, x, y)
        step()  # warm-up: allocator, Adam state
        built.append((name, options, model, step))
    cpu: list[list[float]] = [[] for _ in built]
    wall: list[list[float]] = [[] for _ in built]
    for _ in range(steps):
        for i, (*_, step) in enumerate(built):
            start_cpu, start_wall = time.thread_time(), time.perf_counter()
            step()
            cpu[i].append(time.thread_time() - start_cpu)
            wall[i].append(time.perf_counter() - start_wall)
    results = []
    for (name, options, model, step), cpu_s, wall_s in zip(built, cpu, wall, strict=True):
        rss = rss_peak_bytes(step)
        cpu_median = statistics.median(cpu_s)
        results.append(
            Result(
                model=name,
                options=options_label(options),
                hidden_size=hidden,
                num_params=count_parameters(model),
                cpu_ms=1e3 * cpu_median,
                wall_ms=1e3 * statistics.median(wall_s),
                sequences_per_s=batch / cpu_median,
                tensor_peak_mb=tensor_peak_bytes(step) / 2**20,
                rss_peak_mb=None if rss is None else rss / 2**20,
            )
        )
    return results


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model_lines = [line for line in lscpu.splitlines() if line.startswith("Model name")]
        cpu = model_lines[0].split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError, IndexError):
        cpu = platform.processor() or "unknown CPU"
    threads = torch.get_num_threads()
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {threads} torch thread(s)"


def find(results: list[Result], model: str, options: str) -> Result:
    return next(r for r in results if r.model == model and r.options == options)


def markdown(results: list[Result]) -> str:
    lines = [
        "| H | model | options | params | CPU ms | wall ms | seq/s | vs LN-LSTM | tensor MiB | RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ln = next(x for x in results if x.model == "ln_lstm" and x.hidden_size == r.hidden_size)
        rss = "n/a" if r.rss_peak_mb is None else f"{r.rss_peak_mb:.1f}"
        lines.append(
            f"| {r.hidden_size} | {r.model} | {r.options} | {r.num_params} | {r.cpu_ms:.1f} | "
            f"{r.wall_ms:.1f} | {r.sequences_per_s:.0f} | {r.cpu_ms / ln.cpu_ms:.2f} | "
            f"{r.tensor_peak_mb:.1f} | {rss} |"
        )
    lines += ["", "| H | model | attention vs matrix: speed-up | tensor peak ratio (attention / matrix) |"]
    lines.append("|---|---|---|---|")
    for hidden in sorted({r.hidden_size for r in results}):
        at_h = [r for r in results if r.hidden_size == hidden]
        for model, prefix in [("fw_rnn", ""), ("fw_lstm", ""), ("fw_lstm", "memory=candidate, ")]:
            mat = find(at_h, model, f"{prefix}fw_form=matrix")
            att = find(at_h, model, f"{prefix}fw_form=attention")
            label = model + (" (candidate)" if prefix else "")
            lines.append(
                f"| {hidden} | {label} | {mat.cpu_ms / att.cpu_ms:.1f}x | "
                f"{att.tensor_peak_mb / mat.tensor_peak_mb:.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=8, help="ART K; T = 2K + 3")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds per hidden size")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 for fairness)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    results = [r for h in args.hidden for r in bench_hidden_size(h, args.batch, args.pairs, args.steps)]
    print(f"machine: {machine()}")
    print(f"1-min load average: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other processes)")
    print(f"batch {args.batch}, ART K={args.pairs} (T={2 * args.pairs + 3}), median of {args.steps} steps;")
    print("seq/s and ratios from the CPU time of the step (time.thread_time, one torch thread)\n")
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "args": vars(args), "results": [asdict(r) for r in results]}, f)


if __name__ == "__main__":
    main()
