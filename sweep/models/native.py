"""The fused forms' C kernels, built once per node: whole time steps of the LN-LSTM and FW-LSTM cells and
of the FW-RNN's inner loop, the fast-weight memory's reads included, and whole sequences of them (the time
loop in C, its products through a GEMM called from C: `SEQUENCES`).

Why C: at the sizes these models train at (batch 128, H <= a few hundred), a time step is a few dozen small
tensor ops, and each costs a fixed few microseconds of dispatch plus a pass over memory, whatever its size.
One C call per time step does the whole cell for every row of the batch while the row is in cache: layer
norms, gate activations, the cell update, the memory's write and reads (forward), and the same backward, with
the gradient of each stored vector computed once. The slow matmuls are oneDNN's or the BLAS's (matmul.py),
called from C by the sequence loops, from Python by the per-step ones. The reads: per batch element, a handful
of dot products and weighted sums over the stored vectors (`torch.bmm` pays about 1 us per batch element for
those, ~130 us per read at batch 128).

The C source below is compiled on first use with the system C compiler (`cc`), for the type in use
(`source_for`: about 18-24 CPU-seconds per library on a 2-core AMD EPYC), and cached per source, compiler
flags and CPU model under $FWSWEEP_KERNEL_CACHE (default ~/.cache/fwsweep/kernels), so a cluster node
compiles it once, for its own CPU (trials starting together wait for one build: `_build`): once for any
hidden size, and once more for each model and hidden size in use, with that model's kernels only
(`kernel(..., hidden=H)`; ASSUME_HIDDEN and HAS say why; 16 CPU-seconds for the FW-LSTM's, under one
for the others), falling back to the first where that build fails. Without a compiler, on CUDA, for other
dtypes, or with FWSWEEP_NATIVE=0, fused.py runs the same equations with torch ops (the reads with
`torch.bmm`): checked against each other and against the matrix form in tests/test_models.py.

Each function is written once, for `$real` (float32 `_f32`, float64 `_f64`): `SOURCE` substitutes both,
`source_for` one (what a process builds).
float32 uses its own vectorisable exp and tanh (Cephes' polynomials, about 1 ulp); float64 uses libm's.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from string import Template

import torch
from torch import Tensor

log = logging.getLogger(__name__)

HEADER = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#define LN_EPS 1e-5
/* the cells' scratch rows start on a cache line, as the memory's rows do (fused._row_buffer): a vector
   load or store then never straddles two lines (LSTM steps 1-6% faster at H = 50, the FW-RNN's 11-13% at
   H = 100) */
#define LINE_ALIGNED __attribute__((aligned(64)))
/* A library built for one hidden size (kernel(..., hidden=H): -DFWSWEEP_HIDDEN=H) lets each cell take its H
   as that constant, so GCC compiles every loop over a row for its known length, the last H mod 16 numbers
   included, where it otherwise ends each loop with a run-time chain of narrower vectors and scalar code:
   steps 4-11% faster. Such a library is only ever called with that H. */
#ifdef FWSWEEP_HIDDEN
#define ASSUME_HIDDEN(H) do { if ((H) != FWSWEEP_HIDDEN) __builtin_unreachable(); } while (0)
#else
#define ASSUME_HIDDEN(H) ((void) 0)
#endif
/* A library for one hidden size serves one model's cells and sequences (-DFWSWEEP_MODEL=MODEL_...: the
   trial's model; the shared functions come from the library for any size, which holds everything): the
   LN-LSTM's and the FW-RNN's then compile in well under a second (the FW-LSTM's backward is most of the
   whole source's compile time). */
#define MODEL_LNLSTM 1
#define MODEL_FWLSTM 2
#define MODEL_FWRNN 3
#ifdef FWSWEEP_MODEL
#define HAS(model) (FWSWEEP_MODEL == (model))
#define HAS_SHARED 0
#else
#define HAS(model) 1
#define HAS_SHARED 1
#endif
/* Asks for the cache lines of the n numbers at p ahead of their use (rw: 1 to write them, 0 to read). The
   cells call it on the next batch row's rows while they work on this one, where the hardware's prefetcher
   does not get ahead of them: rows of a step that are a short run (the FW-LSTM's blocks of a few rows in
   the T-major saved buffers) or far apart (dZ, batch-major: one row every T·4H numbers). Not on the
   LN-LSTM's saved rows, all B of a step in one run: measured no faster. */
#define PREFETCH_LINES(p, n, rw) \
    for (long k_ = 0; k_ < (n); k_ += 64 / (long) sizeof *(p)) __builtin_prefetch((p) + k_, rw, 3)
/* One row of the FW-LSTM's saved buffers N, ACT (G wide), CN and C (H wide). */
#define PREFETCH_FWLSTM_ROW(n, act, cn, c, G, H, rw) { \
        PREFETCH_LINES(n, G, rw); PREFETCH_LINES(act, G, rw); PREFETCH_LINES(cn, H, rw); \
        PREFETCH_LINES(c, H, rw); }

/* e^x for float32 as Cephes' expf: 2^n e^r with |r| <= ln2/2 and a degree-6 polynomial (about 1 ulp),
   written out so that loops over it vectorise; NaN stays NaN. float64 uses libm. */
static inline float exp_approx_f32(float x) {
    x = x > 88.0f ? 88.0f : x;
    x = x < -87.0f ? -87.0f : x;
    /* n = x log2(e) rounded to nearest by adding and taking away 1.5 * 2^23 (floorf does not vectorise) */
    const float fn = (1.44269504088896341f * x + 12582912.0f) - 12582912.0f;
    const float r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)fn + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* tanh for float32 as Cephes' tanhf: an odd polynomial below |x| = 0.625, 1 - 2 / (e^{2|x|} + 1) above */
static inline float tanh_approx_f32(float x) {
    const float a = fabsf(x), z = x * x;
    const float small = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z
                          + 1.33314422036e-1f) * z - 3.33332819422e-1f) * z * x + x;
    float big = 1.0f - 2.0f / (exp_approx_f32(2.0f * a) + 1.0f);
    big = x < 0 ? -big : big;
    return a < 0.625f ? small : big;
}
/* One vector of VECTOR_BYTES (GCC's and Clang's vector extensions): 64 bytes, one AVX-512 register, where
   the CPU has them; 32 elsewhere (one AVX2 register, two NEON ones). The products below keep up to 16 sums
   in registers: 64-byte vectors on a CPU with 16 32-byte registers spill them, and an FW-LSTM step at
   H = 50 took 1.9x as long on an AVX2-only AMD EPYC (docs/benchmarks.md, "AVX2"). Also: its loads from
   unaligned memory, the lower half of one (upper lanes zero), and the sums across the lanes of eight
   vectors at once: a transposing tree of shuffles and adds (a vector's lanes summed one by one, as
   `omp simd reduction` compiles them, cost more than the 8-row dot products' FMAs at these lengths). */
#if defined(FWSWEEP_VECTOR_BYTES)  /* to test the other width */
#define VECTOR_BYTES FWSWEEP_VECTOR_BYTES
#elif defined(__AVX512F__)
#define VECTOR_BYTES 64
#else
#define VECTOR_BYTES 32
#endif
typedef float vec_f32 __attribute__((vector_size(VECTOR_BYTES)));
typedef double vec_f64 __attribute__((vector_size(VECTOR_BYTES)));
#define LANES_f32 (VECTOR_BYTES / 4)
#define LANES_f64 (VECTOR_BYTES / 8)
typedef float half_f32 __attribute__((vector_size(VECTOR_BYTES / 2)));
typedef double half_f64 __attribute__((vector_size(VECTOR_BYTES / 2)));
static inline vec_f32 load_f32(const float *p) { vec_f32 v; memcpy(&v, p, sizeof v); return v; }
static inline vec_f64 load_f64(const double *p) { vec_f64 v; memcpy(&v, p, sizeof v); return v; }
static inline void store_f32(float *p, vec_f32 v) { memcpy(p, &v, sizeof v); }
static inline void store_f64(double *p, vec_f64 v) { memcpy(p, &v, sizeof v); }
#if defined(__has_builtin) && !defined(FWSWEEP_PORTABLE_C)  /* the define: to test the other branch */
#if __has_builtin(__builtin_shufflevector)
#define HAVE_SHUFFLEVECTOR 1
#endif
#endif
#ifdef HAVE_SHUFFLEVECTOR
#define SHUF __builtin_shufflevector
/* pairwise sums of two vectors' lanes in groups (x's then y's): 16 lanes to 8 + 8, ... 2 lanes to 1 + 1 */
#define PAIR8(x, y) (SHUF(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) \
                     + SHUF(x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31))
#define PAIR4(x, y) (SHUF(x, y, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) \
                     + SHUF(x, y, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31))
#define PAIR2(x, y) (SHUF(x, y, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) \
                     + SHUF(x, y, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31))
#define OPAIR4(x, y) (SHUF(x, y, 0, 1, 2, 3, 8, 9, 10, 11) + SHUF(x, y, 4, 5, 6, 7, 12, 13, 14, 15))
#define OPAIR2(x, y) (SHUF(x, y, 0, 1, 4, 5, 8, 9, 12, 13) + SHUF(x, y, 2, 3, 6, 7, 10, 11, 14, 15))
#define OPAIR1(x, y) (SHUF(x, y, 0, 2, 4, 6, 8, 10, 12, 14) + SHUF(x, y, 1, 3, 5, 7, 9, 11, 13, 15))
#define QPAIR2(x, y) (SHUF(x, y, 0, 1, 4, 5) + SHUF(x, y, 2, 3, 6, 7))
#define QPAIR1(x, y) (SHUF(x, y, 0, 2, 4, 6) + SHUF(x, y, 1, 3, 5, 7))
typedef float quarter_f32 __attribute__((vector_size(16)));
#if VECTOR_BYTES == 64
/* a half vector widened by a shuffle (a load into half of a vector in memory would stall the next load) */
static inline vec_f32 load_half_f32(const float *p) {
    half_f32 h;
    memcpy(&h, p, sizeof h);
    return SHUF(h, (half_f32){0}, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
static inline vec_f64 load_half_f64(const double *p) {
    half_f64 h;
    memcpy(&h, p, sizeof h);
    return SHUF(h, (half_f64){0}, 0, 1, 2, 3, 4, 5, 6, 7);
}
static inline void hsum8_f32(vec_f32 a0, vec_f32 a1, vec_f32 a2, vec_f32 a3, vec_f32 a4, vec_f32 a5,
                             vec_f32 a6, vec_f32 a7, float *s) {
    /* [a0: 8 | a1: 8] ..., then [a0: 4, a1: 4, a2: 4, a3: 4], [a0: 2, ..., a7: 2], [a0, ..., a7] */
    const vec_f32 d = PAIR2(PAIR4(PAIR8(a0, a1), PAIR8(a2, a3)), PAIR4(PAIR8(a4, a5), PAIR8(a6, a7)));
    const half_f32 e = SHUF(d, d, 0, 2, 4, 6, 8, 10, 12, 14) + SHUF(d, d, 1, 3, 5, 7, 9, 11, 13, 15);
    memcpy(s, &e, sizeof e);
}
static inline void hsum8_f64(vec_f64 a0, vec_f64 a1, vec_f64 a2, vec_f64 a3, vec_f64 a4, vec_f64 a5,
                             vec_f64 a6, vec_f64 a7, double *s) {
    const vec_f64 e = OPAIR1(OPAIR2(OPAIR4(a0, a1), OPAIR4(a2, a3)), OPAIR2(OPAIR4(a4, a5), OPAIR4(a6, a7)));
    memcpy(s, &e, sizeof e);
}
/* the sum of one vector's lanes: halves added, then quarters, then pairwise */
static inline float hsum1_f32(vec_f32 a) {
    const half_f32 h = SHUF(a, a, 0, 1, 2, 3, 4, 5, 6, 7) + SHUF(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
    const quarter_f32 q = SHUF(h, h, 0, 1, 2, 3) + SHUF(h, h, 4, 5, 6, 7);
    return (q[0] + q[2]) + (q[1] + q[3]);
}
static inline double hsum1_f64(vec_f64 a) {
    const half_f64 h = SHUF(a, a, 0, 1, 2, 3) + SHUF(a, a, 4, 5, 6, 7);
    return (h[0] + h[2]) + (h[1] + h[3]);
}
#else  /* 32-byte vectors: 8 floats, 4 doubles */
static inline vec_f32 load_half_f32(const float *p) {
    half_f32 h;
    memcpy(&h, p, sizeof h);
    return SHUF(h, (half_f32){0}, 0, 1, 2, 3, 4, 5, 6, 7);
}
static inline vec_f64 load_half_f64(const double *p) {
    half_f64 h;
    memcpy(&h, p, sizeof h);
    return SHUF(h, (half_f64){0}, 0, 1, 2, 3);
}
static inline void hsum8_f32(vec_f32 a0, vec_f32 a1, vec_f32 a2, vec_f32 a3, vec_f32 a4, vec_f32 a5,
                             vec_f32 a6, vec_f32 a7, float *s) {
    const vec_f32 e = OPAIR1(OPAIR2(OPAIR4(a0, a1), OPAIR4(a2, a3)), OPAIR2(OPAIR4(a4, a5), OPAIR4(a6, a7)));
    memcpy(s, &e, sizeof e);
}
static inline void hsum8_f64(vec_f64 a0, vec_f64 a1, vec_f64 a2, vec_f64 a3, vec_f64 a4, vec_f64 a5,
                             vec_f64 a6, vec_f64 a7, double *s) {
    const vec_f64 lo = QPAIR1(QPAIR2(a0, a1), QPAIR2(a2, a3)), hi = QPAIR1(QPAIR2(a4, a5), QPAIR2(a6, a7));
    memcpy(s, &lo, sizeof lo);
    memcpy(s + 4, &hi, sizeof hi);
}
static inline float hsum1_f32(vec_f32 a) {
    const quarter_f32 q = SHUF(a, a, 0, 1, 2, 3) + SHUF(a, a, 4, 5, 6, 7);
    return (q[0] + q[2]) + (q[1] + q[3]);
}
static inline double hsum1_f64(vec_f64 a) { return (a[0] + a[2]) + (a[1] + a[3]); }
#endif
#if defined(__AVX512F__) && VECTOR_BYTES == 64
#include <immintrin.h>
/* the first m lanes (0 < m < LANES), the others zero: a masked load, which never touches the lanes past m
   (so never memory past a buffer's end); and its masked store */
#define HAVE_MASKED_PARTS 1
static inline vec_f32 load_part_f32(const float *p, long m) {
    return (vec_f32)_mm512_maskz_loadu_ps((__mmask16)((1u << m) - 1), p);
}
static inline vec_f64 load_part_f64(const double *p, long m) {
    return (vec_f64)_mm512_maskz_loadu_pd((__mmask8)((1u << m) - 1), p);
}
static inline void store_part_f32(float *p, vec_f32 v, long m) {
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << m) - 1), (__m512)v);
}
static inline void store_part_f64(double *p, vec_f64 v, long m) {
    _mm512_mask_storeu_pd(p, (__mmask8)((1u << m) - 1), (__m512d)v);
}
#endif
#else  /* a compiler without __builtin_shufflevector (GCC before 12): through memory, lane by lane */
#define PORTABLE_LANES(real, sfx) \
    static inline vec_##sfx load_half_##sfx(const real *p) { \
        vec_##sfx v = {0}; \
        memcpy(&v, p, sizeof v / 2); \
        return v; \
    } \
    static inline void hsum8_##sfx(vec_##sfx a0, vec_##sfx a1, vec_##sfx a2, vec_##sfx a3, vec_##sfx a4, \
                                   vec_##sfx a5, vec_##sfx a6, vec_##sfx a7, real *s) { \
        const vec_##sfx a[8] = {a0, a1, a2, a3, a4, a5, a6, a7}; \
        for (int i = 0; i < 8; i++) { s[i] = 0; for (int l = 0; l < LANES_##sfx; l++) s[i] += a[i][l]; } \
    } \
    static inline real hsum1_##sfx(vec_##sfx a) { \
        real s = 0; \
        for (int l = 0; l < LANES_##sfx; l++) s += a[l]; \
        return s; \
    }
PORTABLE_LANES(float, f32)
PORTABLE_LANES(double, f64)
#endif
#ifdef HAVE_MASKED_PARTS
#define PART_LANES(rest, L) (rest)
#else  /* parts are half vectors only; what is left after one goes lane by lane */
#define PART_LANES(rest, L) ((rest) >= (L) / 2 ? (L) / 2 : 0)
static inline vec_f32 load_part_f32(const float *p, long m) { (void)m; return load_half_f32(p); }
static inline vec_f64 load_part_f64(const double *p, long m) { (void)m; return load_half_f64(p); }
static inline void store_part_f32(float *p, vec_f32 v, long m) { (void)m; memcpy(p, &v, sizeof v / 2); }
static inline void store_part_f64(double *p, vec_f64 v, long m) { (void)m; memcpy(p, &v, sizeof v / 2); }
#endif
/* a vector of ones, whose lower half (read as a half vector) keeps the lanes a half vector holds */
static const float ONES_f32[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
static const double ONES_f64[8] = {1, 1, 1, 1, 1, 1, 1, 1};
#define EXP_f32 exp_approx_f32
#define TANH_f32 tanh_approx_f32
#define SQRT_f32 sqrtf
#define EXP_f64 exp
#define TANH_f64 tanh
#define SQRT_f64 sqrt
"""

