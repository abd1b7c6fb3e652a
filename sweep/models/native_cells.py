"""Whole time steps of the LN-LSTM and FW-LSTM, and the FW-RNN's inner loop, as C calls (native.py), for
fused.py's Functions on CPU.

Where `matmul.sequence_gemm` gives a GEMM to call from C, a whole sequence is one C call forward and one
backward (native.py's `SEQUENCES`: the time loop, the products, the gathered inputs of the LSTMs and the
recurrent weights' gradient inside); the FW-RNN's authors' variant, and every model where there is no such
GEMM, run the time loop here, as follows.

Per time step the forward pass is one matrix product (the slow h W_h: `matmul.linear`, torch.mm or
oneDNN) and one C call that does the rest of the cell for every row of the batch: adding x W_x + b, layer
norms, gates, the cell update and, for the FW-LSTM, the memory's write and reads. The backward pass is
one C call and one product per step, the weight gradients one product each at the end
(`matmul.weight_grad`). What the backward needs is kept in T-major
buffers: N (normalised gates), ACT (gate activations), R (1/std of each layer norm), CN (normalised c
before its gain), C (the cell state), and for the LN-LSTM TC = tanh(c). Two buffers are batch-major,
[B, T, ...], so that nothing is copied to change layout: the previous hidden states Hprev (h(t-1) at
[:, t], read by each step's matmul as rows of a strided matrix, and by dW_h's as one matrix) and the
gradient dZ, which is returned as the gradient of xW [B, T, 4H] as it is.

The C calls get addresses computed here by integer arithmetic (`_Rows`): a tensor view per row and step
would cost about a microsecond each, a dozen per step.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sweep.models import matmul, native
from sweep.models.common import lookup, table_grad


class _Rows:
    """Addresses of x[0], x[1], ... of a contiguous buffer (x[t] is one time step's [B, ...] block), or of
    x[:, 0], x[:, 1], ... with `dim=1` (a batch-major buffer)."""

    __slots__ = ("base", "step")

    def __init__(self, x: Tensor, dim: int = 0):
        assert x.is_contiguous(), x.stride()
        self.base, self.step = x.data_ptr(), x.stride(dim) * x.element_size()

    def __getitem__(self, t: int) -> int:
        return self.base + t * self.step


def _addresses(*tensors: Tensor) -> list[int]:
    return [t.data_ptr() for t in tensors]


def _pointers(*tensors: Tensor | None) -> list[int | None]:
    """Addresses, None (NULL) for None."""
    return [None if t is None else t.data_ptr() for t in tensors]


def _forward_buffers(xW: Tensor, B: int, T: int, cell_stats: int, extra: int) -> tuple[Tensor, ...]:
    """N, ACT [T, B, 4H], R [T, B, cell_stats], `extra` buffers [T, B, H], Hprev [B, T, H] (h(-1) = 0 at
    [:, 0]) and h(T-1) [B, H], like xW [..., 4H]."""
    G = xW.shape[-1]
    H = G // 4
    Hprev = xW.new_zeros(B, T, H)  # h(-1) = 0; zeroing all of it is no slower than one strided column
    return (*(xW.new_empty(T, B, G) for _ in range(2)), xW.new_empty(T, B, cell_stats),
            *(xW.new_empty(T, B, H) for _ in range(extra)), Hprev, xW.new_empty(B, H))


class _HiddenOut:
    """Where step t writes h(t), and the batch stride there: Hprev[:, t + 1], the last into `last`."""

    def __init__(self, Hprev: Tensor, last: Tensor):
        self.rows, self.T, self.stride = _Rows(Hprev, dim=1), Hprev.shape[1], Hprev.stride(0)
        self.last = last.data_ptr()

    def __getitem__(self, t: int) -> tuple[int, int]:
        return (self.rows[t + 1], self.stride) if t + 1 < self.T else (self.last, self.stride // self.T)


def _time_loop(xW: Tensor, W_h: Tensor, Hprev: Tensor, h_last: Tensor, cell_at: Callable[..., None]) -> None:
    """The forward pass of an LSTM's time steps: hw = h(t-1) W_hᵀ (no matmul at t = 0: h(-1) = 0), then
    cell_at(t, address of hw or None, address of xW[:, t], its batch stride, where h(t) goes, its batch
    stride): the C call adds xW (z = h W_h + x W_x + b) and writes h(t)."""
    xW = xW.contiguous()
    xw, h = _Rows(xW, dim=1), _HiddenOut(Hprev, h_last)
    h_steps = Hprev.unbind(1)
    for t in range(xW.shape[1]):
        hw = matmul.linear(h_steps[t], W_h) if t else None
        cell_at(t, hw.data_ptr() if t else None, xw[t], xW.stride(0), *h[t])


def _backward_loop(grad_h: Tensor, W_h: Tensor, dZ: Tensor, cell_at: Callable[..., None]) -> None:
    """Back-propagation through an LSTM's time steps, last first: cell_at(t, address of dh(t), where dz(t)
    goes, its batch stride) writes dz(t) into the batch-major dZ; then dh(t-1) = dz(t) W_h."""
    dz, dz_steps, W_hT = _Rows(dZ, dim=1), dZ.unbind(1), W_h.t()
    dh = grad_h.contiguous()
    for t in reversed(range(dZ.shape[1])):
        cell_at(t, dh.data_ptr(), dz[t], dZ.stride(0))
        if t:
            dh = matmul.linear(dz_steps[t], W_hT)


def _gradient_buffers(like: Tensor, T: int, B: int, G: int, H: int) -> tuple[Tensor, ...]:
    """dZ [B, T, G]; the gains' and biases' gradients (zeroed: the C calls add into them); dc [B, H]."""
    sums = like.new_zeros(2 * G + 2 * H)
    dgamma, dbeta, dgamma_c, dbeta_c = sums.split([G, G, H, H])
    return like.new_empty(B, T, G), dgamma, dbeta, dgamma_c, dbeta_c, like.new_zeros(B, H)


def _sequence_inputs(ctx: Any, xW: Tensor, tokens: Tensor | None
                     ) -> tuple[int | None, Tensor, Tensor | None, tuple[int, int, int]]:
    """The LSTMs' forward inputs: the GEMM for a whole-sequence C call (None: the time loop here, which
    takes the inputs looked up), xW and tokens as the chosen loop takes them, and (B, T, G). The lookup is
    kept in ctx for the backward."""
    gemm = matmul.sequence_gemm(xW.dtype)
    ctx.lookup = (tokens, xW.shape[0])
    if gemm is None:
        xW, tokens = lookup(xW, tokens), None
    sizes = (*tokens.shape, xW.shape[-1]) if tokens is not None else tuple(xW.shape)
    return gemm, xW, tokens, sizes


def _token_arguments(xW: Tensor, tokens: Tensor | None, rows: int) -> tuple[Tensor | None, Tensor | None]:
    """For the sequence loops: tokens (int64, contiguous) and a gather buffer [rows, G], or two None. The C
    loop reads xW's rows at the tokens unchecked, so they are checked here, as `F.embedding` would."""
    if tokens is None:
        return None, None
    low, high = (int(tokens.min()), int(tokens.max())) if tokens.numel() else (0, 0)
    if low < 0 or high >= xW.shape[0]:
        raise IndexError(f"token ids must be in [0, {xW.shape[0]}): got {low} .. {high}")
    return tokens.to(torch.long).contiguous(), xW.new_empty(rows, xW.shape[-1])


