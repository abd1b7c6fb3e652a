"""The models of the paper: shapes, the two exact fast-weight forms, the authors' cells, trainability."""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sweep.models import build_model, fused, matmul, model_names, native, native_cells, params_class
from sweep.models.common import count_parameters
from sweep.models.fast_weights import AttentionMemory, MatrixMemory
from sweep.models.fused import FWLSTMSequence, FWRNNSequence, LNLSTMSequence

VOCAB, CLASSES = 37, 10
SMALL = {"hidden_size": 6, "embed_size": 5, "head_size": 7}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest and does not fight other jobs on a shared CI machine. Per test
    (it costs nothing): a module-scoped fixture would make the module one unit of xdist's work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(name: str, dtype=torch.float64, seed: int = 0, **fields):
    torch.manual_seed(seed)
    return build_model(params_class(name)(**{**SMALL, **fields}), VOCAB, CLASSES).to(dtype)


def tokens(batch: int = 3, length: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def outputs_and_grads(model, x):
    model.zero_grad()
    logits = model(x)
    (logits * torch.linspace(-1, 1, CLASSES, dtype=logits.dtype, device=logits.device)).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def assert_same_function(reference, candidate, x, tol: float = 1e-9) -> None:
    """Outputs and every parameter's gradient agree to a relative `tol`."""
    out_r, grads_r = outputs_and_grads(reference, x)
    out_c, grads_c = outputs_and_grads(candidate, x)
    assert rel_err(out_c, out_r) < tol
    for param_name, grad in grads_r.items():
        assert rel_err(grads_c[param_name], grad) < tol, param_name


PROJECTING = [("ln_lstm", {}), ("fw_lstm", {}), ("fw_rnn", {"variant": "ba"}),
              ("fw_rnn", {"variant": "authors"}), ("fw_lstm", {"fw_form": "matrix"})]


@pytest.mark.parametrize(("name", "fields"), PROJECTING)
def test_the_projected_vocabulary_is_embedding_then_projection(name, fields):
    """SequenceClassifier feeds (E W_x + b)[tokens] when a batch has at least as many tokens as the
    vocabulary: the same outputs and gradients as embedding each token and projecting it."""
    x = tokens(batch=5, length=11)
    assert x.numel() >= VOCAB  # the lookup path
    model, reference = make(name, **fields), make(name, **fields)
    for m in (model, reference):  # biases start at zero: move every parameter, the same way in both
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for param in m.parameters():
                param.add_(0.1 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    projected = []  # what the projection is applied to: the vocabulary [V, E] or every token [B, T, E]
    model.recurrent.input_proj.register_forward_hook(lambda _, args, _out: projected.append(args[0].shape))
    # the textbook composition: embed each token, then project it
    reference.forward = lambda x: reference.head(reference.recurrent(reference.embed(x)))
    assert_same_function(reference, model, x, tol=1e-13)
    assert projected == [(VOCAB, SMALL["embed_size"])]
    model(tokens(batch=1, length=9))  # 9 tokens < 37: embedding, then projection
    assert projected[1:] == [(1, 9, SMALL["embed_size"])]


@pytest.mark.parametrize("name", model_names())
def test_every_model_maps_tokens_to_logits(name):
    model = make(name, dtype=torch.float32, hidden_size=20)
    logits = model(tokens(batch=4, length=11))
    assert logits.shape == (4, CLASSES) and logits.dtype == torch.float32
    with torch.no_grad():  # evaluation takes the same path without a graph (nn.LSTM: another kernel)
        assert torch.allclose(model(tokens(batch=4, length=11)), logits, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(logits).all()
    assert count_parameters(model) == sum(p.numel() for p in model.parameters()) > 0
    assert make(name)(tokens()).dtype == torch.float64


def test_memory_forms_equal_the_explicit_sum():
    torch.manual_seed(0)
    B, D, T, eta, lam = 2, 5, 6, 0.5, 0.9
    v = torch.randn(T, B, D, dtype=torch.float64)
    q = torch.randn(B, D, dtype=torch.float64)
    matrix, attention = MatrixMemory(eta, lam), AttentionMemory(eta, lam, T, like=q)
    assert matrix.read(q).abs().max() == 0 and attention.read(q).abs().max() == 0  # A(0) = 0
    for t in range(T):
        matrix.write(v[t])
        attention.write(v[t])
        A = sum(eta * lam ** (t - s) * v[s, :, :, None] * v[s, :, None, :] for s in range(t + 1))
        expected = (A @ q[:, :, None])[:, :, 0]
        assert rel_err(matrix.read(q), expected) < 1e-12
        assert rel_err(attention.read(q), expected) < 1e-12


FAST_WEIGHT_MODELS = [
    ("fw_rnn", {"variant": "ba"}),
    ("fw_rnn", {"variant": "authors"}),
    ("fw_lstm", {"memory": "gates"}),
    ("fw_lstm", {"memory": "candidate"}),
]


@pytest.mark.parametrize("inner_steps", [1, 2])
@pytest.mark.parametrize(("name", "fields"), FAST_WEIGHT_MODELS)
def test_attention_form_equals_matrix_form_with_gradients(name, fields, inner_steps):
    # eta and lambda larger than the defaults so that the memory dominates the slow path
    kw = {**fields, "inner_steps": inner_steps, "fast_lr": 0.9, "decay": 0.95}
    assert_same_function(make(name, fw_form="matrix", **kw), make(name, fw_form="attention", **kw), tokens())


@pytest.mark.parametrize("inner_steps", [1, 2, 3])
@pytest.mark.parametrize(
    ("name", "fields"), [*FAST_WEIGHT_MODELS, ("fw_lstm", {"memory": "gates", "authors_inner_loop": True})]
)
def test_fused_form_equals_matrix_form_with_gradients(name, fields, inner_steps):
    kw = {**fields, "inner_steps": inner_steps, "fast_lr": 0.9, "decay": 0.95}
    matrix, fused = make(name, fw_form="matrix", **kw), make(name, fw_form="fused", **kw)
    assert_same_function(matrix, fused, tokens(length=7))


def test_fused_ln_lstm_equals_the_autograd_cell_with_gradients():
    assert_same_function(make("ln_lstm", cell_form="autograd"), make("ln_lstm", cell_form="fused"), tokens())


def test_the_fastest_exact_forms_are_the_defaults():
    assert params_class("fw_lstm")(hidden_size=4).fw_form == "fused"
    assert params_class("fw_rnn")(hidden_size=4).fw_form == "fused"
    assert params_class("ln_lstm")(hidden_size=4).cell_form == "fused"


def _f64(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()


@pytest.mark.parametrize(("reads", "candidate"), [(1, False), (2, False), (2, True)])
def test_fused_fw_lstm_passes_gradcheck(reads, candidate):
    B, T, H = 2, 4, 3
    inputs = (_f64(B, T, 4 * H), _f64(4 * H, H, seed=1), _f64(4 * H, seed=2), _f64(4 * H, seed=3),
              _f64(H, seed=4), _f64(H, seed=5), 1.0, 0.7, 0.9, reads, candidate)
    assert torch.autograd.gradcheck(FWLSTMSequence.apply, inputs)


@pytest.mark.parametrize(("reads", "authors"), [(1, False), (2, False), (2, True)])
def test_fused_fw_rnn_passes_gradcheck(reads, authors):
    B, T, H = 2, 4, 3
    inputs = (_f64(B, T, H), _f64(H, H, seed=1), _f64(H, seed=2), _f64(H, seed=3), 0.7, 0.9, reads, authors)
    assert torch.autograd.gradcheck(FWRNNSequence.apply, inputs)


def test_fused_ln_lstm_passes_gradcheck():
    B, T, H = 2, 4, 3
    inputs = (_f64(B, T, 4 * H), _f64(4 * H, H, seed=1), _f64(4, H, seed=2), _f64(4, H, seed=3),
              _f64(H, seed=4), _f64(H, seed=5), 1.0)
    assert torch.autograd.gradcheck(LNLSTMSequence.apply, inputs)


needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc)")


def quick_compiler(folder: Path, calls: Path | None = None) -> Path:
    """A C compiler that builds the kernels at -O1 (its last flag wins over the shipped -O3): about a tenth of
    the CPU time (~2 s instead of ~18 s a library on a slow host), for the tests that check which libraries
    get built and that they compute the same, not how fast they run. With `calls`, it notes each call."""
    cc = shutil.which("cc") or shutil.which("gcc")
    compiler = folder / "cc-quick"
    note = f"echo call >> {calls}\n" if calls is not None else ""
    compiler.write_text(f'#!/bin/sh\n{note}exec {cc} "$@" -O1\n')
    compiler.chmod(0o755)
    return compiler


@needs_cc
@pytest.mark.parametrize(("name", "kernel"), [("ln_lstm", "lnlstm_backward"), ("fw_lstm", "fwlstm_backward"),
                                              ("fw_rnn", "fwrnn_backward")])
def test_the_fused_forms_run_as_c_where_a_compiler_is(monkeypatch, name, kernel):
    """Not a silent fallback: with `cc` on the machine, the fused forms use native.py's kernels."""
    assert native.usable_for(torch.zeros(1)) and native.usable_for(torch.zeros(1).double())
    assert not native.usable_for(torch.zeros(1, dtype=torch.bfloat16))  # torch ops serve other dtypes
    assert list(native.cache_dir().glob("fw_kernels-*.so"))
    calls, original = [], native.kernel
    monkeypatch.setattr(native, "kernel",
                        lambda name, dtype, hidden=None: calls.append(name) or original(name, dtype, hidden))
    outputs_and_grads(make(name), tokens())
    assert kernel in calls, calls


@needs_cc
@pytest.mark.parametrize(("name", "fields"), [*FAST_WEIGHT_MODELS, ("ln_lstm", {})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_built_for_the_hidden_size_equal_the_general_ones(monkeypatch, name, fields, dtype):
    """Each model's C calls go to a library built for its H (ASSUME_HIDDEN: its loops compiled for that
    length), which computes what the library for any H does, to rounding (GCC may order or fuse a
    multiply-add differently in a loop of known length: float64 results differ in the last bits)."""
    kw = {**fields, "hidden_size": 7}
    if name != "ln_lstm":
        kw.update(fast_lr=0.5, decay=0.9)
    x = tokens(batch=5, length=13)
    calls, original = [], native.kernel

    def spy(kernel_name, kernel_dtype, hidden=None):
        calls.append((kernel_name, hidden))
        return original(kernel_name, kernel_dtype, hidden)

    monkeypatch.setattr(native, "kernel", spy)
    out, grads = outputs_and_grads(make(name, dtype=dtype, **kw), x)
    cells = {hidden for kernel_name, hidden in calls if kernel_name.startswith(("lnlstm", "fwlstm", "fwrnn"))}
    assert cells == {7}, calls  # the other kernels (the memory's sums) take no H
    monkeypatch.setattr(native, "kernel", lambda kernel_name, kernel_dtype, hidden=None: original(
        kernel_name, kernel_dtype))
    out_general, grads_general = outputs_and_grads(make(name, dtype=dtype, **kw), x)
    tol = 1e-13 if dtype == torch.float64 else 1e-5  # float32: a sum over batch and time, another ISA
    assert rel_err(out, out_general) < tol
    for param_name, grad in grads_general.items():
        assert rel_err(grads[param_name], grad) < tol, param_name


@needs_cc
@pytest.mark.parametrize("inner_steps", [1, 3])
@pytest.mark.parametrize(("name", "fields"), [*FAST_WEIGHT_MODELS, ("ln_lstm", {})])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_c_kernels_equal_the_torch_ops(monkeypatch, name, fields, inner_steps, dtype, tol):
    # T = 13 and odd sizes: the loops' eight- and four-row blocks (up to 13 stored vectors: 8 + 4 + 1),
    # their remainders, and D not a multiple of 8. η = 0.5, λ = 0.9: with η = 0.9, λ = 0.95 the FW-RNN at
    # S = 3 is so ill-conditioned here that float32 (torch ops or C alike) is 190% off float64
    kw = {**fields, "hidden_size": 7}
    if name != "ln_lstm":
        kw.update(inner_steps=inner_steps, fast_lr=0.5, decay=0.9)
    assert_c_steps_equal_the_torch_ops(monkeypatch, name, kw, dtype, tol)


def assert_c_steps_equal_the_torch_ops(monkeypatch, name: str, kw: dict, dtype: torch.dtype,
                                       tol: float) -> None:
    x = tokens(batch=5, length=13)
    out_c, grads_c = outputs_and_grads(make(name, dtype=dtype, **kw), x)  # C
    monkeypatch.setattr(native, "usable_for", lambda like: False)  # decided per forward call
    out_t, grads_t = outputs_and_grads(make(name, dtype=dtype, **kw), x)  # torch ops (as on CUDA)
    assert rel_err(out_c, out_t) < tol
    for param_name, grad in grads_t.items():
        assert rel_err(grads_c[param_name], grad) < tol, param_name


def test_linear_is_x_times_weight_transposed_through_either_library(monkeypatch):
    """matmul.linear: oneDNN for products big enough where this machine uses it, torch.mm for small ones
    and float64; x weightᵀ either way, for strided inputs (the C steps pass columns of [B, T, H] buffers
    and, for the weight gradients, transposed views)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 19, 100, generator=g)[:, 3]
    weight, other = torch.randn(400, 100, generator=g), torch.randn(300, 200, generator=g)
    calls = []
    real = matmul._onednn_linear
    monkeypatch.setattr(matmul, "_onednn_linear", lambda a, b: calls.append(tuple(a.shape)) or real(a, b))
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 0.0)):
        a, b, c = x.to(dtype), weight.to(dtype), other.to(dtype)
        assert rel_err(matmul.linear(a, b), a @ b.t()) <= tol
        assert rel_err(matmul.linear(a.t(), c.t()), a.t() @ c) <= tol
    small = torch.randn(40, 50, generator=g)  # 40 x 50 x 40: far below the size where oneDNN pays
    assert torch.equal(matmul.linear(small, small), small @ small.t())
    for m, n in ((400, 100), (100, 400)):  # weight gradients: oneDNN copies the smaller operand transposed
        grad_out, inputs = torch.randn(300, m, generator=g), torch.randn(300, n, generator=g)
        assert rel_err(matmul.weight_grad(grad_out, inputs), grad_out.t() @ inputs) <= 1e-6
    assert calls == ([(300, 100), (100, 300), (100, 300), (100, 300)] if matmul.uses_onednn() else [])


def test_onednn_is_chosen_by_the_cpu_and_can_be_switched_off(monkeypatch):
    matmul.uses_onednn.cache_clear()
    try:
        avx512_not_intel = (torch.backends.cpu.get_cpu_capability() == "AVX512"
                            and native.cpu_info().get("vendor_id", "") not in ("GenuineIntel", ""))
        assert matmul.uses_onednn() == avx512_not_intel
        monkeypatch.setenv("FWSWEEP_ONEDNN", "0")
        matmul.uses_onednn.cache_clear()
        assert not matmul.uses_onednn()
    finally:
        matmul.uses_onednn.cache_clear()


@needs_cc
@pytest.mark.skipif(not matmul.uses_onednn(), reason="oneDNN's products serve AVX-512 CPUs not made by Intel")
@pytest.mark.parametrize(("name", "fields"), [*FAST_WEIGHT_MODELS, ("ln_lstm", {})])
def test_c_steps_with_onednn_products_equal_the_torch_ops(monkeypatch, name, fields):
    """The tests above run at sizes where every product is torch.mm; here every one goes through oneDNN
    (with the time loop in Python: in the whole-sequence C loops the products are brgemm's)."""
    monkeypatch.setattr(matmul, "ONEDNN_MIN_MACS", 0)
    monkeypatch.setattr(matmul, "sequence_gemm", lambda dtype: None)
    calls = []
    real = matmul._onednn_linear
    monkeypatch.setattr(matmul, "_onednn_linear", lambda a, b: calls.append(1) or real(a, b))
    kw = {**fields, "hidden_size": 7, **({} if name == "ln_lstm" else {"fast_lr": 0.5, "decay": 0.9})}
    assert_c_steps_equal_the_torch_ops(monkeypatch, name, kw, torch.float32, 1e-5)
    # one per time step at least; the authors' FW-RNN keeps torch's addmm per step (its weight gradients)
    assert len(calls) >= (2 if fields.get("variant") == "authors" else 13)


@needs_cc
@pytest.mark.parametrize(("name", "fields"), [("fw_lstm", {}), ("fw_lstm", {"memory": "candidate"}),
                                              ("fw_lstm", {"inner_steps": 2}), ("ln_lstm", {}),
                                              ("fw_rnn", {}), ("fw_rnn", {"inner_steps": 2})])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_whole_sequence_c_loops_equal_the_python_time_loop(monkeypatch, name, fields, dtype, tol):
    """native.py's sequence loops (time loop in C, rows in blocks, products by brgemm or the BLAS) against
    the time loop in Python (one C call and one `linear` per step). An L2 whose share (L2_SHARE) is 2 rows'
    memory splits the 5 rows into blocks of 2, 2 and 1 (3 and 2 for the candidate memory's smaller rows,
    4 and 1 in float64, whose padding to 64 bytes adds less); the LN-LSTM's dW_h
    (one block of all 65 rows) is summed over products of 16 rows and one of 1, as the FW-RNN's dW (Ba's
    equations; the authors' variant keeps its loop in Python). With S = 1 the FW-LSTM's memory is one
    block's rows, reused by every block, and the backward recomputes the stored vectors."""
    assert matmul.sequence_gemm(dtype) is not None
    kw = {**fields, "hidden_size": 7}
    if name != "ln_lstm":
        kw.update(fast_lr=0.5, decay=0.9)
    row = (2 * 13 * 32 + 2 * 13 * 13) * dtype.itemsize  # GQ's (rows of 28 padded to 64 bytes), SG's bytes
    monkeypatch.setattr(native, "l2_cache_bytes", lambda: math.ceil(2 * row / native_cells.L2_SHARE))
    monkeypatch.setattr(native_cells, "WEIGHT_GRAD_ROWS", 16)
    kept = []  # the FW-LSTM with S = 1 keeps one block's memory (recomputed in the backward), S = 2 all of it
    keep_one_block = fused._DecayedMemory.keep_one_block

    def spy(mem, rows):
        kept.append((keep_one_block(mem, rows), mem.GQ.shape[0]))
        return kept[-1][0]

    monkeypatch.setattr(fused._DecayedMemory, "keep_one_block", spy)
    x = tokens(batch=5, length=13)
    out_c, grads_c = outputs_and_grads(make(name, dtype=dtype, **kw), x)
    if name == "fw_lstm":
        one_block = fields.get("inner_steps", 1) == 1
        candidate_rows = 4 if dtype == torch.float64 else 3
        assert kept == [(one_block, (candidate_rows if "memory" in fields else 2) if one_block else 5)]
    monkeypatch.setattr(matmul, "sequence_gemm", lambda dtype: None)
    out_p, grads_p = outputs_and_grads(make(name, dtype=dtype, **kw), x)
    assert rel_err(out_c, out_p) < tol
    for param_name, grad in grads_p.items():
        assert rel_err(grads_c[param_name], grad) < tol, param_name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [200, 28, 7])
def test_the_memorys_rows_start_on_cache_lines(dtype, dim):
    """Every row of the memory's buffers (queries and read gradients, stored vectors; also one block's
    rows) starts on a 64-byte boundary, so the C kernels' vector loads never straddle two cache lines
    (800-byte rows at D = 200 otherwise start at every other half line: 6% slower FW-LSTM steps)."""
    like = torch.zeros(1, dtype=dtype)
    for read_times in (list(range(5)), [k for k in range(5) for _ in range(2)]):  # S = 1, S = 2
        mem = fused._DecayedMemory(3, 5, dim, read_times, 0.5, 0.9, like)
        buffers = [mem.GQ, mem.V]
        if mem.keep_one_block(2):
            buffers += [mem.GQ, mem.V]
        for buffer in buffers:
            assert buffer.shape[-1] == dim
            rows = [buffer[b, j] for b in range(buffer.shape[0]) for j in range(buffer.shape[1])]
            starts = {row.data_ptr() % 64 for row in rows}
            assert starts == {0}, (dim, dtype, starts)


@needs_cc
@pytest.mark.parametrize("name", ["fw_lstm", "ln_lstm"])
def test_a_token_outside_the_vocabulary_is_an_index_error_as_in_a_lookup(name):
    """The C loops read the projected vocabulary's rows at the tokens: out-of-range ids are refused first,
    as F.embedding refuses them, never read past the table."""
    model = make(name, hidden_size=7)
    x = tokens(batch=5, length=13)
    for bad in (VOCAB, -1):
        x[2, 4] = bad
        with pytest.raises(IndexError):
            model(x)


def test_the_sequence_gemm_is_brgemm_or_the_blas_and_checked_first(monkeypatch):
    """float32: oneDNN's brgemm unless FWSWEEP_ONEDNN=0, then (and for float64) the BLAS's ?gemm_ through
    the row-major adapter; a missing symbol falls back, and a function that gives wrong products is not
    used."""
    if not native.usable_for(torch.zeros(1)):
        pytest.skip("needs the C kernels")
    library = matmul._torch_cpu()
    brgemm = matmul._exported(library, matmul._BRGEMM_F32)
    adapter = {d: ctypes.cast(native.kernel("blas_rowmajor_gemm", d), ctypes.c_void_p).value
               for d in (torch.float32, torch.float64)}
    matmul.sequence_gemm.cache_clear()
    try:
        assert matmul.sequence_gemm(torch.float32) == (brgemm or adapter[torch.float32])
        assert matmul.sequence_gemm(torch.float64) == adapter[torch.float64]
        assert matmul.sequence_gemm(torch.bfloat16) is None
        monkeypatch.setenv("FWSWEEP_ONEDNN", "0")
        matmul.sequence_gemm.cache_clear()
        assert matmul.sequence_gemm(torch.float32) == adapter[torch.float32]
        monkeypatch.setattr(matmul, "_FORTRAN_GEMM", {torch.float32: "no_such_gemm_"})
        matmul.sequence_gemm.cache_clear()
        assert matmul.sequence_gemm(torch.float32) is None
        if brgemm is not None:  # float32's brgemm given float64 matrices: wrong products, caught
            assert matmul._gives_products(brgemm, torch.float32)
            assert not matmul._gives_products(brgemm, torch.float64)
    finally:
        matmul.sequence_gemm.cache_clear()
        monkeypatch.undo()
        matmul.sequence_gemm(torch.float32)  # the adapter's BLAS put back


@needs_cc
def test_float32_kernels_keep_their_activations_accurate_and_nan_as_nan():
    """float32 has its own exp and tanh (vectorised): the gate activations of a C step against torch's,
    over the whole range (saturated at both ends), and a NaN in the input (a diverged trial) must come
    out as NaN, not as a finite number."""
    B, T, H = 64, 2, 50
    xW = torch.randn(B, T, 4 * H, generator=torch.Generator().manual_seed(0))
    gamma, beta = torch.full((4, H), 60.0), torch.zeros(4, H)  # no bias: y = 60 n has one rounding, as in C
    ctx = type("Ctx", (), {})()
    native_cells.ln_lstm_forward(ctx, xW, torch.zeros(4 * H, H), gamma, beta, torch.ones(H), torch.zeros(H))
    N, ACT, *_ = ctx.native_saved
    y = (N.view(T, B, 4, H) * gamma).double()
    expected = torch.sigmoid(y)
    expected[:, :, 1] = torch.tanh(y[:, :, 1])
    assert y.min() < -80 and y.max() > 80
    error = (ACT.view(T, B, 4, H).double() - expected).abs() / expected.abs().clamp_min(1e-30)
    assert error.max() < 3e-7  # torch's own float32 sigmoid and tanh: 1.1e-7 here
    xW[3, 1, 5] = float("nan")
    args = (torch.zeros(4 * H, H), torch.ones(4, H), torch.zeros(4, H), torch.ones(H), torch.zeros(H), 1.0)
    h = LNLSTMSequence.apply(xW, *args)
    assert h[3].isnan().all() and not h[:3].isnan().any() and not h[4:].isnan().any()
    gates = (torch.ones(4 * H), torch.zeros(4 * H))
    h = FWLSTMSequence.apply(xW, args[0], *gates, *args[3:], 0.5, 0.9, 1, False)
    assert h[3].isnan().all() and not h[:3].isnan().any() and not h[4:].isnan().any()


@needs_cc
def test_an_unwritable_kernel_cache_builds_in_the_temp_folder(monkeypatch, tmp_path):
    (tmp_path / "a-file").write_text("")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("FWSWEEP_KERNEL_CACHE", str(tmp_path / "a-file" / "kernels"))
    monkeypatch.setenv("CC", str(quick_compiler(tmp_path)))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    native._library.cache_clear()
    try:
        assert native.usable_for(torch.zeros(1))
        assert len(list((tmp_path / "tmp").glob("fwsweep-kernels-*/fw_kernels-*.so"))) == 1
    finally:
        native._library.cache_clear()


BUILD_WHEN_TOLD = """
import pathlib, sys, time
from sweep.models import native
print("ready", flush=True)
while not pathlib.Path(sys.argv[1]).exists():
    time.sleep(0.05)
library = native._library(7, "f32", "fwlstm")  # the float32 library for any H, then the FW-LSTM's for H = 7
print("built", library is not None and library is not native._library(None, "f32"), flush=True)
"""


@needs_cc
@pytest.mark.slow  # starts three interpreters
def test_trials_starting_together_build_each_library_once(tmp_path):
    """Three processes that want the kernels at the same moment on a fresh node (a sweep's first trials):
    one compiles each library, the others wait for it and load it (before: each compiled both)."""
    calls = tmp_path / "compiler-calls"
    compiler = quick_compiler(tmp_path, calls)  # notes each call (a build still takes seconds: time to race)
    go = tmp_path / "go"
    env = {**os.environ, "CC": str(compiler), "FWSWEEP_KERNEL_CACHE": str(tmp_path / "kernels")}
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_WHEN_TOLD, str(go)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        go.write_text("")
        said = [proc.communicate(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [out.strip() for out, _ in said] == ["built True"] * 3, said
    assert calls.read_text().split() == ["call", "call"]  # the general library and H = 7's, once each
    assert len(list((tmp_path / "kernels").glob("fw_kernels-*.so"))) == 2


def assert_weighted_sums_are_exact(dtype: torch.dtype) -> None:
    """The C weighted sums (native.py's `combine`, through `column_combine`) for every length D up to nine
    vectors and one lane: each chunk shape (whole vectors, a part, the last lanes), with and without an
    initial value, strided weights, and one to five rows (odd and even counts)."""
    lanes = 64 // torch.tensor([], dtype=dtype).element_size()
    B, rows, stride = 2, 5, 3
    combine = native.kernel("column_combine", dtype)
    for D in range(1, 9 * lanes + 2):
        G = _f64(B, rows, D + 1, seed=D).detach().to(dtype)  # rows D + 1 apart: a last lane is not the end
        sg = _f64(B, rows * stride, seed=D + 1).detach().to(dtype)
        init = _f64(B, D, seed=D + 2).detach().to(dtype)
        for n in (1, 2, 5):
            for with_init in (False, True):
                out = torch.full((B, D), float("nan"), dtype=dtype)
                combine(B, n, D, sg.data_ptr(), rows * stride, stride, G.data_ptr(), rows * (D + 1), D + 1,
                        init.data_ptr() if with_init else None, D, out.data_ptr(), D)
                expected = torch.einsum("bj,bjd->bd", sg[:, : n * stride : stride], G[:, :n, :D])
                if with_init:
                    expected = expected + init
                assert rel_err(out, expected) < (1e-12 if dtype == torch.float64 else 1e-6), (D, n, with_init)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_weighted_sums_of_stored_vectors_are_exact_at_every_length(dtype):
    assert_weighted_sums_are_exact(dtype)


def other_vector_width() -> str:
    """The vector width (bytes) the kernels do not take on this host: 32 with AVX-512, else 64."""
    avx512 = "avx512f" in native.cpu_info().get("flags", "").split()
    return "-DFWSWEEP_VECTOR_BYTES=" + ("32" if avx512 else "64")


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", ["-DFWSWEEP_PORTABLE_C", "other width"])
def test_the_portable_lane_sums_equal_the_shuffle_tree(monkeypatch, tmp_path, dtype, variant):
    """The dot products sum each vector's lanes with __builtin_shufflevector where the compiler has it
    (GCC >= 12, Clang) and lane by lane otherwise, and the vectors' last lanes go through masked loads
    with AVX-512 or as half vectors and single lanes without; the vectors are 64 bytes with AVX-512 and 32
    without. The branch this host does not take, built here on purpose, must give the same models (D = 28
    and 7) and exact weighted sums at every length."""
    x = tokens(batch=5, length=13)
    kw = {"hidden_size": 7, "fast_lr": 0.5, "decay": 0.9}
    expected = [outputs_and_grads(make(name, dtype=dtype, **kw), x) for name in ("fw_lstm", "fw_rnn")]
    define = other_vector_width() if variant == "other width" else variant
    monkeypatch.setenv("CC", f"{quick_compiler(tmp_path)} {define}")
    monkeypatch.setenv("FWSWEEP_KERNEL_CACHE", str(tmp_path))
    native._library.cache_clear()
    try:
        portable = [outputs_and_grads(make(name, dtype=dtype, **kw), x) for name in ("fw_lstm", "fw_rnn")]
        # built apart from the cached libraries: the one for any hidden size and each model's for H = 7
        assert len(list(tmp_path.glob("fw_kernels-*.so"))) == 3
        assert_weighted_sums_are_exact(dtype)
    finally:
        native._library.cache_clear()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for (out, grads), (out_p, grads_p) in zip(expected, portable, strict=True):
        assert rel_err(out_p, out) < tol
        for param_name, grad in grads.items():
            assert rel_err(grads_p[param_name], grad) < tol, param_name


def test_without_a_compiler_the_fused_forms_fall_back_to_torch_ops(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("FWSWEEP_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")  # a compiler that fails
    native._library.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="sweep.models.native"):
            assert not native.usable_for(torch.zeros(1))
        assert "/bin/false exited with status 1" in caplog.text and "use torch ops instead" in caplog.text
        left = [p.name for p in tmp_path.iterdir() if p.suffix != ".lock"]  # the build's lock file stays
        assert not left, left  # no half-built library or build folder left in the cache
        for name in ("fw_lstm", "ln_lstm", "fw_rnn"):
            assert torch.isfinite(make(name)(tokens())).all()
        monkeypatch.setenv("FWSWEEP_NATIVE", "0")  # and the switch, with a working compiler
        monkeypatch.delenv("CC")
        native._library.cache_clear()
        assert not native.usable_for(torch.zeros(1))
    finally:
        native._library.cache_clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("name", "fields"), [*FAST_WEIGHT_MODELS, ("ln_lstm", {})])
def test_fused_forms_run_on_cuda_with_the_cpu_numbers(name, fields):
    cpu = make(name, **fields)
    gpu = make(name, **fields).cuda()
    x = tokens()
    out_c, grads_c = outputs_and_grads(cpu, x)
    out_g, grads_g = outputs_and_grads(gpu, x.cuda())
    assert rel_err(out_g.cpu(), out_c) < 1e-9
    for param_name, grad in grads_c.items():
        assert rel_err(grads_g[param_name].cpu(), grad) < 1e-9, param_name


@pytest.mark.parametrize("fw_form", ["attention", "fused"])
def test_hand_written_gradients_survive_a_second_backward(fw_form):
    # the attention form accumulates gradients in a buffer, the fused one reuses its buffers:
    # a retained graph must not double or corrupt them
    model = make("fw_lstm", fw_form=fw_form)
    loss = model(tokens()).square().sum()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss.backward()
    for before, p in zip(first, model.parameters(), strict=True):
        assert rel_err(p.grad, before) < 1e-12


def authors_fw_lstm_cell(layer, x, inner_steps: int = 1):
    """The authors' TF FastWeightsLSTMCell, transcribed line by line with an explicit A; inner_steps > 1
    adds our real inner loop (re-read A with the updated rectified gates)."""
    B, T, _ = x.shape
    H = layer.hidden_size
    W = torch.cat([layer.hidden_proj.weight, layer.input_proj.weight], dim=1).T  # [h, x] W
    h = c = x.new_zeros(B, H)
    A = x.new_zeros(B, 4 * H, 4 * H)
    for t in range(T):
        ifoj = torch.cat([h, x[:, t]], dim=1) @ W + layer.input_proj.bias
        ifoj = F.layer_norm(ifoj, (4 * H,), layer.gate_norm.weight, layer.gate_norm.bias)
        i, f, o, j = ifoj.split(H, dim=1)
        h_s = F.relu(ifoj)[:, None, :]
        A = layer.decay * A + layer.fast_lr * h_s.transpose(1, 2) @ h_s
        ifoj_A = h_s @ A
        for _ in range(inner_steps - 1):
            ifoj_A = F.relu(ifoj[:, None, :] + ifoj_A) @ A
        i_A, f_A, o_A, j_A = ifoj_A[:, 0].split(H, dim=1)
        g = F.relu(j + j_A)
        c = c * torch.sigmoid(f + f_A + layer.forget_bias) + torch.sigmoid(i + i_A) * g
        c = F.layer_norm(c, (H,), layer.cell_norm.weight, layer.cell_norm.bias)
        h = F.relu(c) * torch.sigmoid(o + o_A)
    return h


@pytest.mark.parametrize("inner_steps", [1, 2])
@pytest.mark.parametrize("fw_form", ["matrix", "attention", "fused"])
def test_fw_lstm_is_the_authors_cell_with_a_real_inner_loop(fw_form, inner_steps):
    model = make("fw_lstm", fw_form=fw_form, inner_steps=inner_steps)
    x = model.embed(tokens())
    expected = authors_fw_lstm_cell(model.recurrent, x, inner_steps)
    assert rel_err(model.recurrent(x), expected) < 1e-12


@pytest.mark.parametrize("inner_steps", [2, 3])
def test_authors_inner_loop_makes_more_steps_change_nothing(inner_steps):
    x = tokens()
    one = make("fw_lstm", inner_steps=1)(x)
    assert rel_err(make("fw_lstm", inner_steps=inner_steps, authors_inner_loop=True)(x), one) < 1e-15
    assert rel_err(make("fw_lstm", inner_steps=inner_steps)(x), one) > 1e-6  # the real loop re-reads A


def ba_fw_rnn(layer, x, authors: bool):
    """Ba et al.'s equations (or the authors' TF cell) with an explicit A, for FW-RNN."""
    B, T, _ = x.shape
    H = layer.recurrent.in_features
    W, C, b = layer.recurrent.weight, layer.input_proj.weight, layer.input_proj.bias
    h, A = x.new_zeros(B, H), x.new_zeros(B, H, H)
    for t in range(T):
        u = F.relu(h @ W.T + x[:, t] @ C.T + b)
        if authors:
            A = layer.decay * A + layer.fast_lr * u[:, :, None] * u[:, None, :]
        h_s = u
        for _ in range(layer.inner_steps):
            pre = (u if authors else h) @ W.T + x[:, t] @ C.T + b + (A @ h_s[:, :, None])[:, :, 0]
            h_s = F.relu(layer.norm(pre))
        h = h_s
        if not authors:
            A = layer.decay * A + layer.fast_lr * h[:, :, None] * h[:, None, :]
    return h


@pytest.mark.parametrize("variant", ["ba", "authors"])
@pytest.mark.parametrize("fw_form", ["matrix", "attention", "fused"])
def test_fw_rnn_follows_its_equations(variant, fw_form):
    model = make("fw_rnn", fw_form=fw_form, variant=variant, inner_steps=2, slow_init_scale=0.5)
    x = model.embed(tokens())
    expected = ba_fw_rnn(model.recurrent, x, authors=variant == "authors")
    assert rel_err(model.recurrent(x), expected) < 1e-12


def test_fw_rnn_slow_weights_start_at_a_scaled_identity():
    W = make("fw_rnn", slow_init_scale=0.05).recurrent.recurrent.weight
    assert torch.allclose(W, 0.05 * torch.eye(W.shape[0], dtype=W.dtype))


@pytest.mark.parametrize("memory", ["gates", "candidate"])
@pytest.mark.parametrize("hidden_size", [20, 50, 100])
def test_fast_weights_add_no_parameters(memory, hidden_size):
    fw = make("fw_lstm", hidden_size=hidden_size, memory=memory, embed_size=100, head_size=100)
    ln = make("ln_lstm", hidden_size=hidden_size, embed_size=100, head_size=100)
    assert count_parameters(fw) == count_parameters(ln)


ALL_VARIANTS = [("lstm", {}), ("ln_lstm", {}), *FAST_WEIGHT_MODELS]


@pytest.mark.parametrize(("name", "fields"), ALL_VARIANTS)
def test_gradients_reach_every_parameter(name, fields):
    model = make(name, **fields)
    _, grads = outputs_and_grads(model, tokens(batch=8, length=11))
    for param_name, grad in grads.items():
        assert grad.abs().max() > 0, f"no gradient reaches {param_name}"


def art_batch(n: int, pairs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n ART sequences (Ba et al.): k1 v1 .. kK vK ? ? q -> value of q. Letters 0-25, digits 26-35, ? 36."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.stack([torch.randperm(26, generator=g)[:pairs] for _ in range(n)])
    values = torch.randint(0, 10, (n, pairs), generator=g)
    which = torch.randint(0, pairs, (n,), generator=g)
    body = torch.stack([keys, values + 26], dim=2).reshape(n, 2 * pairs)
    query = keys.gather(1, which[:, None])
    seq = torch.cat([body, torch.full((n, 2), 36), query], dim=1)
    return seq, values.gather(1, which[:, None])[:, 0]


@pytest.mark.parametrize(("name", "fields"), ALL_VARIANTS)
def test_each_model_overfits_a_tiny_batch(name, fields):
    torch.manual_seed(0)
    x, y = art_batch(16, pairs=4, seed=0)
    model = build_model(
        params_class(name)(hidden_size=32, embed_size=16, head_size=32, **fields), VOCAB, CLASSES
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy == 1.0, f"{name} {fields}: train accuracy {accuracy:.2f}, loss {loss.item():.3f}"