# The memory's products, used by the cells below: `dots` (sg[k] = w[k] (x·v_k) for k < n) and `combine`
# (out = init + Σ_k c[k] V[k]). `column_combine` does the latter for every batch element, over rows j of
# GQ with weights from a column of SG: a stored vector's gradient added to another gradient of the same
# vector (init = 0 when NULL). Strides are in elements.
MEMORY = Template(r"""
/* sg[k] = w[k] (x·v_k) for k < n, in passes of 8 rows, then 4, 2, 1 (no row computed twice): the output
   row x is loaded once per pass, the independent sums hide the FMA latency, and each is a vector of partial
   sums until one shuffle tree sums them all (unused ones are zero). Measured in L1 at D = 400: n = 8 in
   45 ns where a scalar reduction took 64; over a T = 19 sequence's reads (n = 1 .. 19) with `combine`,
   20% less time than one padded 8-row pass per remainder. */
static inline __attribute__((always_inline)) void dots_pass_$sfx(const long R, long D, const $real *x,
                                                                 const $real *const *v, const $real *w,
                                                                 $real *sg) {
    vec_$sfx a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
#define ACC_$sfx(load, at) { \
        const vec_$sfx xd = load(x + at); \
        a0 += xd * load(v[0] + at); \
        if (R > 1) a1 += xd * load(v[1] + at); \
        if (R > 2) { a2 += xd * load(v[2] + at); a3 += xd * load(v[3] + at); } \
        if (R > 4) { a4 += xd * load(v[4] + at); a5 += xd * load(v[5] + at); \
                     a6 += xd * load(v[6] + at); a7 += xd * load(v[7] + at); } }
    long d = 0;
    for (; d + LANES_$sfx <= D; d += LANES_$sfx) ACC_$sfx(load_$sfx, d)
    const long part = PART_LANES(D - d, LANES_$sfx);
#define LOAD_PART_$sfx(p) load_part_$sfx(p, part)
    if (part) {
        ACC_$sfx(LOAD_PART_$sfx, d)
        d += part;
    }
    $real s[8];
    hsum8_$sfx(a0, a1, a2, a3, a4, a5, a6, a7, s);
    for (; d < D; d++)
        for (long i = 0; i < R; i++) s[i] += x[d] * v[i][d];
    for (long i = 0; i < R; i++) sg[i] = w[i] * s[i];
}
static void dots_$sfx(long n, long D, const $real *x, const $real *V, long v_sk, const $real *w, $real *sg) {
    const $real *v[8];
    long k = 0;
    for (; k + 8 <= n; k += 8) {
        for (long i = 0; i < 8; i++) v[i] = V + (k + i) * v_sk;
        dots_pass_$sfx(8, D, x, v, w + k, sg + k);
    }
    for (long rows = 4; rows >= 1; rows /= 2) {
        if (n - k < rows) continue;
        for (long i = 0; i < rows; i++) v[i] = V + (k + i) * v_sk;
        if (rows == 4) dots_pass_$sfx(4, D, x, v, w + k, sg + k);
        else if (rows == 2) dots_pass_$sfx(2, D, x, v, w + k, sg + k);
        else dots_pass_$sfx(1, D, x, v, w + k, sg + k);
        k += rows;
    }
}
/* One chunk of out = init + Σ_k c[k * c_s] V[k]: J whole vectors, then (has_part) one of m lanes, kept in
   registers through all n rows, so out is written once (D = 400, a T = 19 sequence's reads: 35% less time
   than adding eight rows at a time into out in memory). Named sums, not an array: GCC kept an array of
   fewer than eight in memory, stored at every row. */
static inline __attribute__((always_inline)) void combine_chunk_$sfx(const int J, const int has_part, long m,
                                                                     long n, const $real *c, long c_s,
                                                                     const $real *V, long v_sk,
                                                                     const $real *init, $real *out) {
    const long L = LANES_$sfx;
    vec_$sfx a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0}, p = {0};
#define EACH_SUM_$sfx(op) { \
        if (J > 0) op(a0, 0) if (J > 1) op(a1, 1) if (J > 2) op(a2, 2) if (J > 3) op(a3, 3) \
        if (J > 4) op(a4, 4) if (J > 5) op(a5, 5) if (J > 6) op(a6, 6) if (J > 7) op(a7, 7) }
#define INIT_$sfx(a, j) { a = load_$sfx(init + j * L); }
#define ADD_ROW_$sfx(a, j) { a += ck * load_$sfx(v + j * L); }
#define STORE_$sfx(a, j) { store_$sfx(out + j * L, a); }
    if (init) {
        EACH_SUM_$sfx(INIT_$sfx)
        if (has_part) p = load_part_$sfx(init + J * L, m);
    }
    long k = 0;
    if (J + has_part <= 2) {  /* few sums: odd rows into a second set, so no add waits on the one before */
        vec_$sfx b0 = {0}, b1 = {0}, q = {0};
        for (; k + 2 <= n; k += 2) {
            const $real c0 = c[k * c_s], c1 = c[(k + 1) * c_s], *v0 = V + k * v_sk, *v1 = v0 + v_sk;
            if (J > 0) { a0 += c0 * load_$sfx(v0); b0 += c1 * load_$sfx(v1); }
            if (J > 1) { a1 += c0 * load_$sfx(v0 + L); b1 += c1 * load_$sfx(v1 + L); }
            if (has_part) {
                p += c0 * load_part_$sfx(v0 + J * L, m);
                q += c1 * load_part_$sfx(v1 + J * L, m);
            }
        }
        a0 += b0; a1 += b1; p += q;
    }
    for (; k < n; k++) {
        const $real ck = c[k * c_s], *v = V + k * v_sk;
        EACH_SUM_$sfx(ADD_ROW_$sfx)
        if (has_part) p += ck * load_part_$sfx(v + J * L, m);
    }
    EACH_SUM_$sfx(STORE_$sfx)
    if (has_part) store_part_$sfx(out + J * L, p, m);
}
#define COMBINE_CHUNK_$sfx(J, has_part) \
    combine_chunk_$sfx(J, has_part, part, n, c, c_s, V + d, v_sk, init ? init + d : 0, out + d)
/* out = init + Σ_k c[k * c_s] V[k] (init = 0 when NULL; it may be out), in chunks of eight vectors, then
   one chunk of what is left: whole vectors and one part (without masked loads, only a half vector, and the
   last lanes one by one) */
static void combine_$sfx(long n, long D, const $real *c, long c_s, const $real *V, long v_sk,
                         const $real *init, $real *out) {
    const long L = LANES_$sfx;
    long d = 0, part = 0;
    for (; d + 8 * L <= D; d += 8 * L) COMBINE_CHUNK_$sfx(8, 0);
    const long whole = (D - d) / L;
    part = PART_LANES(D - d - whole * L, L);
    switch (whole * 2 + (part > 0)) {
    case 0: break;
    case 1: COMBINE_CHUNK_$sfx(0, 1); break;
    case 2: COMBINE_CHUNK_$sfx(1, 0); break;
    case 3: COMBINE_CHUNK_$sfx(1, 1); break;
    case 4: COMBINE_CHUNK_$sfx(2, 0); break;
    case 5: COMBINE_CHUNK_$sfx(2, 1); break;
    case 6: COMBINE_CHUNK_$sfx(3, 0); break;
    case 7: COMBINE_CHUNK_$sfx(3, 1); break;
    case 8: COMBINE_CHUNK_$sfx(4, 0); break;
    case 9: COMBINE_CHUNK_$sfx(4, 1); break;
    case 10: COMBINE_CHUNK_$sfx(5, 0); break;
    case 11: COMBINE_CHUNK_$sfx(5, 1); break;
    case 12: COMBINE_CHUNK_$sfx(6, 0); break;
    case 13: COMBINE_CHUNK_$sfx(6, 1); break;
    case 14: COMBINE_CHUNK_$sfx(7, 0); break;
    default: COMBINE_CHUNK_$sfx(7, 1); break;
    }
    d += whole * L + part;
    if (d < D) {  /* lanes left without masked loads: each one's own sum, the rows outermost */
        $real t[LANES_$sfx];
        const long m = D - d;
        for (long i = 0; i < m; i++) t[i] = init ? init[d + i] : 0;
        for (long k = 0; k < n; k++) {
            const $real ck = c[k * c_s], *v = V + k * v_sk + d;
            for (long i = 0; i < m; i++) t[i] += ck * v[i];
        }
        memcpy(out + d, t, m * sizeof t[0]);
    }
}
/* O <= 4 sums in one pass over V's n rows: out_i = init_i + Σ_k c[k c_s - i] V[k] (init_i = 0 when NULL),
   so each row, loaded once, serves O outputs (the FW-LSTM's backward: one stored vector's gradient and
   partial sums of the next ones', from the same rows). A chunk of J <= 4 vectors (the last one `part`
   lanes when part > 0) of every output is kept in registers through all n rows. (With AVX2's 16 registers
   O = 4 does not fit them all; two vectors a chunk for O > 2 measured no faster: 0.99-1.03x.) */
#define EACH_OJ_$sfx(op) \
    op(0, 0) op(0, 1) op(0, 2) op(0, 3) op(1, 0) op(1, 1) op(1, 2) op(1, 3) \
    op(2, 0) op(2, 1) op(2, 2) op(2, 3) op(3, 0) op(3, 1) op(3, 2) op(3, 3)
static inline __attribute__((always_inline)) void combine_outs_chunk_$sfx(const int O, const int J, long part,
                                                                          long n, const $real *c, long c_s,
                                                                          const $real *V, long v_sk,
                                                                          $real *const *init,
                                                                          $real *const *out, long d) {
    const long L = LANES_$sfx;
    vec_$sfx a00 = {0}, a01 = {0}, a02 = {0}, a03 = {0}, a10 = {0}, a11 = {0}, a12 = {0}, a13 = {0},
             a20 = {0}, a21 = {0}, a22 = {0}, a23 = {0}, a30 = {0}, a31 = {0}, a32 = {0}, a33 = {0};
#define LOAD_J_$sfx(p, j) \
    (part && (j) == J - 1 ? load_part_$sfx((p) + (j) * L, part) : load_$sfx((p) + (j) * L))
#define INIT_OJ_$sfx(i, j) if (O > i && J > j && init[i]) a##i##j = LOAD_J_$sfx(init[i] + d, j);
#define ADD_OJ_$sfx(i, j) if (O > i && J > j) a##i##j += c##i * v##j;
#define STORE_OJ_$sfx(i, j) if (O > i && J > j) { \
        if (part && (j) == J - 1) store_part_$sfx(out[i] + d + (j) * L, a##i##j, part); \
        else store_$sfx(out[i] + d + (j) * L, a##i##j); }
    EACH_OJ_$sfx(INIT_OJ_$sfx)
    for (long k = 0; k < n; k++) {
        const $real *row = V + k * v_sk + d, *ck = c + k * c_s;
        vec_$sfx v0 = {0}, v1 = {0}, v2 = {0}, v3 = {0};
        if (J > 0) v0 = LOAD_J_$sfx(row, 0);
        if (J > 1) v1 = LOAD_J_$sfx(row, 1);
        if (J > 2) v2 = LOAD_J_$sfx(row, 2);
        if (J > 3) v3 = LOAD_J_$sfx(row, 3);
        const $real c0 = ck[0], c1 = O > 1 ? ck[-1] : 0, c2 = O > 2 ? ck[-2] : 0, c3 = O > 3 ? ck[-3] : 0;
        EACH_OJ_$sfx(ADD_OJ_$sfx)
    }
    EACH_OJ_$sfx(STORE_OJ_$sfx)
}
#define COMBINE_OUTS_$sfx(O) { \
        long d = 0; \
        for (; d + 4 * L <= D; d += 4 * L) \
            combine_outs_chunk_$sfx(O, 4, 0, n, c, c_s, V, v_sk, init, out, d); \
        const long whole = (D - d) / L, part = PART_LANES(D - d - whole * L, L); \
        switch (whole + (part > 0)) { \
        case 1: combine_outs_chunk_$sfx(O, 1, part, n, c, c_s, V, v_sk, init, out, d); break; \
        case 2: combine_outs_chunk_$sfx(O, 2, part, n, c, c_s, V, v_sk, init, out, d); break; \
        case 3: combine_outs_chunk_$sfx(O, 3, part, n, c, c_s, V, v_sk, init, out, d); break; \
        case 4: combine_outs_chunk_$sfx(O, 4, part, n, c, c_s, V, v_sk, init, out, d); break; \
        default: break; \
        } \
        for (long e = d + whole * L + part; e < D; e++)  /* lanes left without masked loads */ \
            for (int i = 0; i < O; i++) { \
                $real sum = init[i] ? init[i][e] : 0; \
                for (long k = 0; k < n; k++) sum += c[k * c_s - i] * V[k * v_sk + e]; \
                out[i][e] = sum; \
            } }
static void combine_outs_$sfx(int O, long n, long D, const $real *c, long c_s, const $real *V, long v_sk,
                              $real *const *init, $real *const *out) {
    const long L = LANES_$sfx;
    switch (O) {
    case 1: COMBINE_OUTS_$sfx(1) break;
    case 2: COMBINE_OUTS_$sfx(2) break;
    case 3: COMBINE_OUTS_$sfx(3) break;
    default: COMBINE_OUTS_$sfx(4) break;
    }
}
#if HAS_SHARED
void column_combine_$sfx(long B, long rows, long D, const $real *sg, long sg_sb, long sg_sj,
                         const $real *G, long g_sb, long g_sj, const $real *init, long init_sb,
                         $real *out, long out_sb) {
    for (long b = 0; b < B; b++)
        combine_$sfx(rows, D, sg + b * sg_sb, sg_sj, G + b * g_sb, g_sj, init ? init + b * init_sb : 0,
                     out + b * out_sb);
}
#endif
""")

