"""Keep memory freed by one train step for the next, instead of handing it back to the kernel.

A train step allocates and frees the same few tens of MiB every time (activations, saved tensors,
gradients). glibc's malloc gives large freed blocks back to the kernel (unmaps them, trims the heap), so
the next step touches fresh pages and takes a page fault for each 4 KiB: about 2,700 minor faults per
FW-LSTM step at H=100, batch 128, ~4 us each on the benchmark VM, ~11 ms of a 60 ms step
(docs/benchmarks.md). Raising malloc's mmap and trim thresholds keeps those pages mapped. It never raises
the process's peak memory, which every step reaches anyway; it only stops returning it between steps.

The settings are process-wide; `run_trial` makes them, so every trial (Tune runs a trainable in a
thread of its own) and `fwsweep train` get them. A no-op where malloc is not glibc's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from functools import cache

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value (64-bit): blocks above it are still mmap'd
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20  # a thread's arena is heaps of at most 64 MiB: keeps an emptied one mapped (measured)


@cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (idempotent); False where that cannot be done."""
    libc = _glibc()
    if libc is None:
        return False
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    return all([bool(libc.mallopt(option, value)) for option, value in settings])
