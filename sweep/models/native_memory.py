"""The fast-weight memory's batched matrix-vector products as one C loop per call.

Each read of the memory is, per batch element, a handful of dot products and weighted sums of length D
over at most T stored vectors. `torch.bmm` runs those as one small matrix product per batch element and
pays a fixed cost for each (about 1 us: ~130 us per read at batch 128 whatever T and D), which made the
reads most of what the FW-LSTM's step costs beyond the LN-LSTM's. Here one C function does a read for
the whole batch: per batch element, the dots and then the weighted sum while the stored vectors are still
in cache, written straight into the caller's buffers (no copies).

The C source is compiled on first use with the system C compiler (`cc`, about a second) and cached per
source, compiler flags and CPU model under $FWSWEEP_KERNEL_CACHE (default ~/.cache/fwsweep/kernels), so
a cluster node compiles it once, for its own CPU. Without a compiler, on CUDA, for other dtypes, or with
FWSWEEP_NATIVE=0, `_DecayedMemory` uses `torch.bmm` instead: the same equations, checked against each
other and against the matrix form in tests/test_models.py.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# One function body per element type; strides are in elements. `dots_combine` does, for every batch
# element b:  sg[k] = w[k] (x·v_k) for k < n, then out = Σ_k sg[k] v_k  (and copies x to `keep` if given).
# `column_combine` does out = init + Σ_j sg[j] g_j over rows j of a second matrix (a stored vector's
# gradient added to another gradient of the same vector; init = 0 when NULL).
SOURCE = r"""
/* Rows are taken four at a time: four independent sums per pass hide the FMA latency, and the output row
   is loaded and stored once per four input rows. */
#define DEFINE(T, SUFFIX)                                                                               \
static void dots_##SUFFIX(long n, long D, const T *x, const T *V, long v_sk, const T *w, T *sg) {      \
    long k = 0;                                                                                         \
    for (; k + 4 <= n; k += 4) {                                                                        \
        const T *v0 = V + k * v_sk, *v1 = v0 + v_sk, *v2 = v1 + v_sk, *v3 = v2 + v_sk;                  \
        T s0 = 0, s1 = 0, s2 = 0, s3 = 0;                                                               \
        _Pragma("omp simd reduction(+:s0,s1,s2,s3)")                                                    \
        for (long d = 0; d < D; d++) {                                                                  \
            s0 += x[d] * v0[d]; s1 += x[d] * v1[d]; s2 += x[d] * v2[d]; s3 += x[d] * v3[d];             \
        }                                                                                               \
        sg[k] = w[k] * s0; sg[k + 1] = w[k + 1] * s1; sg[k + 2] = w[k + 2] * s2; sg[k + 3] = w[k + 3] * s3; \
    }                                                                                                   \
    for (; k < n; k++) {                                                                                \
        const T *v = V + k * v_sk;                                                                      \
        T s = 0;                                                                                        \
        _Pragma("omp simd reduction(+:s)")                                                              \
        for (long d = 0; d < D; d++) s += x[d] * v[d];                                                  \
        sg[k] = w[k] * s;                                                                               \
    }                                                                                                   \
}                                                                                                       \
/* out = init + Σ_k c[k * c_s] V[k] (init = 0 when NULL) */                                            \
static void combine_##SUFFIX(long n, long D, const T *c, long c_s, const T *V, long v_sk, const T *init, \
                             T *out) {                                                                  \
    for (long d = 0; d < D; d++) out[d] = init ? init[d] : 0;                                           \
    long k = 0;                                                                                         \
    for (; k + 4 <= n; k += 4) {                                                                        \
        const T *v0 = V + k * v_sk, *v1 = v0 + v_sk, *v2 = v1 + v_sk, *v3 = v2 + v_sk;                  \
        const T c0 = c[k * c_s], c1 = c[(k + 1) * c_s], c2 = c[(k + 2) * c_s], c3 = c[(k + 3) * c_s];   \
        _Pragma("omp simd")                                                                             \
        for (long d = 0; d < D; d++) out[d] += c0 * v0[d] + c1 * v1[d] + c2 * v2[d] + c3 * v3[d];       \
    }                                                                                                   \
    for (; k < n; k++) {                                                                                \
        const T *v = V + k * v_sk;                                                                      \
        const T ck = c[k * c_s];                                                                        \
        _Pragma("omp simd")                                                                             \
        for (long d = 0; d < D; d++) out[d] += ck * v[d];                                               \
    }                                                                                                   \
}                                                                                                       \
void dots_combine_##SUFFIX(long B, long n, long D, const T *x, long x_sb, T *keep, long keep_sb,       \
                           const T *V, long v_sb, long v_sk, const T *w, T *sg, long sg_sb,             \
                           T *out, long out_sb) {                                                       \
    for (long b = 0; b < B; b++) {                                                                      \
        const T *xb = x + b * x_sb;                                                                     \
        if (keep) {                                                                                     \
            T *kb = keep + b * keep_sb;                                                                 \
            for (long d = 0; d < D; d++) kb[d] = xb[d];                                                 \
        }                                                                                               \
        dots_##SUFFIX(n, D, xb, V + b * v_sb, v_sk, w, sg + b * sg_sb);                                 \
        combine_##SUFFIX(n, D, sg + b * sg_sb, 1, V + b * v_sb, v_sk, 0, out + b * out_sb);             \
    }                                                                                                   \
}                                                                                                       \
void column_combine_##SUFFIX(long B, long rows, long D, const T *sg, long sg_sb, long sg_sj,            \
                             const T *G, long g_sb, long g_sj, const T *init, long init_sb,             \
                             T *out, long out_sb) {                                                     \
    for (long b = 0; b < B; b++)                                                                        \
        combine_##SUFFIX(rows, D, sg + b * sg_sb, sg_sj, G + b * g_sb, g_sj, init ? init + b * init_sb : 0, \
                         out + b * out_sb);                                                             \
}
DEFINE(float, f32)
DEFINE(double, f64)
"""
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-shared"]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_long, _ptr = ctypes.c_long, ctypes.c_void_p


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fwsweep" / "kernels"
    return Path(os.environ.get("FWSWEEP_KERNEL_CACHE", default))


def _cpu_model() -> str:
    """The CPU's model and instruction set: code built with -march=native for one CPU can crash another
    (a folder shared by unlike nodes), so they are part of the cache key."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    first = {}
    for line in lines:
        name = line.split(":")[0].strip()
        if name in ("model name", "flags", "Features", "CPU part"):
            first.setdefault(name, line)
    return "\n".join(first.values()) or platform.machine()