CELLS = Template(r"""
static inline $real sigm_$sfx($real x) { return 1 / (1 + EXP_$sfx(-x)); }

/* z = h W_h + (x W_x + b) of one row; h W_h is NULL at t = 0 (h(-1) = 0) */
static inline void gate_inputs_$sfx(long G, const $real *hw, const $real *xw, $real *z) {
    if (hw) {
        _Pragma("omp simd")
        for (long k = 0; k < G; k++) z[k] = hw[k] + xw[k];
    } else {
        for (long k = 0; k < G; k++) z[k] = xw[k];
    }
}

/* Σ_k x[k] (y NULL), Σ_k x[k] y[k] or, with `centre`, Σ_k (x[k] - m)²: in vectors (two sums, for the
   adds' latency), then a half vector and single lanes, one lane sum at the end. `omp simd reduction` compiled
   its lanes into one scalar add after another (GCC 12): longer than the loop itself at these lengths. */
static inline __attribute__((always_inline)) $real lane_sum_$sfx(long n, const $real *x, const $real *y,
                                                               int centre, $real m) {
    const long L = LANES_$sfx;
#define TERM_$sfx(load, at) (centre ? (load(x + at) - m) * (load(x + at) - m) \
                                    : y ? load(x + at) * load(y + at) : load(x + at))
    vec_$sfx a = {0}, b = {0};
    long k = 0;
    for (; k + 2 * L <= n; k += 2 * L) {
        a += TERM_$sfx(load_$sfx, k);
        b += TERM_$sfx(load_$sfx, k + L);
    }
    if (k + L <= n) {
        a += TERM_$sfx(load_$sfx, k);
        k += L;
    }
    /* then half a vector, not a masked part: the row was just written, and a masked load waits for the
       narrower stores of its last lanes to leave the store buffer (1-2% slower steps at H = 50) */
    if (k + L / 2 <= n) {  /* (x - m) of the upper lanes is -m: keep only the lower half */
        b += load_half_$sfx(ONES_$sfx) * TERM_$sfx(load_half_$sfx, k);
        k += L / 2;
    }
    $real s = hsum1_$sfx(a + b);
    for (; k < n; k++) s += centre ? (x[k] - m) * (x[k] - m) : y ? x[k] * y[k] : x[k];
    return s;
}
/* LN statistics of one row: mean and 1/sqrt(biased variance + eps), two passes as in ATen */
static inline void ln_stats_$sfx(long n, const $real *x, $real *mean, $real *rstd) {
    const $real m = lane_sum_$sfx(n, x, 0, 0, 0) / n;
    *mean = m;
    *rstd = 1 / SQRT_$sfx(lane_sum_$sfx(n, x, 0, 1, m) / n + ($real)LN_EPS);
}

/* dx of a layer norm from dxhat (the gradient after the gain):
   rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) */
static inline void ln_backward_$sfx(long n, const $real *dxhat, const $real *xhat, $real rstd, $real *dx) {
    const $real s1 = lane_sum_$sfx(n, dxhat, 0, 0, 0) / n, s2 = lane_sum_$sfx(n, dxhat, xhat, 0, 0) / n;
    _Pragma("omp simd")
    for (long k = 0; k < n; k++) dx[k] = rstd * (dxhat[k] - s1 - xhat[k] * s2);
}

/* c = LN_c(c_prev σf + σi g) with gain gc and bias bc (c_prev NULL: zero); keeps cn, the normalised
   c_pre, and its 1/std */
static inline void cell_state_$sfx(long H, const $real *cp, const $real *si, const $real *sf, const $real *g,
                                   const $real *gc, const $real *bc, $real *cn, $real *c, $real *rstd) {
    _Pragma("omp simd")
    for (long k = 0; k < H; k++) cn[k] = (cp ? cp[k] * sf[k] : 0) + si[k] * g[k];
    $real mean;
    ln_stats_$sfx(H, cn, &mean, rstd);
    const $real r = *rstd;
    _Pragma("omp simd")
    for (long k = 0; k < H; k++) {
        cn[k] = (cn[k] - mean) * r;
        c[k] = cn[k] * gc[k] + bc[k];
    }
}

#if HAS(MODEL_LNLSTM)
/* LN-LSTM, one time step for every row. Gates i, j, f, o, each with its own layer norm (gain gamma, bias
   beta, forget bias in beta's f row). Saves: n (normalised gates), act (σi, g, σf, σo), rstd (4 gates, cell),
   cn (normalised c_pre), c, tanh(c); writes h. */
void lnlstm_forward_$sfx(long B, long H, const $real *hw, const $real *xw, long xw_sb, const $real *gamma,
                         const $real *beta,
                         const $real *gc, const $real *bc, const $real *c_prev,
                         $real *n, $real *act, $real *rstd, $real *cn, $real *c, $real *tc, $real *h,
                         long h_sb) {
    ASSUME_HIDDEN(H);
    const long G = 4 * H;
    $real zb[G] LINE_ALIGNED;
    for (long b = 0; b < B; b++) {
        gate_inputs_$sfx(G, hw ? hw + b * G : 0, xw + b * xw_sb, zb);
        $real *nb = n + b * G, *ab = act + b * G, *rb = rstd + b * 5;
        for (long q = 0; q < 4; q++) {
            $real mean;
            ln_stats_$sfx(H, zb + q * H, &mean, rb + q);
            const $real r = rb[q];
            _Pragma("omp simd")
            for (long k = q * H; k < (q + 1) * H; k++) nb[k] = (zb[k] - mean) * r;
        }
        _Pragma("omp simd")
        for (long k = 0; k < H; k++) ab[k] = sigm_$sfx(nb[k] * gamma[k] + beta[k]);
        _Pragma("omp simd")
        for (long k = H; k < 2 * H; k++) ab[k] = TANH_$sfx(nb[k] * gamma[k] + beta[k]);
        _Pragma("omp simd")
        for (long k = 2 * H; k < G; k++) ab[k] = sigm_$sfx(nb[k] * gamma[k] + beta[k]);
        $real *cb = c + b * H, *tcb = tc + b * H, *hb = h + b * h_sb;
        cell_state_$sfx(H, c_prev ? c_prev + b * H : 0, ab, ab + 2 * H, ab + H, gc, bc, cn + b * H, cb,
                        rb + 4);
        _Pragma("omp simd")
        for (long k = 0; k < H; k++) {
            tcb[k] = TANH_$sfx(cb[k]);
            hb[k] = tcb[k] * ab[3 * H + k];
        }
    }
}

/* Its backward: dh is the gradient of h(t); dc holds that of c(t) from step t+1 and gets that of c(t-1).
   Writes dz (gradient of the gates' pre-activations, z = x W_x + h W_h + b); adds to the gains' and
   biases' gradients. */
void lnlstm_backward_$sfx(long B, long H, const $real *dh, $real *dc, const $real *gamma, const $real *gc,
                          const $real *n, const $real *act, const $real *rstd, const $real *cn,
                          const $real *tc, const $real *c_prev, $real *dz, long dz_sb, $real *dgamma,
                          $real *dbeta, $real *dgc, $real *dbc) {
    ASSUME_HIDDEN(H);
    const long G = 4 * H;
    $real dy[G] LINE_ALIGNED, dcn[H] LINE_ALIGNED;
    for (long b = 0; b < B; b++) {
        if (b + 1 < B) PREFETCH_LINES(dz + (b + 1) * dz_sb, G, 1);  /* the next row's dz, to be written */
        const $real *dhb = dh + b * H, *nb = n + b * G, *ab = act + b * G, *rb = rstd + b * 5;
        const $real *cnb = cn + b * H, *tcb = tc + b * H, *cp = c_prev ? c_prev + b * H : 0;
        $real *dcb = dc + b * H, *dzb = dz + b * dz_sb;
        _Pragma("omp simd")
        for (long k = 0; k < H; k++) {
            const $real so = ab[3 * H + k], t = tcb[k];
            dy[3 * H + k] = dhb[k] * t * so * (1 - so);
            const $real d = dcb[k] + dhb[k] * so * (1 - t * t);
            dgc[k] += d * cnb[k];
            dbc[k] += d;
            dcn[k] = d * gc[k];
        }
        ln_backward_$sfx(H, dcn, cnb, rb[4], dcn);  /* dcn is now d c_pre */
        _Pragma("omp simd")
        for (long k = 0; k < H; k++) {
            const $real si = ab[k], g = ab[H + k], sf = ab[2 * H + k], d = dcn[k];
            dy[k] = d * g * si * (1 - si);
            dy[H + k] = d * si * (1 - g * g);
            dy[2 * H + k] = (cp ? d * cp[k] : 0) * sf * (1 - sf);
            dcb[k] = d * sf;
        }
        _Pragma("omp simd")
        for (long k = 0; k < G; k++) {
            dgamma[k] += dy[k] * nb[k];
            dbeta[k] += dy[k];
            dy[k] *= gamma[k];
        }
        for (long q = 0; q < 4; q++) ln_backward_$sfx(H, dy + q * H, nb + q * H, rb[q], dzb + q * H);
    }
}
#endif

#ifndef PENDING_DV
/* The FW-LSTM's backward (S = 1) sums v_t's gradient over the GQ rows of every read that saw it (j >= t):
   the rows j > t are the same for the next steps down. So every PENDING_DV + 1 steps one pass over those
   rows also sums the next PENDING_DV vectors' shares of them (combine_outs), and the steps between add
   only the rows since: the rows come in from L2 about a third as often (FW-LSTM steps 2-5% faster). */
#define PENDING_DV 3
#endif
/* The FW-LSTM's stored vector v = ReLU(n gamma + beta) over the memory's gates (n: the normalised gates),
   in one place, so that the sequence loops' backward recomputes it (one_block, below) with the forward's
   rounding. */
static inline void stored_vector_$sfx(long D, const $real *n, const $real *gamma, const $real *beta,
                                      $real *v) {
    _Pragma("omp simd")
    for (long k = 0; k < D; k++) { const $real z = n[k] * gamma[k] + beta[k]; v[k] = z > 0 ? z : 0; }
}

#if HAS(MODEL_FWLSTM)
/* FW-LSTM, one time step t for every row: z is normalised over all 4H gates (i, f, o, g) with gain gamma
   and bias beta; the memory holds v = ReLU(ẑ[m0:]) (D = 4H - m0) and S reads a_s = A(t) q_s, q_0 = v,
   q_s = ReLU(ẑ[m0:] + a_{s-1}), kept in GQ's rows 2r+1 (r = tS + s) with their weighted dots in SG's rows 2r.
   gates = ẑ + fb, gates[m0:] += a_{S-1}; i, f, o are sigmoids, g a ReLU;
   c = LN_c(c_prev σf + σi g), h = ReLU(c) σo. Saves n (normalised z), act (σi, σf, σo, g), rstd (z, cell),
   cn (normalised c_pre), c; writes h. w: the memory's weights, w[T-1-j] = η λ^j. */
void fwlstm_forward_$sfx(long B, long H, long m0, long t, long S, long T, const $real *hw, const $real *xw,
                         long xw_sb,
                         const $real *gamma, const $real *beta, const $real *fb, const $real *gc,
                         const $real *bc, const $real *c_prev, $real *V, long v_sb, long v_sk,
                         $real *GQ, long gq_sb, long gq_sj, $real *SG, long sg_sb, long sg_sj,
                         const $real *w, $real *n, $real *act, $real *rstd, $real *cn, $real *c, $real *h,
                         long h_sb) {
    ASSUME_HIDDEN(H);
    const long G = 4 * H, D = G - m0, reads = t + 1;
    const $real *wt = w + T - reads;
    $real zb[G] LINE_ALIGNED, zh[G] LINE_ALIGNED, a[D] LINE_ALIGNED;
    for (long b = 0; b < B; b++) {
        if (b + 1 < B) {  /* the next row's saved rows, to be written */
            const long r = b + 1;
            PREFETCH_FWLSTM_ROW(n + r * G, act + r * G, cn + r * H, c + r * H, G, H, 1)
        }
        gate_inputs_$sfx(G, hw ? hw + b * G : 0, xw + b * xw_sb, zb);
        $real *nb = n + b * G, *ab = act + b * G, *rb = rstd + b * 2;
        $real *Vb = V + b * v_sb, *GQb = GQ + b * gq_sb, *SGb = SG + b * sg_sb;
        $real mean;
        ln_stats_$sfx(G, zb, &mean, rb);
        const $real r0 = rb[0];
        $real *v = Vb + t * v_sk;
        _Pragma("omp simd")
        for (long k = 0; k < G; k++) {
            nb[k] = (zb[k] - mean) * r0;
            zh[k] = nb[k] * gamma[k] + beta[k];
        }
        stored_vector_$sfx(D, nb + m0, gamma + m0, beta + m0, v);
        for (long s = 0; s < S; s++) {
            const long r = t * S + s;
            $real *q = GQb + (2 * r + 1) * gq_sj, *sg = SGb + 2 * r * sg_sj;
            if (s == 0) {
                if (q != v) for (long k = 0; k < D; k++) q[k] = v[k];
            } else {
                _Pragma("omp simd")
                for (long k = 0; k < D; k++) { const $real x = zh[m0 + k] + a[k]; q[k] = x > 0 ? x : 0; }
            }
            dots_$sfx(reads, D, q, Vb, v_sk, wt, sg);
            if (s < S - 1)
                combine_$sfx(reads, D, sg, 1, Vb, v_sk, 0, a);
            else  /* the last read adds into the gates: zh[m0:] += a_{S-1} */
                combine_$sfx(reads, D, sg, 1, Vb, v_sk, zh + m0, zh + m0);
        }
        _Pragma("omp simd")
        for (long k = 0; k < 3 * H; k++) ab[k] = sigm_$sfx(zh[k] + fb[k]);
        _Pragma("omp simd")
        for (long k = 3 * H; k < G; k++) ab[k] = zh[k] > 0 ? zh[k] : 0;
        $real *cb = c + b * H, *hb = h + b * h_sb;
        cell_state_$sfx(H, c_prev ? c_prev + b * H : 0, ab, ab + H, ab + 3 * H, gc, bc, cn + b * H, cb,
                        rb + 1);
        _Pragma("omp simd")
        for (long k = 0; k < H; k++) hb[k] = (cb[k] > 0 ? cb[k] : 0) * ab[2 * H + k];
    }
}

/* Its backward, for step t once steps t+1 .. T-1 are done: dh is the gradient of h(t); dc holds that of
   c(t) and gets that of c(t-1). Each read keeps its output gradient g_r in GQ's row 2r and the weighted
   dots w (g_r·v_k) in SG's row 2r+1; v_t's gradient then sums, over every read that saw it (GQ's rows from
   `lo` on), SG[j, t] GQ[j]: computed once, here (with P, the sequence loops' S = 1: in part ahead, see
   PENDING_DV; P holds those partial sums, PENDING_DV rows of p_sk per batch row). Writes dz; adds to the
   gains' and biases' gradients. */
static void fwlstm_backward_rows_$sfx(long B, long H, long m0, long t, long S, long T, long lo, long rows,
                                     const $real *dh, $real *dc, const $real *gamma, const $real *gc,
                                     const $real *n, const $real *act, const $real *rstd, const $real *cn,
                                     const $real *c, const $real *c_prev, $real *V, long v_sb, long v_sk,
                                     $real *GQ, long gq_sb, long gq_sj, $real *SG, long sg_sb, long sg_sj,
                                     const $real *w, $real *dz, long dz_sb, $real *dgamma, $real *dbeta,
                                     $real *dgc, $real *dbc, $real *P, long p_sb, long p_sk) {
    ASSUME_HIDDEN(H);
    const long G = 4 * H, D = G - m0, reads = t + 1;
    const $real *wt = w + T - reads;
    $real dg[G] LINE_ALIGNED, dcn[H] LINE_ALIGNED, dq[D] LINE_ALIGNED;
    for (long b = 0; b < B; b++) {
        if (b + 1 < B) {  /* the next row's saved rows, to be read */
            const long r = b + 1;
            PREFETCH_FWLSTM_ROW(n + r * G, act + r * G, cn + r * H, c + r * H, G, H, 0)
            if (c_prev) PREFETCH_LINES(c_prev + r * H, H, 0);
            PREFETCH_LINES(dz + r * dz_sb, G, 1);  /* to be written */
        }
        const $real *dhb = dh + b * H, *nb = n + b * G, *ab = act + b * G, *rb = rstd + b * 2;
        const $real *cnb = cn + b * H, *cb = c + b * H, *cp = c_prev ? c_prev + b * H : 0;
        $real *Vb = V + b * v_sb, *GQb = GQ + b * gq_sb, *SGb = SG + b * sg_sb;
        $real *dcb = dc + b * H, *dzb = dz + b * dz_sb;
        _Pragma("omp simd")
        for (long k = 0; k < H; k++) {
            const $real so = ab[2 * H + k], ck = cb[k];
            dg[2 * H + k] = dhb[k] * (ck > 0 ? ck : 0) * so * (1 - so);
            const $real d = dcb[k] + (ck > 0 ? dhb[k] * so : 0);
            dgc[k] += d * cnb[k];
            dbc[k] += d;
            dcn[k] = d * gc[k];
        }
        ln_backward_$sfx(H, dcn, cnb, rb[1], dcn);  /* now d c_pre */
        _Pragma("omp simd")
        for (long k = 0; k < H; k++) {
            const $real si = ab[k], sf = ab[H + k], g = ab[3 * H + k], d = dcn[k];
            dg[k] = d * g * si * (1 - si);
            dg[H + k] = (cp ? d * cp[k] : 0) * sf * (1 - sf);
            dg[3 * H + k] = g > 0 ? d * si : 0;
            dcb[k] = d * sf;
        }
        /* the memory: gates[m0:] = ẑ[m0:] + a_{S-1}; q_s = ReLU(ẑ[m0:] + a_{s-1}); q_0 = v_t. Each query's
           masked gradient adds into dg[m0:] itself (no sum of its own: steps 1-3% faster): dg[m0:] is read,
           as the last read's output gradient, before the first of them is added. */
        const $real *da = dg + m0;
        for (long s = S - 1; s >= 0; s--) {
            const long r = t * S + s;
            $real *g_r = GQb + 2 * r * gq_sj, *sg = SGb + (2 * r + 1) * sg_sj;
            const $real *q = GQb + (2 * r + 1) * gq_sj;
            for (long k = 0; k < D; k++) g_r[k] = da[k];
            dots_$sfx(reads, D, g_r, Vb, v_sk, wt, sg);
            if (s == 0 && P) {  /* S = 1, v_t's gradient with its partial sums (PENDING_DV) */
                const long a_off = (T - 1 - t) % (PENDING_DV + 1);
                $real *Pb = P + b * p_sb;
                if (a_off == 0) {
                    $real *outs[4] = {dq, Pb, Pb + p_sk, Pb + 2 * p_sk}, *none[4] = {0, 0, 0, 0};
                    combine_outs_$sfx(1 + (t < PENDING_DV ? (int) t : PENDING_DV), rows - lo, D,
                                      SGb + lo * sg_sj + t, sg_sj, GQb + lo * gq_sj, gq_sj, none, outs);
                } else
                    combine_$sfx(2 * a_off, D, SGb + lo * sg_sj + t, sg_sj, GQb + lo * gq_sj, gq_sj,
                                 Pb + (a_off - 1) * p_sk, dq);
            } else if (s == 0)  /* q_0 is v_t, so add v_t's gradient as a stored vector */
                combine_$sfx(rows - lo, D, SGb + lo * sg_sj + t, sg_sj, GQb + lo * gq_sj, gq_sj, 0, dq);
            else
                for (long k = 0; k < D; k++) dq[k] = 0;
            combine_$sfx(reads, D, sg, 1, Vb, v_sk, dq, dq);
            _Pragma("omp simd")
            for (long k = 0; k < D; k++) { dq[k] = q[k] > 0 ? dq[k] : 0; dg[m0 + k] += dq[k]; }
            da = dq;
        }
        _Pragma("omp simd")
        for (long k = 0; k < G; k++) {
            dgamma[k] += dg[k] * nb[k];
            dbeta[k] += dg[k];
            dg[k] *= gamma[k];
        }
        ln_backward_$sfx(G, dg, nb, rb[0], dzb);
    }
}
void fwlstm_backward_$sfx(long B, long H, long m0, long t, long S, long T, long lo, long rows,
                          const $real *dh, $real *dc, const $real *gamma, const $real *gc,
                          const $real *n, const $real *act, const $real *rstd, const $real *cn,
                          const $real *c, const $real *c_prev, $real *V, long v_sb, long v_sk,
                          $real *GQ, long gq_sb, long gq_sj, $real *SG, long sg_sb, long sg_sj,
                          const $real *w, $real *dz, long dz_sb, $real *dgamma, $real *dbeta, $real *dgc,
                          $real *dbc) {
    fwlstm_backward_rows_$sfx(B, H, m0, t, S, T, lo, rows, dh, dc, gamma, gc, n, act, rstd, cn, c, c_prev,
                              V, v_sb, v_sk, GQ, gq_sb, gq_sj, SG, sg_sb, sg_sj, w, dz, dz_sb, dgamma, dbeta,
                              dgc, dbc, 0, 0, 0);
}
#endif

#if HAS(MODEL_FWRNN)
/* FW-RNN, the inner loop of time step t for every row: S steps h_s = ReLU(LN(slow + A h_{s-1})) with gain
   gamma and bias beta, each read r = r0 + s of the n stored vectors v_0 .. v_{n-1} (n = 0: no read, then
   every h_s = ReLU(LN(slow))). The first query is the stored vector v_{h0_k} (the authors' u, written
   before the step reads) or, when h0_k < 0, ReLU(slow) (Ba et al.). Queries are kept in GQ's rows 2r+1,
   their weighted dots in SG's rows 2r. Saves xh (the normalised pre-activations, [S, B, H]) and rstd
   ([S, B]); writes the last h_s to h (batch stride h_sb) and, when write_k >= 0, into the memory as
   v_{write_k}. slow = hw + xw (rows of x C + b, batch stride xw_sb), either NULL when it adds nothing. */
void fwrnn_forward_$sfx(long B, long H, long S, long T, long n, long r0, long write_k, long h0_k,
                        const $real *hw, const $real *xw, long xw_sb, const $real *gamma, const $real *beta,
                        $real *V, long v_sb,
                        long v_sk, $real *GQ, long gq_sb, long gq_sj, $real *SG, long sg_sb, long sg_sj,
                        const $real *w, $real *xh, $real *rstd, $real *h, long h_sb) {
    ASSUME_HIDDEN(H);
    const $real *wn = w + T - n;
    $real a[H] LINE_ALIGNED, hs[H] LINE_ALIGNED, sb[H] LINE_ALIGNED;
    for (long b = 0; b < B; b++) {
        for (long k = 0; k < H; k++) sb[k] = (hw ? hw[b * H + k] : 0) + (xw ? xw[b * xw_sb + k] : 0);
        $real *Vb = V + b * v_sb, *GQb = GQ + b * gq_sb, *SGb = SG + b * sg_sb;
        if (h0_k >= 0)
            for (long k = 0; k < H; k++) hs[k] = Vb[h0_k * v_sk + k];
        else
            _Pragma("omp simd")
            for (long k = 0; k < H; k++) hs[k] = sb[k] > 0 ? sb[k] : 0;
        for (long s = 0; s < S; s++) {
            $real *x = xh + (s * B + b) * H;
            if (n) {
                const long r = r0 + s;
                $real *q = GQb + (2 * r + 1) * gq_sj;
                for (long k = 0; k < H; k++) q[k] = hs[k];
                dots_$sfx(n, H, q, Vb, v_sk, wn, SGb + 2 * r * sg_sj);
                combine_$sfx(n, H, SGb + 2 * r * sg_sj, 1, Vb, v_sk, sb, a);  /* a = slow + A q */
            } else {
                for (long k = 0; k < H; k++) a[k] = sb[k];
            }
            $real mean;
            ln_stats_$sfx(H, a, &mean, rstd + s * B + b);
            const $real r = rstd[s * B + b];
            _Pragma("omp simd")
            for (long k = 0; k < H; k++) {
                x[k] = (a[k] - mean) * r;
                const $real y = x[k] * gamma[k] + beta[k];
                hs[k] = y > 0 ? y : 0;
            }
        }
        $real *hb = h + b * h_sb;
        for (long k = 0; k < H; k++) hb[k] = hs[k];
        if (write_k >= 0)
            for (long k = 0; k < H; k++) Vb[write_k * v_sk + k] = hs[k];
    }
}

/* Its backward: dh is the gradient of the last h_s; when write_k >= 0 that h is also v_{write_k}, and the
   gradient it has as a stored vector (from every read that saw it: GQ's rows from `lo` on) is added first.
   Writes dslow (batch stride dslow_sb) and, when dq0 is given, the gradient reaching the first query
   (the authors' u) through the reads; without dq0 (Ba) that gradient goes through ReLU(slow) into dslow.
   Adds to the gain's and bias's gradients. */
void fwrnn_backward_$sfx(long B, long H, long S, long T, long n, long r0, long write_k, long lo, long rows,
                         const $real *dh, const $real *gamma, const $real *beta, const $real *xh,
                         const $real *rstd, $real *V, long v_sb, long v_sk, $real *GQ, long gq_sb,
                         long gq_sj, $real *SG, long sg_sb, long sg_sj,
                         const $real *w, $real *dslow, long dslow_sb, $real *dq0, $real *dgamma,
                         $real *dbeta) {
    ASSUME_HIDDEN(H);
    const $real *wn = w + T - n;
    $real dhs[H] LINE_ALIGNED, dx[H] LINE_ALIGNED;
    for (long b = 0; b < B; b++) {
        $real *Vb = V + b * v_sb, *GQb = GQ + b * gq_sb, *SGb = SG + b * sg_sb;
        $real *ds = dslow + b * dslow_sb;
        if (b + 1 < B) PREFETCH_LINES(dslow + (b + 1) * dslow_sb, H, 1);  /* the next row's, to be written */
        if (write_k >= 0)
            combine_$sfx(rows - lo, H, SGb + lo * sg_sj + write_k, sg_sj, GQb + lo * gq_sj, gq_sj, dh + b * H,
                         dhs);
        else
            for (long k = 0; k < H; k++) dhs[k] = dh[b * H + k];
        for (long k = 0; k < H; k++) ds[k] = 0;
        for (long s = S - 1; s >= 0; s--) {
            const $real *x = xh + (s * B + b) * H;
            _Pragma("omp simd")
            for (long k = 0; k < H; k++) {
                const $real d = x[k] * gamma[k] + beta[k] > 0 ? dhs[k] : 0;
                dgamma[k] += d * x[k];
                dbeta[k] += d;
                dx[k] = d * gamma[k];
            }
            ln_backward_$sfx(H, dx, x, rstd[s * B + b], dx);  /* now d pre = d slow + d (A q_s) */
            _Pragma("omp simd")
            for (long k = 0; k < H; k++) ds[k] += dx[k];
            if (!n)
                break;  /* without reads every inner step is the same function of slow: the last one counts */
            const long r = r0 + s;
            $real *g = GQb + 2 * r * gq_sj, *sg = SGb + (2 * r + 1) * sg_sj;
            const $real *q = GQb + (2 * r + 1) * gq_sj;
            for (long k = 0; k < H; k++) g[k] = dx[k];
            dots_$sfx(n, H, g, Vb, v_sk, wn, sg);
            combine_$sfx(n, H, sg, 1, Vb, v_sk, 0, dhs);  /* d q_s */
            if (s > 0)  /* q_s = h_{s-1} = ReLU(x_{s-1} gamma + beta): the next iteration masks it */
                continue;
            if (dq0) {
                for (long k = 0; k < H; k++) dq0[b * H + k] = dhs[k];
            } else {
                _Pragma("omp simd")
                for (long k = 0; k < H; k++) ds[k] += q[k] > 0 ? dhs[k] : 0;  /* q_0 = ReLU(slow) */
            }
        }
        if (!n && dq0)
            for (long k = 0; k < H; k++) dq0[b * H + k] = 0;
    }
}
#endif
""")

