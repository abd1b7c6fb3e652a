"""The C time steps' matrix products (native_cells.py): oneDNN's where torch's own would take MKL's slower
path.

Why: `torch.mm` on float32 CPU tensors is MKL's sgemm, and MKL picks its AVX-512 kernels only on Intel
CPUs: on an AMD EPYC with AVX-512 it runs its AVX2 ones, at 96-110 GFLOP/s at a time step's shapes where
the core does 266 (measured with a loop of FMAs). oneDNN, which torch ships too and which chooses its
kernels by instruction set alone, does the same products at 146-181 GFLOP/s there
(docs/benchmarks.md, "oneDNN's matrix products"), but each call costs about 10 us more: below some 2
million multiply-adds it is the slower one (measured: even at 1.3 million, H = 50's step; H = 100's
step, 5.1 million, 103 -> 63 us). So on a CPU with AVX-512 that is not Intel's, float32 products of at
least `ONEDNN_MIN_MACS` go through oneDNN's `_linear_pointwise` (what torch.compile's CPU code calls);
everything else, and all with FWSWEEP_ONEDNN=0, through `torch.mm`. The choice is fixed per machine and
shape, not timed at start, so a trial's numbers do not depend on how loaded the node was when it started.
The two round differently in the last bits; tests/test_models.py checks the C steps against the torch-op
forms either way.

`sequence_gemm` is the other way in: the address of a GEMM that native.py's whole-sequence loops (FW-LSTM,
LN-LSTM) call from C, so a step's product costs no dispatch at all.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from sweep.models import native

log = logging.getLogger(__name__)

ONEDNN_MIN_MACS = 1 << 21


@cache
def uses_onednn() -> bool:
    """Whether float32 products on this machine go through oneDNN (see the module's docstring)."""
    if os.environ.get("FWSWEEP_ONEDNN", "1") == "0":
        return False
    vendor = native.cpu_info().get("vendor_id", "")
    if torch.backends.cpu.get_cpu_capability() != "AVX512" or vendor in ("GenuineIntel", ""):
        return False
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:  # a private op: make sure this torch has it as expected before every product relies on it
        a = torch.arange(12.0).view(3, 4)
        b = torch.arange(20.0).view(5, 4)
        ok = torch.equal(_onednn_linear(a, b), a @ b.t())
    except Exception as err:  # noqa: BLE001 - any failure of a private op means: do not use it
        log.warning("oneDNN's matrix product failed (%s); using torch.mm", err)
        return False
    return ok


def _onednn_linear(x: Tensor, weight: Tensor) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def _through_onednn(x: Tensor, macs: int) -> bool:
    return macs >= ONEDNN_MIN_MACS and x.dtype == torch.float32 and x.device.type == "cpu" and uses_onednn()


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """x weightᵀ for 2-D tensors of any strides (x [m, k], weight [n, k]): a new [m, n] tensor. (oneDNN's
    op copies a non-contiguous x first; any weight it reads in place.)"""
    (m, k), n = x.shape, weight.shape[0]
    if _through_onednn(x, m * k * n):
        return _onednn_linear(x, weight)
    return torch.mm(x, weight.t())


def weight_grad(grad_out: Tensor, inputs: Tensor) -> Tensor:
    """grad_outᵀ inputs for grad_out [N, m], inputs [N, n] (a linear map's weight gradient, summed over N
    rows): [m, n]. Through oneDNN, one operand must be copied transposed, and the smaller is: with
    inputs [N, H] and grad_out [N, 4H], H = 100, 0.84 ms instead of 1.24 (and torch.mm's 1.94)."""
    (N, m), n = grad_out.shape, inputs.shape[1]
    if not _through_onednn(grad_out, N * m * n):
        return grad_out.t() @ inputs
    if n <= m:  # (inputsᵀ grad_out)ᵀ: inputsᵀ is copied
        return _onednn_linear(inputs.t(), grad_out.t()).t()
    return _onednn_linear(grad_out.t(), inputs.t())


# at::native::cpublas::brgemm(M, N, K, ld_a, ld_b, ld_c, add_C, const float *A, const float *B, float *C,
# is_vnni): oneDNN's small-matrix kernel as torch's flash attention calls it, C = A B (+ C) row-major.
_BRGEMM_F32 = "_ZN2at6native7cpublas6brgemmEllllllbPKfS3_Pfb"
_BRGEMM_RELEASE = "_ZN2at6native7cpublas14brgemm_releaseEb"
_FORTRAN_GEMM = {torch.float32: "sgemm_", torch.float64: "dgemm_"}
GEMM_TYPE = ctypes.CFUNCTYPE(None, *[ctypes.c_long] * 6, ctypes.c_bool, *[ctypes.c_void_p] * 3, ctypes.c_bool)


@cache
def _torch_cpu() -> ctypes.CDLL | None:
    """libtorch_cpu, already loaded by `import torch`: its exported GEMMs, called from C with no dispatch."""
    try:
        return ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    except OSError:
        return None


@cache
def sequence_gemm(dtype: torch.dtype) -> int | None:
    """The address of a C function with brgemm's arguments for native.py's whole-sequence loops, or None
    (then native_cells.py runs the time loop in Python, each product through `linear`).

    float32: oneDNN's brgemm (unless FWSWEEP_ONEDNN=0): from C it costs well under a microsecond a call
    where a torch op costs ten, and it runs AVX-512 kernels on any CPU that has them (H = 100's step
    product: 44 us where `linear` takes 63 and `torch.mm` 101). Otherwise, and for float64, the BLAS's
    sgemm_/dgemm_ that torch links (MKL on x86), through native.py's row-major adapter. Both are exported
    symbols, not a documented API: each is checked once on a small product and skipped if it is missing
    or wrong."""
    library = _torch_cpu()
    if dtype not in _FORTRAN_GEMM or library is None or not native.usable_for(torch.zeros(0, dtype=dtype)):
        return None
    if dtype == torch.float32 and os.environ.get("FWSWEEP_ONEDNN", "1") != "0":
        brgemm = _exported(library, _BRGEMM_F32)
        if brgemm is not None and _gives_products(brgemm, dtype):
            return brgemm
    fortran = _exported(library, _FORTRAN_GEMM[dtype])
    if fortran is None:
        return None
    native.kernel("use_blas", dtype)(fortran)
    adapter = ctypes.cast(native.kernel("blas_rowmajor_gemm", dtype), ctypes.c_void_p).value
    return adapter if _gives_products(adapter, dtype) else None


def _exported(library: ctypes.CDLL, name: str) -> int | None:
    try:
        return ctypes.cast(getattr(library, name), ctypes.c_void_p).value
    except AttributeError:
        return None


def _gives_products(address: int, dtype: torch.dtype) -> bool:
    """Whether the function at `address` computes exact small integer products, with leading dimensions
    wider than the matrices (as the sequence loops pass them)."""
    a = torch.arange(24, dtype=dtype).view(3, 8)[:, :4]
    b = torch.arange(28, dtype=dtype).view(4, 7) - 5
    c = torch.full((3, 6), -1.0, dtype=dtype)
    try:
        GEMM_TYPE(address)(3, 5, 4, 8, 7, 6, False, a.data_ptr(), b.data_ptr(), c.data_ptr(), False)
    except Exception as err:  # noqa: BLE001 - any failure means: do not use it
        log.warning("the exported GEMM at %#x failed (%s); the time loop stays in Python", address, err)
        return False
    return torch.equal(c[:, :5], a @ b[:, :5]) and bool((c[:, 5] == -1).all())


def release_sequence_gemm(dtype: torch.dtype) -> None:
    """What torch does after its own brgemm loops (frees AMX state where it was used; else nothing)."""
    release = _brgemm_release(dtype, sequence_gemm(dtype))
    if release is not None:
        release(False)


@cache
def _brgemm_release(dtype: torch.dtype, gemm: int | None) -> Callable[[bool], None] | None:
    """brgemm_release where `gemm` (this dtype's sequence GEMM) is brgemm; found once, not per call."""
    library = _torch_cpu()
    if dtype != torch.float32 or library is None or gemm is None or gemm != _exported(library, _BRGEMM_F32):
        return None
    release = _exported(library, _BRGEMM_RELEASE)
    return None if release is None else ctypes.CFUNCTYPE(None, ctypes.c_bool)(release)
