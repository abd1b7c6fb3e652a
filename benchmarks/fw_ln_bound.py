"""How close the FW-LSTM's train step can come to the LN-LSTM's on this machine: a floor from measurements.

    .venv/bin/python benchmarks/fw_ln_bound.py               # H in {50, 100}, batch 128, ART K=8
    .venv/bin/python benchmarks/fw_ln_bound.py --hidden 100 --rounds 20

Why: issue 14 asks for FW-LSTM / LN-LSTM <= 1.3x. The FW-LSTM (fused, S = 1) does the LN-LSTM's work (the
same matmuls, as many layer-norm sums) plus its memory's: at every read, the dot products of the query with
the stored vectors and their weighted sum, forward and backward ("the products"), and the traffic of the
memory's buffer (stored vectors, queries, read gradients). The
products are matrix-vector work with no reuse across batch rows (each row has its own memory), so they
cannot take less time than their stored vectors take to come in from L2, whatever the kernel. This script
splits the step into those parts by timing variants of the C kernels (builds of native.SOURCE with lines
replaced; their numbers are wrong, only their time is kept), all round-robin in one process
(`models.time_round_robin`, CPU time per step, median over rounds):

- "fw_lstm": as shipped; "ln_lstm": the baseline.
- "no products": the dot-product and weighted-sum calls of fwlstm_forward and fwlstm_backward replaced by
  zero fills of what they write.
- "memory in L2": every block of rows uses one block-sized buffer for its memory, so the memory never
  leaves L2. (Before eaaf7d0 the shipped buffer held all rows, 7.8 MB at H = 100, written in the forward
  and read back in the backward from farther away; since then the shipped loops keep one block's rows
  too when S = 1, and this variant's difference from "fw_lstm" is about zero.)
- "memory in L2, no products": both: what is left is the LN-LSTM's work and the FW-LSTM's own cell work
  ("the rest").

From these: the products' time (memory in L2, with and without them), the memory traffic's (as shipped vs
memory in L2), and a floor for the step: the rest plus the products at the speed of L2, max(bytes the
products bring in from L2 / one core's L2 read bandwidth, their FLOPs / the best matmul rate measured).
`product_rows` and `product_macs` count them from the C kernels' loops; the bandwidth is torch's sum over a
repeated view of a block-sized buffer (it reads the same bytes pass after pass; the best pass counts). Run
it on an otherwise idle machine. Writes benchmarks/results/fw_ln_bound.json; `benchmarks/render.py`
renders it.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import CLASSES, VOCAB, art_shaped_batch, matmul_rates, time_round_robin, train_step_fn  # noqa: E402
from record import record  # noqa: E402

from sweep.allocator import keep_freed_memory  # noqa: E402
from sweep.models import build_model, native, native_cells, params_class  # noqa: E402

# The memory's products in the FW-LSTM's C cells (float32), and zero fills of what they write.
_FORWARD_PRODUCTS = """            dots_f32(reads, D, q, Vb, v_sk, wt, sg);
            if (s < S - 1)
                combine_f32(reads, D, sg, 1, Vb, v_sk, 0, a);
            else  /* the last read adds into the gates: zh[m0:] += a_{S-1} */
                combine_f32(reads, D, sg, 1, Vb, v_sk, zh + m0, zh + m0);"""
_BACKWARD_PRODUCTS = """            dots_f32(reads, D, g_r, Vb, v_sk, wt, sg);
            if (s == 0 && P) {  /* S = 1, v_t's gradient with its partial sums (PENDING_DV) */
                const long a_off = (T - 1 - t) % (PENDING_DV + 1);
                float *Pb = P + b * p_sb;
                if (a_off == 0) {
                    float *outs[4] = {dq, Pb, Pb + p_sk, Pb + 2 * p_sk}, *none[4] = {0, 0, 0, 0};
                    combine_outs_f32(1 + (t < PENDING_DV ? (int) t : PENDING_DV), rows - lo, D,
                                      SGb + lo * sg_sj + t, sg_sj, GQb + lo * gq_sj, gq_sj, none, outs);
                } else
                    combine_f32(2 * a_off, D, SGb + lo * sg_sj + t, sg_sj, GQb + lo * gq_sj, gq_sj,
                                 Pb + (a_off - 1) * p_sk, dq);
            } else if (s == 0)  /* q_0 is v_t, so add v_t's gradient as a stored vector */
                combine_f32(rows - lo, D, SGb + lo * sg_sj + t, sg_sj, GQb + lo * gq_sj, gq_sj, 0, dq);
            else
                for (long k = 0; k < D; k++) dq[k] = 0;
            combine_f32(reads, D, sg, 1, Vb, v_sk, dq, dq);"""
_ZERO_SG = "for (long k = 0; k < reads; k++) sg[k] = 0;"
WITHOUT_PRODUCTS = [
    (_FORWARD_PRODUCTS, "for (long k = 0; k < D; k++) a[k] = 0; " + _ZERO_SG),
    (_BACKWARD_PRODUCTS, "for (long k = 0; k < D; k++) dq[k] = 0; " + _ZERO_SG),
]


# One block-sized buffer for every block's memory (GQ, with V its odd rows, as for S = 1): the pointers the
# FW-LSTM's cells get are replaced at their top. BLOCK_FLOATS bounds rows per block x GQ's batch stride.
BLOCK_FLOATS = 16 * 38 * 400
_FORWARD_SCRATCH = """    const float *wt = w + T - reads;
    float zb[G] LINE_ALIGNED, zh[G] LINE_ALIGNED, a[D] LINE_ALIGNED;"""
_BACKWARD_SCRATCH = """    const float *wt = w + T - reads;
    float dg[G] LINE_ALIGNED, dcn[H] LINE_ALIGNED, dq[D] LINE_ALIGNED;"""
_ONE_BLOCK = "\n    GQ = BLOCK_f32; V = GQ + gq_sj;"
MEMORY_IN_L2 = [
    ("#include <string.h>\n#define LN_EPS 1e-5\n", "#include <string.h>\n#define LN_EPS 1e-5\n"
     f"static __thread float BLOCK_f32[{BLOCK_FLOATS}] __attribute__((aligned(64)));\n"),
    (_FORWARD_SCRATCH, _FORWARD_SCRATCH + _ONE_BLOCK),
    (_BACKWARD_SCRATCH, _BACKWARD_SCRATCH + _ONE_BLOCK),
]


def product_rows(T: int, pending: int = 3) -> int:
    """Stored-vector rows (D numbers each) one batch row's products bring in from beyond L1 per train step,
    S = 1. Forward, read t (0-based) runs its dots over v_0 .. v_t (t + 1 rows; the weighted sum then finds
    them in L1). Backward, step t: the dots of the read's gradient over the same t + 1 rows (the weighted sum
    again from L1), and v_t's gradient from the later reads' query and gradient rows beyond this read's own
    two (just written, in L1): every `pending` + 1 steps (native.py's PENDING_DV) all 2 (T - 1 - t) of them,
    in one pass that sums the next `pending` vectors' shares too; between, the 2 (a - 1) rows since that
    pass, a steps before."""
    forward = sum(t + 1 for t in range(T))
    since = [(T - 1 - t) % (pending + 1) for t in range(T)]
    backward = sum((t + 1) + (2 * (T - 1 - t) if a == 0 else 2 * (a - 1)) for t, a in enumerate(since))
    return forward + backward


def product_macs(T: int, D: int) -> int:
    """Multiply-adds of one batch row's products per train step, S = 1: forward 2 D (t + 1) at read t (dots
    and sum); backward 2 D (t + 1) (dots and sum) + 2 D (T - t) (v_t's gradient over every read from t on)."""
    return D * sum(2 * (t + 1) + 2 * (t + 1) + 2 * (T - t) for t in range(T))


def read_bandwidth(nbytes: int, seconds: float = 0.2) -> float:
    """GB/s one core reads a buffer of `nbytes` again and again (the best of repeated passes: the floor's
    bandwidth should be the fastest the core managed, not a typical one)."""
    n = nbytes // 4
    x = torch.rand(n)
    repeats = max(2, (64 << 20) // nbytes)
    view = x.expand(repeats, n)  # stride 0 over the repeats: every pass reads the same bytes
    view.sum()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        view.sum()
        best = min(best, time.perf_counter() - t0)
    return repeats * n * 4 / best / 1e9


def build_variant(replacements: list[tuple[str, str]], hidden: int | None = None) -> ctypes.CDLL:
    """native.SOURCE with each `old` replaced by `new` (each must occur exactly once), compiled (for one
    hidden size, as the shipped steps use theirs: native.kernel's `hidden`) and loaded."""
    source = native.SOURCE
    for old, new in replacements:
        if source.count(old) != 1:
            raise SystemExit("fw_ln_bound.py: native.SOURCE changed; update the variants' lines to match it")
        source = source.replace(old, new)
    return compile_library(source, native.build_flags(hidden))


def compile_library(source: str, flags: list[str], *suffixes: str) -> ctypes.CDLL:
    """C `source` compiled with `flags` by the compiler the kernels use, loaded with the argument types of
    the types it holds (`suffixes`; default both)."""
    with tempfile.TemporaryDirectory(prefix="fwsweep-bound-") as folder:  # loaded, the file may go
        c_file, library = Path(folder) / "variant.c", Path(folder) / "variant.so"
        c_file.write_text(source)
        subprocess.run([*native._compiler(), *flags, str(c_file), "-o", str(library)], check=True)
        return native._loaded(ctypes.CDLL(str(library)), *suffixes)


def with_library(step: Callable[[], None], library: ctypes.CDLL) -> Callable[[], None]:
    """The step with native.kernel taken from `library` (decided per call, as the forms look kernels up)."""
    def variant_step() -> None:
        original = native._library
        native._library = lambda hidden=None, sfx=None, model=None: library
        try:
            step()
        finally:
            native._library = original

    return variant_step


def block_layout(hidden: int, batch: int, length: int) -> tuple[int, int]:
    """The rows per block the C loops choose for this FW-LSTM (native_cells._rows_per_block), and the
    floats a row's memory takes in GQ (its batch stride, with the rows' padding)."""
    seen: list[tuple[int, int]] = []
    original = native_cells._rows_per_block

    def spy(mem: Any, B: int) -> int:
        seen.append((original(mem, B), mem.GQ.stride(0)))
        return seen[-1][0]

    x, y = art_shaped_batch(batch, (length - 3) // 2)
    model = build_model(params_class("fw_lstm")(hidden_size=hidden), VOCAB, CLASSES)
    native_cells._rows_per_block = spy
    try:
        train_step_fn(model, x, y)()
    finally:
        native_cells._rows_per_block = original
    return seen[0]


def measure(hidden: int, batch: int, pairs: int, rounds: int,
            variants: dict[str, ctypes.CDLL]) -> dict[str, Any]:
    x, y = art_shaped_batch(batch, pairs)
    T = x.shape[1]
    D = 4 * hidden
    rb, row_floats = block_layout(hidden, batch, T)
    if rb * row_floats > BLOCK_FLOATS:
        raise SystemExit(f"fw_ln_bound.py: H = {hidden} needs BLOCK_FLOATS >= {rb * row_floats}")

    def step(name: str) -> Callable[[], None]:
        torch.manual_seed(0)
        return train_step_fn(build_model(params_class(name)(hidden_size=hidden), VOCAB, CLASSES), x, y)

    fw = step("fw_lstm")
    steps = {"ln_lstm": step("ln_lstm"), "fw_lstm": fw} | {
        f"fw_lstm, {label}": with_library(fw, library) for label, library in variants.items()}
    for s in steps.values():  # warm-up: buffers, kernels, Adam state
        s()
    timed = time_round_robin(list(steps.values()), rounds)
    cpu = {name: rounds_s for name, (rounds_s, _) in zip(steps, timed, strict=True)}
    ms = {name: statistics.median(s) * 1e3 for name, s in cpu.items()}
    over_ln = {name: statistics.median(a / b for a, b in zip(s, cpu["ln_lstm"], strict=True))
               for name, s in cpu.items()}
    bandwidth = read_bandwidth(rb * 2 * T * D * 4)  # a block's memory: stored vectors and read gradients
    rates = matmul_rates(batch, T, hidden)
    best_rate = max(r for library in rates.values() for r in library.values())
    nbytes = batch * product_rows(T) * D * 4
    flops = 2 * batch * product_macs(T, D)
    products_floor = max(nbytes / bandwidth / 1e6, flops / best_rate / 1e6)
    rest = ms["fw_lstm, memory in L2, no products"]
    parts = {
        "products (memory in L2)": ms["fw_lstm, memory in L2"] - rest,
        "products at the L2 floor": products_floor,
        "memory traffic beyond L2": ms["fw_lstm"] - ms["fw_lstm, memory in L2"],
        "rest over the LN-LSTM": rest - ms["ln_lstm"],
    }
    return {"hidden": hidden, "batch": batch, "length": T, "rows_per_block": rb, "step_ms": ms,
            "over_ln_lstm": over_ln, "parts_ms": parts, "product_bytes": nbytes, "product_flops": flops,
            "l2_read_gb_s": bandwidth, "best_matmul_gflop_s": best_rate,
            "floor_ms": rest + products_floor, "floor_over_ln_lstm": (rest + products_floor) / ms["ln_lstm"],
            "target_ms": 1.3 * ms["ln_lstm"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[50, 100])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=8, help="ART's K (T = 2K + 3)")
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(1)
    if not native.usable_for(torch.zeros(0)):
        raise SystemExit("fw_ln_bound.py needs the C kernels (a C compiler); see docs/models.md")
    variants = {"no products": WITHOUT_PRODUCTS, "memory in L2": MEMORY_IN_L2,
                "memory in L2, no products": MEMORY_IN_L2 + WITHOUT_PRODUCTS}
    with record("fw_ln_bound", vars(args)) as payload:
        payload["results"] = [measure(h, args.batch, args.pairs, args.rounds,
                                      {label: build_variant(lines, h) for label, lines in variants.items()})
                              for h in args.hidden]
        for r in payload["results"]:
            s, p = r["step_ms"], r["parts_ms"]
            print(f"H={r['hidden']}: LN {s['ln_lstm']:.2f} ms, FW {s['fw_lstm']:.2f} ms "
                  f"({r['over_ln_lstm']['fw_lstm']:.2f}x); "
                  + ", ".join(f"{name} {value:.2f} ms" for name, value in p.items())
                  + f"; floor {r['floor_ms']:.2f} ms ({r['floor_over_ln_lstm']:.2f}x)")


if __name__ == "__main__":
    main()