SEQUENCES = Template(r"""
/* Whole sequences: the time loop in C, calling a GEMM for the slow products (`gemm`: oneDNN's brgemm
   through torch, or the BLAS's through `blas_rowmajor_gemm`; matmul.sequence_gemm picks it). The rows run
   in blocks of rb, each block through all T steps before the next: a block's memory (the FW-LSTM's stored
   vectors and read gradients, 64 KB a row at H = 100) then stays in L2 from one step to the next instead
   of coming from L3 at every step. Buffers as native_cells.py's: T-major [T, B, ...] ones, the
   batch-major xW, Hprev and dZ [B, T, ...]. */
typedef void (*gemm_$sfx)(long M, long N, long K, long lda, long ldb, long ldc, _Bool add, const $real *A,
                          const $real *B, $real *C, _Bool vnni);
typedef void (*fortran_gemm_$sfx)(const char *ta, const char *tb, const int *m, const int *n, const int *k,
                                  const $real *alpha, const $real *a, const int *lda, const $real *b,
                                  const int *ldb, const $real *beta, $real *c, const int *ldc);
static fortran_gemm_$sfx blas_$sfx;
#if HAS_SHARED
void use_blas_$sfx(void *f) { blas_$sfx = (fortran_gemm_$sfx) f; }
/* C = A B (+ C when add) for row-major A [M, K], B [K, N], C [M, N], through the BLAS's column-major
   ?gemm_ (Cᵀ = Bᵀ Aᵀ), with brgemm's arguments. */
void blas_rowmajor_gemm_$sfx(long M, long N, long K, long lda, long ldb, long ldc, _Bool add,
                             const $real *A, const $real *B, $real *C, _Bool vnni) {
    const int m = N, n = M, k = K, la = ldb, lb = lda, lc = ldc;
    const $real one = 1, beta = add ? 1 : 0;
    (void) vnni;
    blas_$sfx("N", "N", &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
}
#endif

/* Step t's rows of x W_x + b for rows b0 .. b0 + nb - 1: of xW [B, T, G] in place (batch stride T G), or,
   with `tokens` [B, T], gathered from the projected vocabulary xW [V, G] into xg [nb, G] (batch stride G),
   a copy of rows in L1 instead of the [B, T, G] tensor a lookup would have written. */
static inline const $real *inputs_at_$sfx(const $real *xW, const long *tokens, $real *xg, long b0, long nb,
                                          long t, long T, long G, long *xw_sb) {
    if (!tokens) { *xw_sb = T * G; return xW + b0 * T * G + t * G; }
    for (long i = 0; i < nb; i++) memcpy(xg + i * G, xW + tokens[(b0 + i) * T + t] * G, G * sizeof($real));
    *xw_sb = G;
    return xg;
}

/* With `tokens`: the projected vocabulary's gradient, dtable[token] += dz for step t's rows (dz rows at
   batch stride T G). */
static inline void scatter_add_$sfx(const long *tokens, $real *dtable, const $real *dz, long b0, long nb,
                                    long t, long T, long G) {
    if (!tokens) return;
    for (long i = 0; i < nb; i++) {
        $real *d = dtable + tokens[(b0 + i) * T + t] * G;
        const $real *z = dz + i * T * G;
        _Pragma("omp simd")
        for (long k = 0; k < G; k++) d[k] += z[k];
    }
}

/* dWT [n, m] (+)= Xᵀ dY over K rows (X [K, n], dY [K, m]: a linear map's weight gradient, transposed), as
   products of `chunk` rows: X's rows transposed into XT [n, chunk] (brgemm takes no transposed operand).
   Called by the backward loops for each block of rows while its dZ and h(t-1) are still in L2. */
static void transpose_$sfx(long rows, long cols, const $real *x, $real *out) {
    for (long i = 0; i < cols; i++)
        for (long j = 0; j < rows; j++) out[i * rows + j] = x[j * cols + i];
}

static void weight_grad_rows_$sfx(gemm_$sfx gemm, long K, long n, long m, long chunk, const $real *X,
                                  const $real *dY, $real *XT, $real *dWT, int add) {
    for (long k0 = 0; k0 < K; k0 += chunk) {
        const long kc = K - k0 < chunk ? K - k0 : chunk;
        transpose_$sfx(kc, n, X + k0 * n, XT);
        gemm(n, m, kc, kc, m, m, add || k0 > 0, XT, dY + k0 * m, dWT, 0);
    }
}

/* Where step t of rows b0.. writes h(t): Hprev[b0, t + 1] (batch stride T H), the last into h_last. */
static inline $real *hidden_out_$sfx($real *Hprev, $real *h_last, long b0, long t, long T, long H,
                                     long *h_sb) {
    if (t + 1 < T) { *h_sb = T * H; return Hprev + b0 * T * H + (t + 1) * H; }
    *h_sb = H;
    return h_last + b0 * H;
}

/* The time loop every model shares, for blocks of rb rows, each block through all T steps. G is the
   width of the step's product (4H for the LSTMs, H for the FW-RNN). Forward, per step: hw = h(t-1) W_hᵀ
   (none at t = 0: h(-1) = 0), then the model's `step` for the block's rows, with their inputs (xW's rows,
   or those gathered at the tokens) and where h(t) goes. Backward, per step, last first: the model's `step`
   writes dz(t) into the batch-major dZ; the vocabulary's gradient takes it where there are tokens;
   dh(t-1) = dz(t) W_h; then the block's share of dW_h, while its rows are still in L2. */
typedef void (*step_forward_$sfx)(const void *model, long b0, long nb, long t, const $real *hw,
                                  const $real *xw, long xw_sb, $real *h, long h_sb);
typedef void (*step_backward_$sfx)(const void *model, long b0, long nb, long t, const $real *dh, $real *dz);

static void sequence_forward_$sfx(gemm_$sfx gemm, long B, long T, long H, long G, long rb,
                                  const $real *W_hT, const $real *xW, const long *tokens, $real *xg,
                                  $real *Hprev, $real *h_last, $real *hw, step_forward_$sfx step,
                                  const void *model) {
    for (long b0 = 0; b0 < B; b0 += rb) {
        const long nb = B - b0 < rb ? B - b0 : rb;
        for (long t = 0; t < T; t++) {
            if (t) gemm(nb, G, H, T * H, G, G, 0, Hprev + b0 * T * H + t * H, W_hT, hw, 0);
            long h_sb, xw_sb;
            $real *h = hidden_out_$sfx(Hprev, h_last, b0, t, T, H, &h_sb);
            const $real *xw = inputs_at_$sfx(xW, tokens, xg, b0, nb, t, T, G, &xw_sb);
            step(model, b0, nb, t, t ? hw : 0, xw, xw_sb, h, h_sb);
        }
    }
}

static void sequence_backward_$sfx(gemm_$sfx gemm, long B, long T, long H, long G, long rb,
                                   const $real *W_h, const $real *grad_h, $real *dZ, $real *dh,
                                   const long *tokens, $real *dtable, const $real *Hprev, long chunk,
                                   $real *HT, $real *dWT, $real *dW_h, step_backward_$sfx step,
                                   const void *model) {
    for (long b0 = 0; b0 < B; b0 += rb) {
        const long nb = B - b0 < rb ? B - b0 : rb;
        const $real *dh_t = grad_h + b0 * H;
        for (long t = T - 1; t >= 0; t--) {
            $real *dz = dZ + b0 * T * G + t * G;
            step(model, b0, nb, t, dh_t, dz);
            scatter_add_$sfx(tokens, dtable, dz, b0, nb, t, T, G);
            if (t) { gemm(nb, H, G, T * G, H, H, 0, dz, W_h, dh, 0); dh_t = dh; }
        }
        weight_grad_rows_$sfx(gemm, nb * T, H, G, chunk, Hprev + b0 * T * H, dZ + b0 * T * G, HT, dWT,
                              b0 > 0);
    }
    transpose_$sfx(H, G, dWT, dW_h);
}

#if HAS(MODEL_LNLSTM)
/* Each model: its buffers, and its step for rows b0 .. b0 + nb - 1 (o: row b0 of step t in the T-major
   buffers). LN-LSTM: */
struct lnlstm_fw_$sfx {
    long B, H;
    const $real *gamma, *beta, *gc, *bc;
    $real *N, *ACT, *R, *CN, *C, *TC;
};
static void lnlstm_step_$sfx(const void *model, long b0, long nb, long t, const $real *hw, const $real *xw,
                             long xw_sb, $real *h, long h_sb) {
    const struct lnlstm_fw_$sfx *m = model;
    const long B = m->B, H = m->H, G = 4 * H, o = t * B + b0;
    lnlstm_forward_$sfx(nb, H, hw, xw, xw_sb, m->gamma, m->beta, m->gc, m->bc, t ? m->C + (o - B) * H : 0,
                        m->N + o * G, m->ACT + o * G, m->R + o * 5, m->CN + o * H, m->C + o * H,
                        m->TC + o * H, h, h_sb);
}
void lnlstm_sequence_forward_$sfx(gemm_$sfx gemm, long B, long T, long H, long rb, const $real *W_hT,
                                  const $real *xW, const long *tokens, $real *xg, const $real *gamma,
                                  const $real *beta, const $real *gc, const $real *bc, $real *N, $real *ACT,
                                  $real *R, $real *CN, $real *C, $real *TC, $real *Hprev, $real *h_last,
                                  $real *hw) {
    const struct lnlstm_fw_$sfx m = {B, H, gamma, beta, gc, bc, N, ACT, R, CN, C, TC};
    sequence_forward_$sfx(gemm, B, T, H, 4 * H, rb, W_hT, xW, tokens, xg, Hprev, h_last, hw,
                          lnlstm_step_$sfx, &m);
}

struct lnlstm_bw_$sfx {
    long B, T, H;
    const $real *gamma, *gc, *N, *ACT, *R, *CN, *TC, *C;
    $real *dc, *dgamma, *dbeta, *dgc, *dbc;
};
static void lnlstm_step_backward_$sfx(const void *model, long b0, long nb, long t, const $real *dh,
                                      $real *dz) {
    const struct lnlstm_bw_$sfx *m = model;
    const long B = m->B, H = m->H, G = 4 * H, o = t * B + b0;
    lnlstm_backward_$sfx(nb, H, dh, m->dc + b0 * H, m->gamma, m->gc, m->N + o * G, m->ACT + o * G,
                         m->R + o * 5, m->CN + o * H, m->TC + o * H, t ? m->C + (o - B) * H : 0, dz,
                         m->T * G, m->dgamma, m->dbeta, m->dgc, m->dbc);
}
/* dc [B, H] zeroed; dh a scratch [rb, H]. */
void lnlstm_sequence_backward_$sfx(gemm_$sfx gemm, long B, long T, long H, long rb, const $real *W_h,
                                   const $real *grad_h, const $real *gamma, const $real *gc,
                                   const $real *N, const $real *ACT, const $real *R, const $real *CN,
                                   const $real *TC, const $real *C, $real *dZ, $real *dc, $real *dh,
                                   $real *dgamma, $real *dbeta, $real *dgc, $real *dbc, const long *tokens,
                                   $real *dtable, const $real *Hprev, long chunk, $real *HT, $real *dWT,
                                   $real *dW_h) {
    const struct lnlstm_bw_$sfx m = {B, T, H, gamma, gc, N, ACT, R, CN, TC, C, dc, dgamma, dbeta, dgc, dbc};
    sequence_backward_$sfx(gemm, B, T, H, 4 * H, rb, W_h, grad_h, dZ, dh, tokens, dtable, Hprev, chunk, HT,
                           dWT, dW_h, lnlstm_step_backward_$sfx, &m);
}

#endif
#if HAS(MODEL_FWLSTM)
/* FW-LSTM (its memory: V, GQ, SG with their batch and row strides, and the weights w). one_block (S = 1,
   V the query rows of GQ): V and GQ hold one block's rows, which every block reuses, so the memory stays in
   L2 and is never written out for the backward; the backward recomputes a block's stored vectors from the
   saved normalised gates when it starts the block. */
struct fwlstm_$sfx {
    long B, T, H, m0, S, rows, one_block;
    const long *lo;  /* lo[t]: the first GQ row of a read that saw v_t (backward) */
    const $real *gamma, *beta, *fb, *gc, *bc, *w;
    $real *V, *GQ, *SG;
    long v_sb, v_sk, gq_sb, gq_sj, sg_sb, sg_sj;
    $real *N, *ACT, *R, *CN, *C;
    $real *dc, *dgamma, *dbeta, *dgc, *dbc;
    $real *P;  /* backward, S = 1: a block's partial sums of stored vectors' gradients (PENDING_DV) */
    long p_sb, p_sk;
};
static void fwlstm_step_$sfx(const void *model, long b0, long nb, long t, const $real *hw, const $real *xw,
                             long xw_sb, $real *h, long h_sb) {
    const struct fwlstm_$sfx *m = model;
    const long B = m->B, H = m->H, G = 4 * H, o = t * B + b0, mb = m->one_block ? 0 : b0;
    fwlstm_forward_$sfx(nb, H, m->m0, t, m->S, m->T, hw, xw, xw_sb, m->gamma, m->beta, m->fb, m->gc, m->bc,
                        t ? m->C + (o - B) * H : 0, m->V + mb * m->v_sb, m->v_sb, m->v_sk,
                        m->GQ + mb * m->gq_sb, m->gq_sb, m->gq_sj, m->SG + b0 * m->sg_sb, m->sg_sb, m->sg_sj,
                        m->w, m->N + o * G, m->ACT + o * G, m->R + o * 2, m->CN + o * H, m->C + o * H, h,
                        h_sb);
    if (t + 1 < m->T) {  /* the next step's first row (the cell asks for the others), during its product */
        const long p = o + B;
        PREFETCH_FWLSTM_ROW(m->N + p * G, m->ACT + p * G, m->CN + p * H, m->C + p * H, G, H, 1)
    }
}
static void fwlstm_step_backward_$sfx(const void *model, long b0, long nb, long t, const $real *dh,
                                      $real *dz) {
    const struct fwlstm_$sfx *m = model;
    const long B = m->B, H = m->H, G = 4 * H, o = t * B + b0, mb = m->one_block ? 0 : b0, m0 = m->m0;
    if (m->one_block && t == m->T - 1)  /* a new block: its stored vectors again */
        for (long s = 0; s < m->T; s++) {
            if (s + 1 < m->T)  /* step s + 1's rows (one run of nb rows), while step s's are computed */
                PREFETCH_LINES(m->N + ((s + 1) * B + b0) * G, nb * G, 0);
            for (long b = 0; b < nb; b++)
                stored_vector_$sfx(G - m0, m->N + (s * B + b0 + b) * G + m0, m->gamma + m0, m->beta + m0,
                                   m->V + b * m->v_sb + s * m->v_sk);
        }
    fwlstm_backward_rows_$sfx(nb, H, m0, t, m->S, m->T, m->lo[t], m->rows, dh, m->dc + b0 * H, m->gamma,
                              m->gc, m->N + o * G, m->ACT + o * G, m->R + o * 2, m->CN + o * H, m->C + o * H,
                              t ? m->C + (o - B) * H : 0, m->V + mb * m->v_sb, m->v_sb, m->v_sk,
                              m->GQ + mb * m->gq_sb, m->gq_sb, m->gq_sj, m->SG + b0 * m->sg_sb, m->sg_sb,
                              m->sg_sj, m->w, dz, m->T * G, m->dgamma, m->dbeta, m->dgc, m->dbc, m->P,
                              m->p_sb, m->p_sk);
    if (t > 0) {  /* step t - 1's first row (the cell asks for the others), during the products between */
        const long p = o - B;
        PREFETCH_FWLSTM_ROW(m->N + p * G, m->ACT + p * G, m->CN + p * H, m->C + p * H, G, H, 0)
        if (t > 1) PREFETCH_LINES(m->C + (p - B) * H, H, 0);
        PREFETCH_LINES(dz - G, G, 1);
    }
}
void fwlstm_sequence_forward_$sfx(gemm_$sfx gemm, long B, long T, long H, long rb, long m0, long S,
                                  long one_block, const $real *W_hT, const $real *xW, const long *tokens,
                                  $real *xg, const $real *gamma, const $real *beta, const $real *fb,
                                  const $real *gc, const $real *bc, $real *V, long v_sb, long v_sk,
                                  $real *GQ, long gq_sb, long gq_sj, $real *SG, long sg_sb, long sg_sj,
                                  const $real *w, $real *N, $real *ACT, $real *R, $real *CN, $real *C,
                                  $real *Hprev, $real *h_last, $real *hw) {
    const struct fwlstm_$sfx m = {.B = B, .T = T, .H = H, .m0 = m0, .S = S, .one_block = one_block,
                                  .gamma = gamma, .beta = beta, .fb = fb, .gc = gc, .bc = bc, .w = w, .V = V,
                                  .GQ = GQ, .SG = SG,
                                  .v_sb = v_sb, .v_sk = v_sk, .gq_sb = gq_sb, .gq_sj = gq_sj, .sg_sb = sg_sb,
                                  .sg_sj = sg_sj, .N = N, .ACT = ACT, .R = R, .CN = CN, .C = C};
    sequence_forward_$sfx(gemm, B, T, H, 4 * H, rb, W_hT, xW, tokens, xg, Hprev, h_last, hw,
                          fwlstm_step_$sfx, &m);
}
/* The saved buffers are only read here; the struct's pointers are not const for the forward's sake. */
void fwlstm_sequence_backward_$sfx(gemm_$sfx gemm, long B, long T, long H, long rb, long m0, long S,
                                   long one_block, const long *lo, long rows, const $real *W_h,
                                   const $real *grad_h, const $real *gamma, const $real *beta,
                                   const $real *gc, $real *N, $real *ACT, $real *R, $real *CN, $real *C,
                                   $real *V, long v_sb, long v_sk, $real *GQ, long gq_sb, long gq_sj,
                                   $real *SG, long sg_sb, long sg_sj, const $real *w, $real *dZ,
                                   $real *dc, $real *dh, $real *dgamma, $real *dbeta, $real *dgc, $real *dbc,
                                   const long *tokens, $real *dtable, const $real *Hprev, long chunk,
                                   $real *HT, $real *dWT, $real *dW_h) {
    const long D = 4 * H - m0, p_sk = (D + 15) / 16 * 16, p_sb = PENDING_DV * p_sk;
    $real *P = S == 1 ? aligned_alloc(64, (rb * p_sb * sizeof(*P) + 63) / 64 * 64) : 0;  /* NULL: as S > 1 */
    const struct fwlstm_$sfx m = {.B = B, .T = T, .H = H, .m0 = m0, .S = S, .rows = rows, .lo = lo,
                                  .one_block = one_block, .gamma = gamma, .beta = beta, .gc = gc, .w = w,
                                  .V = V, .GQ = GQ, .SG = SG,
                                  .v_sb = v_sb, .v_sk = v_sk, .gq_sb = gq_sb, .gq_sj = gq_sj, .sg_sb = sg_sb,
                                  .sg_sj = sg_sj, .N = N, .ACT = ACT, .R = R, .CN = CN, .C = C, .dc = dc,
                                  .dgamma = dgamma, .dbeta = dbeta, .dgc = dgc, .dbc = dbc,
                                  .P = P, .p_sb = p_sb, .p_sk = p_sk};
    sequence_backward_$sfx(gemm, B, T, H, 4 * H, rb, W_h, grad_h, dZ, dh, tokens, dtable, Hprev, chunk, HT,
                           dWT, dW_h, fwlstm_step_backward_$sfx, &m);
    free(P);
}

#endif
#if HAS(MODEL_FWRNN)
/* FW-RNN, Ba et al.'s equations (the authors' variant keeps its time loop in Python): step t's slow input
   W h(t-1) + C x(t), then the inner loop reading h(0) .. h(t-1), and h(t) stored unless t = T - 1. One
   block of all B rows (the memory is H wide: 15 KB a row at H = 100). XH [T, S, B, H], RS [T, S, B]; in
   backward dSlow [B, T, H] gets the gradient of each step's slow input (that of Cx). first_read[k]: the
   first read that saw v_k. */
struct fwrnn_$sfx {
    long B, T, H, S, rows;
    const long *first_read;
    const $real *gamma, *beta, *w;
    $real *V, *GQ, *SG;
    long v_sb, v_sk, gq_sb, gq_sj, sg_sb, sg_sj;
    $real *XH, *RS, *dgamma, *dbeta;
};
static void fwrnn_step_$sfx(const void *model, long b0, long nb, long t, const $real *hw, const $real *xw,
                            long xw_sb, $real *h, long h_sb) {
    const struct fwrnn_$sfx *m = model;
    const long B = m->B, H = m->H, S = m->S;
    (void) b0;
    fwrnn_forward_$sfx(nb, H, S, m->T, t, (t ? t - 1 : 0) * S, t < m->T - 1 ? t : -1, -1, hw, xw, xw_sb,
                       m->gamma, m->beta, m->V, m->v_sb, m->v_sk, m->GQ, m->gq_sb, m->gq_sj, m->SG, m->sg_sb,
                       m->sg_sj, m->w, m->XH + t * S * B * H, m->RS + t * S * B, h, h_sb);
}
static void fwrnn_step_backward_$sfx(const void *model, long b0, long nb, long t, const $real *dh,
                                     $real *dz) {
    const struct fwrnn_$sfx *m = model;
    const long B = m->B, H = m->H, S = m->S, write_k = t < m->T - 1 ? t : -1;
    (void) b0;
    fwrnn_backward_$sfx(nb, H, S, m->T, t, (t ? t - 1 : 0) * S, write_k,
                        write_k >= 0 ? 2 * m->first_read[write_k] : 0, m->rows, dh, m->gamma, m->beta,
                        m->XH + t * S * B * H, m->RS + t * S * B, m->V, m->v_sb, m->v_sk, m->GQ, m->gq_sb,
                        m->gq_sj, m->SG, m->sg_sb, m->sg_sj, m->w, dz, m->T * H, 0, m->dgamma, m->dbeta);
}
void fwrnn_sequence_forward_$sfx(gemm_$sfx gemm, long B, long T, long H, long S, const $real *WT,
                                 const $real *Cx, const $real *gamma, const $real *beta, $real *V, long v_sb,
                                 long v_sk, $real *GQ, long gq_sb, long gq_sj, $real *SG, long sg_sb,
                                 long sg_sj, const $real *w, $real *XH, $real *RS, $real *Hprev,
                                 $real *h_last, $real *hw) {
    const struct fwrnn_$sfx m = {.B = B, .T = T, .H = H, .S = S, .gamma = gamma, .beta = beta, .w = w, .V = V,
                                 .GQ = GQ, .SG = SG, .v_sb = v_sb, .v_sk = v_sk, .gq_sb = gq_sb,
                                 .gq_sj = gq_sj, .sg_sb = sg_sb, .sg_sj = sg_sj, .XH = XH, .RS = RS};
    sequence_forward_$sfx(gemm, B, T, H, H, B, WT, Cx, 0, 0, Hprev, h_last, hw, fwrnn_step_$sfx, &m);
}
void fwrnn_sequence_backward_$sfx(gemm_$sfx gemm, long B, long T, long H, long S, const long *first_read,
                                  long rows, const $real *W, const $real *grad_h, const $real *gamma,
                                  const $real *beta, $real *XH, $real *RS, $real *V, long v_sb, long v_sk,
                                  $real *GQ, long gq_sb, long gq_sj, $real *SG, long sg_sb, long sg_sj,
                                  const $real *w, $real *dSlow, $real *dh, $real *dgamma, $real *dbeta,
                                  const $real *Hprev, long chunk, $real *HT, $real *dWT, $real *dW) {
    const struct fwrnn_$sfx m = {.B = B, .T = T, .H = H, .S = S, .rows = rows, .first_read = first_read,
                                 .gamma = gamma, .beta = beta, .w = w, .V = V, .GQ = GQ, .SG = SG,
                                 .v_sb = v_sb, .v_sk = v_sk, .gq_sb = gq_sb, .gq_sj = gq_sj, .sg_sb = sg_sb,
                                 .sg_sj = sg_sj, .XH = XH, .RS = RS, .dgamma = dgamma, .dbeta = dbeta};
    sequence_backward_$sfx(gemm, B, T, H, H, B, W, grad_h, dSlow, dh, 0, 0, Hprev, chunk, HT, dWT, dW,
                           fwrnn_step_backward_$sfx, &m);
}
#endif
""")