def _compile(compiler: list[str]) -> Path:
    """The cached shared library, built first if missing; in the temp folder if the cache cannot be
    written (a read-only home on a cluster node)."""
    key = hashlib.sha256("\0".join([SOURCE, *FLAGS, *compiler, _cpu_model()]).encode()).hexdigest()[:16]
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        writable = os.access(folder, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        folder = Path(tempfile.gettempdir()) / f"fwsweep-kernels-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
        if folder.stat().st_uid != os.getuid():  # a shared /tmp: never load a library someone else put there
            raise OSError(f"{folder} belongs to another user")
    return _build(compiler, folder / f"fw_memory-{key}.so")


def _build(compiler: list[str], target: Path) -> Path:
    """`target`, compiled unless there; atomically (os.replace): trials may race on a fresh node."""
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(prefix=".build-", dir=target.parent) as build:
        source, built = Path(build) / "fw_memory.c", Path(build) / "fw_memory.so"
        source.write_text(SOURCE)
        subprocess.run([*compiler, *FLAGS, str(source), "-o", str(built)], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(built, target)
    return target


@cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("FWSWEEP_NATIVE", "1") == "0":
        return None
    found = shutil.which("cc") or shutil.which("gcc")
    compiler = shlex.split(os.environ.get("CC", "")) or ([found] if found else [])  # CC may carry flags
    if not compiler:
        _fall_back("no C compiler: neither cc nor gcc is on the PATH and CC is unset")
        return None
    try:
        library = ctypes.CDLL(str(_compile(compiler)))
    except subprocess.CalledProcessError as err:
        said = (err.stderr or "").strip().splitlines()  # a compiler's last line names the error
        _fall_back(f"{shlex.join(compiler)} exited with status {err.returncode}"
                   + (f": {said[-1]}" if said else ""))
        return None
    except (OSError, subprocess.SubprocessError) as err:
        _fall_back(str(err))
        return None
    for suffix in _SUFFIX.values():
        getattr(library, f"dots_combine_{suffix}").argtypes = [_long] * 3 + [_ptr, _long] * 2 + [
            _ptr, _long, _long, _ptr, _ptr, _long, _ptr, _long]
        getattr(library, f"column_combine_{suffix}").argtypes = [_long] * 3 + [_ptr, _long, _long] * 2 + [
            _ptr, _long] * 2
    return library


def _fall_back(why: str) -> None:
    log.warning("could not build the fast-weight memory's C loops (%s); its reads use torch.bmm instead "
                "(same results, slower). FWSWEEP_NATIVE=0 skips the build.", why)


def usable_for(like: Tensor) -> bool:
    """Whether the C loops can serve a memory of tensors like `like` (CPU, float32/float64, built)."""
    return like.device.type == "cpu" and like.dtype in _SUFFIX and _library() is not None


class BatchedReads:
    """The C loops bound to one memory's buffers (fused.py's `_DecayedMemory`: V, GQ, SG, weights).

    Each call passes addresses computed here by integer arithmetic: slicing the buffers into views
    would cost a few microseconds per view, as much as the loop itself at small sizes.
    """

    def __init__(self, V: Tensor, GQ: Tensor, SG: Tensor, weights: Tensor):
        for t in (V, GQ, SG, weights):  # the loops read rows of D (or T) contiguous elements
            assert t.device.type == "cpu" and t.dtype == V.dtype and t.stride(-1) == 1, (t.shape, t.stride())
        library, suffix = _library(), _SUFFIX[V.dtype]
        self._dots_combine = getattr(library, "dots_combine_" + suffix)
        self._column_combine = getattr(library, "column_combine_" + suffix)
        self._buffers = (V, GQ, SG, weights)  # keeps the addresses below valid
        self.batch, self.dim, self.rows = V.shape[0], V.shape[2], GQ.shape[1]
        self._size = V.element_size()  # strides below are in elements, addresses in bytes
        self._V = (V.data_ptr(), V.stride(0), V.stride(1))
        self._GQ = (GQ.data_ptr(), GQ.stride(0), GQ.stride(1))
        self._SG = (SG.data_ptr(), SG.stride(0), SG.stride(1))
        self._w_end = weights.data_ptr() + weights.numel() * self._size

    def _row(self, buffer: tuple[int, int, int], row: int, column: int = 0) -> int:
        """The address of buffer[:, row, column] for batch element 0."""
        return buffer[0] + (row * buffer[2] + column) * self._size

    def read(self, x: Tensor, n: int, keep_row: int, dots_row: int) -> Tensor:
        """Σ_{k<n} SG[b, dots_row, k] V[b, k] with SG[b, dots_row, k] = w[T-n+k] (x[b]·V[b, k]);
        x is kept in GQ's `keep_row` unless it is already there (for S = 1 a read's query is v_t)."""
        if x.stride(-1) != 1:
            x = x.contiguous()
        out = x.new_empty(self.batch, self.dim)
        keep = self._row(self._GQ, keep_row)
        x_ptr = x.data_ptr()
        self._dots_combine(self.batch, n, self.dim, x_ptr, x.stride(0), None if x_ptr == keep else keep,
                           self._GQ[1], *self._V, self._w_end - n * self._size, self._row(self._SG, dots_row),
                           self._SG[1], out.data_ptr(), self.dim)
        return out

    def stored_grad(self, k: int, first_row: int, plus: Tensor | None = None) -> Tensor:
        """plus + Σ_{j ≥ first_row} SG[b, j, k] GQ[b, j]: the gradient of stored vector k (plus another
        gradient of the same vector, added in the same pass)."""
        out = torch.empty(self.batch, self.dim, dtype=self._buffers[0].dtype)
        if plus is not None and plus.stride(-1) != 1:
            plus = plus.contiguous()
        self._column_combine(self.batch, self.rows - first_row, self.dim,
                             self._row(self._SG, first_row, k), *self._SG[1:],
                             self._row(self._GQ, first_row), *self._GQ[1:],
                             None if plus is None else plus.data_ptr(), 0 if plus is None else plus.stride(0),
                             out.data_ptr(), self.dim)
        return out
