"""Train-step time with the C kernels of a base commit against the working tree's, in one process.

    .venv/bin/python benchmarks/kernels_ab.py --base 6521f7f                 # H in {20, 50, 100}
    .venv/bin/python benchmarks/kernels_ab.py --base 6521f7f --hidden 50 --rounds 40

For each hidden size and model (FW-LSTM, LN-LSTM, FW-RNN, all fused), the kernel library a trial would
build (one model, one H) is built twice: from the base commit's `sweep/models/native.py` (its C source
and its compiler flags) and from the working tree's. One model and one batch then train in rounds of 10
steps with each library in turn, back to back (one torch thread, batch 128, ART K=8, the trials' malloc
setting); the ratio is the median over rounds of (working tree / base), CPU time of the thread. All but
the kernels is the working tree's code, so the ratio is the kernels' change alone; both sides share the
host's slow and fast spells. The base must call its kernels as the working tree does (same C signatures).

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
from models import CLASSES, VOCAB, art_shaped_batch, train_step_fn  # noqa: E402
from record import record  # noqa: E402

from sweep.allocator import keep_freed_memory  # noqa: E402
from sweep.models import build_model, native, params_class  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = [("fw_lstm", "fwlstm"), ("ln_lstm", "lnlstm"), ("fw_rnn", "fwrnn")]
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


def build(source: str, flags: list[str], folder: Path, label: str, model: str) -> ctypes.CDLL:
    c_file, library = folder / f"{label}.c", folder / f"{label}.so"
    c_file.write_text(source)
    compiler = native._compiler()
    subprocess.run([*compiler, *flags, str(c_file), "-o", str(library)], check=True, capture_output=True)
    return native._loaded(ctypes.CDLL(str(library)), "f32", model=model)


def with_library(step: Callable[[], None], library: ctypes.CDLL) -> Callable[[], None]:
    """The step with the hidden size's kernels taken from `library` (the library for any size stays)."""
    def variant_step() -> None:
        original = native._library
        native._library = lambda hidden=None, sfx=None, model=None: (
            library if hidden is not None else original(None, sfx))
        try:
            step()
        finally:
            native._library = original

    return variant_step


def thread_seconds(step: Callable[[], None]) -> float:
    start = time.thread_time()
    for _ in range(STEPS_PER_ROUND):
        step()
    return (time.thread_time() - start) / STEPS_PER_ROUND


def compare(base: ModuleType, hidden: int, name: str, model: str, rounds: int, folder: Path) -> dict:
    base_lib = build(base.source_for("f32"), base.build_flags(hidden, model), folder,
                     f"base-{model}-{hidden}", model)
    new_lib = build(native.source_for("f32"), native.build_flags(hidden, model), folder,
                    f"new-{model}-{hidden}", model)
    x, y = art_shaped_batch(128, 8)
    torch.manual_seed(0)
    step = train_step_fn(build_model(params_class(name)(hidden_size=hidden), VOCAB, CLASSES), x, y)
    old, new = with_library(step, base_lib), with_library(step, new_lib)
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
        rows = [compare(base, hidden, name, model, args.rounds, Path(tmp))
                for hidden in args.hidden for name, model in MODELS]
        payload["results"] = {"base_commit": base_commit, "rows": rows}


if __name__ == "__main__":
    main()