TYPES = (("float", "f32"), ("double", "f64"))


def _typed(real: str, sfx: str) -> str:
    """Every function of the kernels for one C type (`real`), named with its suffix."""
    return "".join(part.substitute(real=real, sfx=sfx) for part in (MEMORY, CELLS, SEQUENCES))


SOURCE = HEADER + "".join(_typed(real, sfx) for real, sfx in TYPES)


def source_for(sfx: str) -> str:
    """The kernels of one type (`f32` or `f64`): a process builds only the type it trains in (float32, as a
    rule): 24 CPU-seconds a library on a 2-core AMD EPYC where both types took 33."""
    return HEADER + _typed(dict((s, r) for r, s in TYPES)[sfx], sfx)


# A hung compiler must not hang the trial; a busy node (every core training) can take minutes to build.
COMPILE_TIMEOUT_S = 600
# -fno-trapping-math: the cells' sigmoid and tanh loops pick a branch per lane (tanh's two ranges, the exp's
# clamps). GCC computes both sides and blends only where it may assume no floating-point operation traps;
# AVX-512's masked operations need no such assumption, so without the flag those loops stayed scalar on
# AVX2-only CPUs: an LN-LSTM step 1.6x as long (docs/benchmarks.md, "AVX2"). The kernels never read
# floating-point exception flags; the results are the same numbers.
#
# -mprefer-vector-width=512 (x86 only): GCC's tuning for Intel's AVX-512 CPUs (-march=native on a Xeon:
# icelake-server, sapphirerapids, ...) vectorises loops 256 bits wide; for AMD's it sets no preference, so
# they run 512 bits wide. The explicit 64-byte vectors are 512 bits either way; the cells' loops (gates, layer
# norm) were not: on an Intel Xeon with AVX-512, the flag made the fused steps 3-11% faster (FW-LSTM,
# LN-LSTM; docs/benchmarks.md, "An Intel Xeon with AVX-512"). Without AVX-512 it changes nothing.
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared",
         *(["-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64") else [])]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