def _table_arguments(ctx: Any, like: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """For the sequence loops' backward: the forward's tokens and the vocabulary's gradient (zeroed: the C
    loop adds into it), or two None."""
    tokens, rows = ctx.lookup
    if tokens is None:
        return None, None
    return tokens.to(torch.long).contiguous(), like.new_zeros(rows, like.shape[-1])


WEIGHT_GRAD_ROWS = 152  # rows per product of dW_h where the loop's one block is all rows: 8 sequences of 19


class _WeightGrad:
    """dW_h = Σ_t dz(t)ᵀ h(t-1) [outputs, H] (outputs: 4H for the LSTMs, H for the FW-RNN) as the backward
    sequence loops compute it, block by block, in products of `chunk` rows, and the buffers they need (kept
    here while the loop runs)."""

    def __init__(self, Hprev: Tensor, chunk: int, outputs: int):
        H = Hprev.shape[-1]
        self.Hprev, self.chunk = Hprev, chunk
        self.HT, self.dWT = Hprev.new_empty(H, chunk), Hprev.new_empty(H, outputs)
        self.dW = Hprev.new_empty(outputs, H)

    def arguments(self) -> list[int]:
        """Hprev, rows per product, h(t-1)ᵀ buffer [H, chunk], dW_hᵀ buffer [H, outputs], dW_h."""
        return [self.Hprev.data_ptr(), self.chunk, *_addresses(self.HT, self.dWT, self.dW)]


def _recurrent_weight_grad(dZ: Tensor, Hprev: Tensor) -> Tensor:
    """dW_h = Σ_t dz(t)ᵀ h(t-1), one matmul over all steps (both batch-major)."""
    B, T, G = dZ.shape
    return matmul.weight_grad(dZ.view(B * T, G), Hprev.view(B * T, -1))


def ln_lstm_forward(ctx: Any, xW: Tensor, W_h: Tensor, gamma: Tensor, beta_fb: Tensor, gamma_c: Tensor,
                    beta_c: Tensor, tokens: Tensor | None = None) -> Tensor:
    """h(T) of the LN-LSTM (fused.LNLSTMSequence's equations); beta_fb has the forget bias in its f row.
    With `tokens`, xW is the projected vocabulary and the inputs are xW[tokens]."""
    gemm, xW, tokens, (B, T, G) = _sequence_inputs(ctx, xW, tokens)
    H = G // 4
    cell = native.kernel("lnlstm_forward", xW.dtype, hidden=H)
    N, ACT, R, CN, C, TC, Hprev, h_last = _forward_buffers(xW, B, T, cell_stats=5, extra=3)
    params = [p.contiguous() for p in (gamma, beta_fb, gamma_c, beta_c)]
    ctx.native_saved = (N, ACT, R, CN, C, TC, Hprev, W_h, params)
    if gemm is not None:  # one C call for the whole sequence, one block of B rows
        W_hT, xW, hw = W_h.t().contiguous(), xW.contiguous(), xW.new_empty(B, G)  # alive through the call
        tokens, xg = _token_arguments(xW, tokens, B)
        _in_c("lnlstm_sequence_forward", xW.dtype, H,
            gemm, B, T, H, B, *_addresses(W_hT, xW), *_pointers(tokens, xg),
            *_addresses(*params, N, ACT, R, CN, C, TC, Hprev, h_last, hw))
        return h_last
    n, act, r, cn, c, tc = map(_Rows, (N, ACT, R, CN, C, TC))
    fixed = _addresses(*params)
    _time_loop(xW, W_h, Hprev, h_last, lambda t, hw, xw, xw_sb, h, h_sb: cell(
        B, H, hw, xw, xw_sb, *fixed, c[t - 1] if t else None, n[t], act[t], r[t], cn[t], c[t], tc[t], h,
        h_sb))
    return h_last


def ln_lstm_backward(ctx: Any, grad_h: Tensor) -> tuple[Tensor, ...]:
    """Gradients of xW, W_h, gamma [4, H], beta [4, H], gamma_c, beta_c."""
    N, ACT, R, CN, C, TC, Hprev, W_h, (gamma, _, gamma_c, _) = ctx.native_saved
    T, B, G = N.shape
    H = G // 4
    cell = native.kernel("lnlstm_backward", N.dtype, hidden=H)
    dZ, dgamma, dbeta, dgamma_c, dbeta_c, dc = _gradient_buffers(N, T, B, G, H)
    fixed = _addresses(gamma, gamma_c)
    sums = _addresses(dgamma, dbeta, dgamma_c, dbeta_c)
    gemm = matmul.sequence_gemm(N.dtype)
    if gemm is not None:
        W_h, grad_h, dh = W_h.contiguous(), grad_h.contiguous(), N.new_empty(B, H)
        tokens, dtable = _table_arguments(ctx, N)
        dW_h = _WeightGrad(Hprev, min(WEIGHT_GRAD_ROWS, B * T), G)
        _in_c("lnlstm_sequence_backward", N.dtype, H,
            gemm, B, T, H, B, *_addresses(W_h, grad_h), *fixed, *_addresses(N, ACT, R, CN, TC, C, dZ, dc, dh),
            *sums, *_pointers(tokens, dtable), *dW_h.arguments())
        return (dZ if dtable is None else dtable, dW_h.dW, dgamma.view(4, H), dbeta.view(4, H), dgamma_c,
                dbeta_c)
    n, act, r, cn, c, tc = map(_Rows, (N, ACT, R, CN, C, TC))
    _backward_loop(grad_h, W_h, dZ, lambda t, dh, dz, dz_sb: cell(
        B, H, dh, dc.data_ptr(), *fixed, n[t], act[t], r[t], cn[t], tc[t], c[t - 1] if t else None, dz, dz_sb,
        *sums))
    return (table_grad(dZ, *ctx.lookup), _recurrent_weight_grad(dZ, Hprev), dgamma.view(4, H),
            dbeta.view(4, H), dgamma_c, dbeta_c)


def _memory_arguments(mem: Any) -> list[int]:
    """V, GQ, SG as (address, batch stride, row stride), then the weights' address (fused._DecayedMemory)."""
    out = []
    for buffer in (mem.V, mem.GQ, mem.SG):
        assert buffer.stride(-1) == 1, buffer.stride()
        out += [buffer.data_ptr(), buffer.stride(0), buffer.stride(1)]
    return [*out, mem.weights.data_ptr()]


def fw_lstm_forward(ctx: Any, mem: Any, xW: Tensor, W_h: Tensor, gamma: Tensor, beta: Tensor,
                    forget_bias: Tensor, gamma_c: Tensor, beta_c: Tensor, reads: int, m0: int,
                    tokens: Tensor | None = None) -> Tensor:
    """h(T) of the FW-LSTM (fused.FWLSTMSequence's equations) with the memory `mem` on gates[m0:]; with
    `tokens`, xW is the projected vocabulary and the inputs are xW[tokens]."""
    gemm, xW, tokens, (B, T, G) = _sequence_inputs(ctx, xW, tokens)
    H = G // 4
    cell = native.kernel("fwlstm_forward", xW.dtype, hidden=H)
    N, ACT, R, CN, C, Hprev, h_last = _forward_buffers(xW, B, T, cell_stats=2, extra=2)
    params = [p.contiguous() for p in (gamma, beta, forget_bias, gamma_c, beta_c)]
    fixed = _addresses(*params)
    rb = _rows_per_block(mem, B) if gemm is not None else B
    one_block = gemm is not None and mem.keep_one_block(rb)
    memory = _memory_arguments(mem)
    ctx.native_saved = (mem, memory, N, ACT, R, CN, C, Hprev, W_h, params, reads, m0, rb, one_block)
    if gemm is not None:  # one C call for the whole sequence, in blocks of rows whose memory fits in L2
        W_hT, xW, hw = W_h.t().contiguous(), xW.contiguous(), xW.new_empty(rb, G)
        tokens, xg = _token_arguments(xW, tokens, rb)
        _in_c("fwlstm_sequence_forward", xW.dtype, H,
            gemm, B, T, H, rb, m0, reads, one_block, *_addresses(W_hT, xW), *_pointers(tokens, xg), *fixed,
            *memory, *_addresses(N, ACT, R, CN, C, Hprev, h_last, hw))
        return h_last
    n, act, r, cn, c = map(_Rows, (N, ACT, R, CN, C))
    _time_loop(xW, W_h, Hprev, h_last, lambda t, hw, xw, xw_sb, h, h_sb: cell(
        B, H, m0, t, reads, T, hw, xw, xw_sb, *fixed, c[t - 1] if t else None, *memory, n[t], act[t], r[t],
        cn[t], c[t], h, h_sb))
    return h_last


def fw_lstm_backward(ctx: Any, grad_h: Tensor) -> tuple[Tensor, ...]:
    """Gradients of xW, W_h, gamma, beta, gamma_c, beta_c."""
    mem, memory, N, ACT, R, CN, C, Hprev, W_h, (gamma, beta, _, gamma_c, _), reads, m0, rb, one_block = (
        ctx.native_saved)
    T, B, G = N.shape
    H = G // 4
    cell = native.kernel("fwlstm_backward", N.dtype, hidden=H)
    dZ, dgamma, dbeta, dgamma_c, dbeta_c, dc = _gradient_buffers(N, T, B, G, H)
    fixed = _addresses(gamma, gamma_c)
    sums = _addresses(dgamma, dbeta, dgamma_c, dbeta_c)
    rows = mem.GQ.shape[1]
    gemm = matmul.sequence_gemm(N.dtype)
    if gemm is not None:  # in the forward's blocks (with one_block, its buffer holds that many rows)
        lo = (ctypes.c_long * T)(*(2 * mem.first_read[t] for t in range(T)))
        tokens, dtable = _table_arguments(ctx, N)
        dW_h = _WeightGrad(Hprev, rb * T, G)  # one product per block, while its rows are in L2
        W_h, grad_h, dh = W_h.contiguous(), grad_h.contiguous(), N.new_empty(rb, H)
        _in_c("fwlstm_sequence_backward", N.dtype, H,
            gemm, B, T, H, rb, m0, reads, one_block, lo, rows, *_addresses(W_h, grad_h, gamma, beta, gamma_c),
            *_addresses(N, ACT, R, CN, C), *memory, *_addresses(dZ, dc, dh), *sums,
            *_pointers(tokens, dtable), *dW_h.arguments())
        return dZ if dtable is None else dtable, dW_h.dW, dgamma, dbeta, dgamma_c, dbeta_c
    n, act, r, cn, c = map(_Rows, (N, ACT, R, CN, C))
    _backward_loop(grad_h, W_h, dZ, lambda t, dh, dz, dz_sb: cell(
        B, H, m0, t, reads, T, 2 * mem.first_read[t], rows, dh, dc.data_ptr(), *fixed, n[t], act[t], r[t],
        cn[t], c[t], c[t - 1] if t else None, *memory, dz, dz_sb, *sums))
    return table_grad(dZ, *ctx.lookup), _recurrent_weight_grad(dZ, Hprev), dgamma, dbeta, dgamma_c, dbeta_c


def _in_c(name: str, dtype: torch.dtype, hidden: int, *arguments: Any) -> None:
    """One whole-sequence C call (native.py's SEQUENCES) from the kernels built for `hidden`, then what torch
    does after its own brgemm loops."""
    native.kernel(name, dtype, hidden=hidden)(*arguments)
    matmul.release_sequence_gemm(dtype)


# The share of the L2 cache a block's memory may take; the rest holds the recurrent weights (160 KB at
# H = 100) and the step's rows. Half (8 rows at H = 100 with a 1 MB L2) measured 3-4% slower FW-LSTM steps
# than three eighths (6 rows); at H = 20 and 50 the two are within 1%.
L2_SHARE = 3 / 8


def _rows_per_block(mem: Any, B: int) -> int:
    """Rows whose memory (the stored vectors, queries, read gradients and weighted dots) takes about
    `L2_SHARE` of the L2 cache: a block of them runs through all time steps while that memory stays there."""
    buffers = [mem.GQ, mem.SG]
    if not mem.queries_are_stored:  # else V is GQ's query rows
        buffers.append(mem.V)
    row_bytes = sum(b.stride(0) * b.element_size() for b in buffers)  # with the rows' padding
    return max(1, min(B, int(native.l2_cache_bytes() * L2_SHARE) // row_bytes))


def fw_rnn_forward(ctx: Any, mem: Any, Cx: Tensor, W: Tensor, gamma: Tensor, beta: Tensor, reads: int,
                   authors: bool) -> Tensor:
    """h(T) of the FW-RNN (fused.FWRNNSequence's equations): per step one matmul (the authors' variant:
    two, and its u written into the memory) and one C call for the inner loop."""
    B, T, H = Cx.shape
    inner = native.kernel("fwrnn_forward", Cx.dtype, hidden=H)
    XH, RS, SLOW = Cx.new_empty(T, reads, B, H), Cx.new_empty(T, reads, B), Cx.new_empty(B, H)
    Hprev, h_last = Cx.new_zeros(B, T, H), Cx.new_empty(B, H)  # h(-1) = 0 (all zeroed: measured faster)
    U = Cx.new_empty(B, T, H) if authors else None  # the authors' u = ReLU(W h(t-1) + C x), batch-major
    gains = (gamma.contiguous(), beta.contiguous())  # kept (in native_saved) while C reads them
    params, memory = _addresses(*gains), _memory_arguments(mem)
    Cx = Cx.contiguous()
    ctx.native_saved = (mem, memory, XH, RS, Hprev, U, W, params, reads, authors, gains)
    gemm = None if authors else matmul.sequence_gemm(Cx.dtype)
    if gemm is not None:  # Ba's equations: the whole sequence in one C call
        WT, hw = W.t().contiguous(), Cx.new_empty(B, H)
        _in_c("fwrnn_sequence_forward", Cx.dtype, H,
            gemm, B, T, H, reads, *_addresses(WT, Cx), *params, *memory,
            *_addresses(XH, RS, Hprev, h_last, hw))
        return h_last
    xh, rs, cx, h = _Rows(XH), _Rows(RS), _Rows(Cx, dim=1), _HiddenOut(Hprev, h_last)
    WT, h_steps, Cx_steps = W.t(), Hprev.unbind(1), Cx.unbind(1)
    for t in range(T):
        n, r0, write_k = _read_plan(t, T, reads, authors)
        if authors:  # u = ReLU(W h + C x), written before the inner loop reads it, whose slow is W u + C x
            torch.addmm(Cx_steps[t], h_steps[t], WT, out=SLOW)
            mem.write(t, torch.clamp_min(SLOW, 0, out=U[:, t]))
            torch.addmm(Cx_steps[t], U[:, t], WT, out=SLOW)
            slow = (SLOW.data_ptr(), None, 0)
        else:  # slow = W h + C x, the C call adding C x (h(-1) = 0: slow(0) = C x)
            hw = matmul.linear(h_steps[t], W) if t else None
            slow = (hw.data_ptr() if t else None, cx[t], Cx.stride(0))
        inner(B, H, reads, T, n, r0, write_k, t if authors else -1, *slow, *params, *memory, xh[t], rs[t],
              *h[t])
    return h_last


def _read_plan(t: int, T: int, reads: int, authors: bool) -> tuple[int, int, int]:
    """(stored vectors step t reads, its first read's index, the vector it writes or -1): Ba's step t
    reads h(0) .. h(t-1) and stores h(t) (A(T) is never read); the authors' reads v_0 .. v_t (u)."""
    if authors:
        return t + 1, t * reads, -1
    return t, max(t - 1, 0) * reads, t if t < T - 1 else -1


def fw_rnn_backward(ctx: Any, grad_h: Tensor) -> tuple[Tensor, ...]:
    """Gradients of Cx, W, gamma, beta."""
    mem, memory, XH, RS, Hprev, U, W, params, reads, authors, _ = ctx.native_saved
    T, _, B, H = XH.shape
    inner = native.kernel("fwrnn_backward", XH.dtype, hidden=H)
    sums = XH.new_zeros(2 * H)
    dgamma, dbeta = sums.split([H, H])
    dSlow, dh_buffer = XH.new_empty(B, T, H), XH.new_empty(B, H)
    gemm = None if authors else matmul.sequence_gemm(XH.dtype)
    if gemm is not None:
        first_read = (ctypes.c_long * T)(*mem.first_read)
        dW = _WeightGrad(Hprev, min(WEIGHT_GRAD_ROWS, B * T), H)
        W, grad_h = W.contiguous(), grad_h.contiguous()  # kept while C reads them
        _in_c("fwrnn_sequence_backward", XH.dtype, H,
            gemm, B, T, H, reads, first_read, mem.GQ.shape[1], *_addresses(W, grad_h), *params,
            *_addresses(XH, RS), *memory, *_addresses(dSlow, dh_buffer, dgamma, dbeta), *dW.arguments())
        return dSlow, dW.dW, dgamma, dbeta
    dU_pre = XH.new_empty(B, T, H) if authors else None
    dq0 = XH.new_empty(B, H) if authors else None
    xh, rs, dslow = _Rows(XH), _Rows(RS), _Rows(dSlow, dim=1)
    rows = mem.GQ.shape[1]
    dh, dslow_steps = grad_h.contiguous(), dSlow.unbind(1)
    for t in reversed(range(T)):
        n, r0, write_k = _read_plan(t, T, reads, authors)
        lo = 2 * mem.first_read[write_k] if write_k >= 0 else 0
        inner(B, H, reads, T, n, r0, write_k, lo, rows, dh.data_ptr(), *params, xh[t], rs[t], *memory,
              dslow[t], dSlow.stride(0), None if dq0 is None else dq0.data_ptr(), *_addresses(dgamma, dbeta))
        if authors:  # u feeds the first query, W u + C x and, as v_t, every read that saw it
            du = _stored_grad(mem, memory, t, plus=torch.addmm(dq0, dslow_steps[t], W))
            torch.ops.aten.threshold_backward.grad_input(du, U[:, t], 0, grad_input=dU_pre[:, t])
            grad_into_h = dU_pre[:, t]
        else:
            grad_into_h = dslow_steps[t]
        if t:
            dh = torch.mm(grad_into_h, W, out=dh_buffer)
    dW = matmul.weight_grad(dSlow.view(B * T, H), (U if authors else Hprev).view(B * T, H))
    if authors:
        dW += matmul.weight_grad(dU_pre.view(B * T, H), Hprev.view(B * T, H))
        return dSlow + dU_pre, dW, dgamma, dbeta
    return dSlow, dW, dgamma, dbeta


def _stored_grad(mem: Any, memory: list[int], k: int, plus: Tensor) -> Tensor:
    """plus + dv_k = plus + Σ_{rows j of reads that saw v_k} SG[:, j, k] GQ[:, j], one C call."""
    B, rows, D = mem.GQ.shape
    lo, size = 2 * mem.first_read[k], mem.GQ.element_size()
    (_, _, _, gq, gq_sb, gq_sj, sg, sg_sb, sg_sj, _), plus = memory, plus.contiguous()
    out = torch.empty_like(plus)
    native.kernel("column_combine", plus.dtype)(B, rows - lo, D, sg + (lo * sg_sj + k) * size, sg_sb, sg_sj,
                                                 gq + lo * gq_sj * size, gq_sb, gq_sj, plus.data_ptr(), D,
                                                 out.data_ptr(), D)
    return out
