"""Train-step time with the C kernels of a base commit against the working tree's, in one process.

    .venv/bin/python benchmarks/kernels_ab.py --base 6521f7f                 # H in {20, 50, 100}
    .venv/bin/python benchmarks/kernels_ab.py --base 6521f7f --hidden 50 --rounds 40

For each hidden size, the kernel library for that size is built twice, with every model's kernels (as
fw_ln_bound.py builds its variants; a trial's library holds one model's, the same code): from the base
commit's `sweep/models/native.py` (its C source and its compiler flags) and from the working tree's. Each
model (FW-LSTM, LN-LSTM, FW-RNN, all fused) then trains one batch in rounds of 10 steps with each library
in turn, back to back (one torch thread, batch 128, ART K=8, the trials' malloc setting); the ratio is the
median over rounds of (working tree / base), CPU time of the thread. All but the kernels is the working
tree's code, so the ratio is the kernels' change alone; both sides share the host's slow and fast spells.
The base must call its kernels as the working tree does (same C signatures).

Writes benchmarks/results/kernels_ab.json (--name for another); `benchmarks/render.py` renders it into
docs/benchmarks.md. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fw_ln_bound import compile_library, with_library  # noqa: E402
from models import CLASSES, VOCAB, art_shaped_batch, train_step_fn  # noqa: E402
from record import record  # noqa: E402

from sweep.allocator import keep_freed_memory  # noqa: E402
from sweep.models import build_model, native, params_class  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["fw_lstm", "ln_lstm", "fw_rnn"]
STEPS_PER_ROUND = 10


def base_native(commit: str, folder: Path) -> ModuleType:
    """native.py as it was at `commit`, imported under another name (its source and flags, not its cache)."""
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:sweep/models/native.py"],
                          capture_output=True, text=True, check=True).stdout
    path = folder / "native_base.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("native_base", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if module.SIGNATURES != native.SIGNATURES:
        raise SystemExit(f"kernels_ab.py: the kernels of {commit} take other arguments than the working "
                         "tree's; pick a later base")
    return module


def thread_seconds(step: Callable[[], None]) -> float:
    start = time.thread_time()
    for _ in range(STEPS_PER_ROUND):
        step()
    return (time.thread_time() - start) / STEPS_PER_ROUND


def compare(libraries: tuple[ctypes.CDLL, ctypes.CDLL], hidden: int, name: str, rounds: int) -> dict:
    x, y = art_shaped_batch(128, 8)
    torch.manual_seed(0)
    step = train_step_fn(build_model(params_class(name)(hidden_size=hidden), VOCAB, CLASSES), x, y)
    old, new = (with_library(step, library) for library in libraries)
    old(), new()  # warm-up: Adam's state, the allocator
    base_s, new_s = [], []
    for _ in range(rounds):
        base_s.append(thread_seconds(old))
        new_s.append(thread_seconds(new))
    ratios = [n / b for n, b in zip(new_s, base_s, strict=True)]
    row = {"hidden_size": hidden, "model": name, "base_ms": statistics.median(base_s) * 1e3,
           "new_ms": statistics.median(new_s) * 1e3, "ratio": statistics.median(ratios),
           "ratio_min": min(ratios), "ratio_max": max(ratios), "rounds": rounds}
    print(f"H={hidden} {name}: new/base {row['ratio']:.3f} ({row['ratio_min']:.3f}-{row['ratio_max']:.3f}); "
          f"base {row['base_ms']:.2f} ms, new {row['new_ms']:.2f} ms", flush=True)
    return row


def libraries(base: ModuleType, hidden: int) -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """The base's and the working tree's library for this hidden size (every model's kernels)."""
    return (compile_library(base.source_for("f32"), base.build_flags(hidden), "f32"),
            compile_library(native.source_for("f32"), native.build_flags(hidden), "f32"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the commit whose kernels are the baseline")
    parser.add_argument("--hidden", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--name", default="kernels_ab")
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()
    base_commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", args.base], capture_output=True,
                                 text=True, check=True).stdout.strip()
    with (record(args.name, vars(args), kind="kernels_ab") as payload,
          tempfile.TemporaryDirectory(prefix="kernels-ab-") as tmp):
        base = base_native(base_commit, Path(tmp))
        rows = []
        for hidden in args.hidden:
            built = libraries(base, hidden)
            rows += [compare(built, hidden, name, args.rounds) for name in MODELS]
        payload["results"] = {"base_commit": base_commit, "rows": rows}


if __name__ == "__main__":
    main()