MODELS = ("lnlstm", "fwlstm", "fwrnn")  # each names the source's MODEL_<NAME> (-DFWSWEEP_MODEL=MODEL_<NAME>)
_long, _ptr = ctypes.c_long, ctypes.c_void_p
_MEMORY = [_ptr, _long, _long] * 3 + [_ptr]  # V, GQ, SG (address, batch stride, row stride), weights
SIGNATURES = {
    "column_combine": [_long] * 3 + [_ptr, _long, _long] * 2 + [_ptr, _long] * 2,
    "lnlstm_forward": [_long] * 2 + [_ptr, _ptr, _long] + [_ptr] * 12 + [_long],
    "lnlstm_backward": [_long] * 2 + [_ptr] * 11 + [_long] + [_ptr] * 4,
    "fwlstm_forward": [_long] * 6 + [_ptr, _ptr, _long] + [_ptr] * 6 + _MEMORY + [_ptr] * 6 + [_long],
    "fwlstm_backward": [_long] * 8 + [_ptr] * 10 + _MEMORY + [_ptr, _long] + [_ptr] * 4,
    "fwrnn_forward": [_long] * 8 + [_ptr, _ptr, _long, _ptr, _ptr] + _MEMORY + [_ptr] * 3 + [_long],
    "fwrnn_backward": [_long] * 9 + [_ptr] * 5 + _MEMORY + [_ptr, _long] + [_ptr] * 3,
    "use_blas": [_ptr],
    "lnlstm_sequence_forward": [_ptr] + [_long] * 4 + [_ptr] * 17,
    "lnlstm_sequence_backward": [_ptr] + [_long] * 4 + [_ptr] * 20 + [_long] + [_ptr] * 3,
    "fwlstm_sequence_forward": [_ptr] + [_long] * 7 + [_ptr] * 9 + _MEMORY + [_ptr] * 8,
    "fwrnn_sequence_forward": [_ptr] + [_long] * 4 + [_ptr] * 4 + _MEMORY + [_ptr] * 5,
    "fwrnn_sequence_backward": [_ptr] + [_long] * 4 + [_ptr, _long] + [_ptr] * 6 + _MEMORY + [_ptr] * 5
    + [_long] + [_ptr] * 3,
    "fwlstm_sequence_backward": [_ptr] + [_long] * 7 + [_ptr, _long] + [_ptr] * 10 + _MEMORY + [_ptr] * 10
    + [_long] + [_ptr] * 3,
}


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fwsweep" / "kernels"
    return Path(os.environ.get("FWSWEEP_KERNEL_CACHE", default))


@cache
def cpu_info() -> dict[str, str]:
    """/proc/cpuinfo's fields for the first CPU (the first value of each name); empty where there is none."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if colon:
            info.setdefault(name.strip(), value.strip())
    return info


@cache
def l2_cache_bytes() -> int:
    """The first CPU's L2 cache size from sysfs; 1 MiB where it does not say."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "2":
                size = (index / "size").read_text().strip()
                scale = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
                return int(size.rstrip("KM")) * scale
        except (OSError, ValueError):
            continue
    return 1 << 20


def _cpu_model() -> str:
    """The CPU's model and instruction set: code built with -march=native for one CPU can crash another
    (a folder shared by unlike nodes), so they are part of the cache key."""
    info = cpu_info()
    names = ("model name", "flags", "Features", "CPU part")
    fields = [f"{name}: {info[name]}" for name in names if name in info]
    return "\n".join(fields) or platform.processor() or platform.machine()


def _compile(compiler: list[str], flags: list[str], source: str) -> Path:
    """The cached shared library, built first if missing; in the temp folder if the cache cannot be
    written (a read-only home on a cluster node)."""
    key = hashlib.sha256("\0".join([source, *flags, *compiler, _cpu_model()]).encode()).hexdigest()[:16]
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
    return _build(compiler, flags, folder / f"fw_kernels-{key}.so", source)


def _build(compiler: list[str], flags: list[str], target: Path, text: str) -> Path:
    """`target`, compiled unless there. Trials that start together on a fresh node all want it: the first
    to take the folder's lock for it compiles, the others wait and load its library, instead of each
    compiling the same one (tens of CPU-seconds each, and on a busy node past any timeout). The library
    appears atomically (os.replace), so a reader never sees a half-written one, lock or none."""
    if target.exists():
        return target
    with _build_lock(target):
        if target.exists():  # built by whoever held the lock before us
            return target
        with tempfile.TemporaryDirectory(prefix=".build-", dir=target.parent) as build:
            source, built = Path(build) / "fw_kernels.c", Path(build) / "fw_kernels.so"
            source.write_text(text)
            subprocess.run([*compiler, *flags, str(source), "-o", str(built)], check=True,
                           capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
            os.replace(built, target)
    return target


@contextlib.contextmanager
def _build_lock(target: Path) -> Iterator[None]:
    """An exclusive lock on `.NAME.lock` beside `target`, released by the OS if its holder dies; where the
    folder's file system has no locks, none (each process then builds its own copy, as before)."""
    try:
        handle = open(target.parent / f".{target.stem}.lock", "a")  # noqa: SIM115 (closed below)
    except OSError:
        handle = None
    with handle or contextlib.nullcontext():
        if handle is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@cache
def _library(hidden: int | None = None, sfx: str = "f32", model: str | None = None) -> ctypes.CDLL | None:
    """The kernels of one type (`sfx`: f32 or f64), built for any hidden size (hidden None) or for one
    (ASSUME_HIDDEN in the source), then those of one `model` only (MODELS: HAS in the source)."""
    if hidden is not None:
        if _library(None, sfx) is None:
            return None
        try:
            built = _compile(_compiler(), build_flags(hidden, model), source_for(sfx))
            return _loaded(ctypes.CDLL(str(built)), sfx, model=model)
        except (OSError, subprocess.SubprocessError) as err:  # the general build serves instead
            log.warning("could not build the C kernels for hidden size %s (%s); the ones for any size serve "
                        "(same results, a little slower)", hidden, _said(err))
            return _library(None, sfx)
    if os.environ.get("FWSWEEP_NATIVE", "1") == "0":
        return None
    compiler = _compiler()
    if not compiler:
        _fall_back("no C compiler: neither cc nor gcc is on the PATH and CC is unset")
        return None
    try:
        library = ctypes.CDLL(str(_compile(compiler, build_flags(), source_for(sfx))))
    except (OSError, subprocess.SubprocessError) as err:
        _fall_back(_said(err))
        return None
    return _loaded(library, sfx)


def _said(err: Exception) -> str:
    """What went wrong with a build, in one line: a compiler's last line names its error."""
    if isinstance(err, subprocess.CalledProcessError):
        said = (err.stderr or "").strip().splitlines()
        return (f"{shlex.join(err.cmd[:1])} exited with status {err.returncode}"
                + (f": {said[-1]}" if said else ""))
    if isinstance(err, subprocess.TimeoutExpired):
        return f"{shlex.join(err.cmd[:1])} took more than {err.timeout:.0f} s"
    return str(err)


def build_flags(hidden: int | None = None, model: str | None = None) -> list[str]:
    """The compiler's flags for the library for any hidden size (None) or for one (see ASSUME_HIDDEN), with
    `model` (one of MODELS) one model's kernels only."""
    if model is not None and model not in MODELS:
        raise ValueError(f"{model}: not one of {MODELS}")
    return [*FLAGS, *([f"-DFWSWEEP_HIDDEN={int(hidden)}"] if hidden is not None else []),
            *([f"-DFWSWEEP_MODEL=MODEL_{model.upper()}"] if model is not None else [])]


def _compiler() -> list[str]:
    found = shutil.which("cc") or shutil.which("gcc")
    return shlex.split(os.environ.get("CC", "")) or ([found] if found else [])  # CC may carry flags


def _loaded(library: ctypes.CDLL, *suffixes: str, model: str | None = None) -> ctypes.CDLL:
    """`library` with each function's argument types set, for the types it holds (default: both) and, for
    a library of one model's kernels, that model's functions."""
    for name, argtypes in SIGNATURES.items():
        if model is not None and _model_of(name) != model:
            continue
        for suffix in suffixes or _SUFFIX.values():
            getattr(library, f"{name}_{suffix}").argtypes = argtypes
    return library


def _model_of(name: str) -> str | None:
    """The model whose kernels `name` belongs to (lnlstm_forward: lnlstm); None for the shared ones."""
    prefix = name.split("_", 1)[0]
    return prefix if prefix in MODELS else None


def _fall_back(why: str) -> None:
    log.warning("could not build the fused forms' C kernels (%s); they use torch ops instead (same results, "
                "slower). FWSWEEP_NATIVE=0 skips the build.", why)


def usable_for(like: Tensor) -> bool:
    """Whether the C kernels can serve tensors like `like` (CPU, float32/float64, built)."""
    cpu_type = like.device.type == "cpu" and like.dtype in _SUFFIX
    return cpu_type and _library(None, _SUFFIX[like.dtype]) is not None




def kernel(name: str, dtype: torch.dtype, hidden: int | None = None):
    """The C function `name` for `dtype` (call only where `usable_for` said yes); with `hidden`, from the
    library built for that hidden size and the function's model, which must then be the H of every call
    (see ASSUME_HIDDEN)."""
    model = _model_of(name) if hidden is not None else None
    if hidden is not None and model is None:
        raise ValueError(f"{name}: only a model's kernels are built for one hidden size")
    return getattr(_library(hidden, _SUFFIX[dtype], model), f"{name}_{_SUFFIX[dtype]}")
