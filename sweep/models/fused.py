"""Fused recurrent kernels: a whole sequence per autograd Function, back-propagation through time by hand.

The readable model code (`fw_lstm.py`, `fw_rnn.py`, `ln_lstm.py`) runs its time loop under autograd:
~40 recorded ops per time step, each with its own backward node, and the attention read's backward
accumulating into the gradients of every past vector. Here one Function runs the loop without a graph,
keeps only what the backward needs, and writes BPTT out:

- the slow matmuls of a step are one `addmm` each; the gradient of the recurrent weights is one matmul
  over all time steps at the end (dZᵀ H), the input projection's gradient is dZ itself;
- layer norm, sigmoid, tanh and ReLU use ATen's fused forward/backward kernels (`native_layer_norm`,
  `sigmoid_backward`, ...), which run on CPU and CUDA alike;
- the fast-weight memory (`_DecayedMemory`) stores the written vectors once; the gradient of a stored
  vector v_k is computed once, when BPTT reaches the step that wrote it, as two batched products over
  the queries q and output gradients g of every later read (each read's q and g are kept side by side):

      dv_k = Σ_{reads r, n_r ≥ k} η λ^(n_r - k) [(q_r·v_k) g_r + (g_r·v_k) q_r]

  instead of every read adding into the gradients of all past vectors.

On CPU (float32, float64, where a C compiler is) the same equations run as C: the LN-LSTM's and
FW-LSTM's time steps, and the FW-RNN's inner loop, one C call each (native_cells.py); the slow matmuls
stay with torch. The torch-op code below is what runs elsewhere (CUDA, other dtypes,
FWSWEEP_NATIVE=0), and the reference the C kernels are tested against.

The equations are those of the model modules (see their docstrings); tests/test_models.py checks every
output and gradient against the matrix form to 1e-9 in float64 and runs `torch.autograd.gradcheck`.
Double backward is not supported (`once_differentiable`): use `fw_form: matrix` for that.
"""

from __future__ import annotations

import bisect

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from sweep.models import native, native_cells
from sweep.models.common import lookup, table_grad

aten = torch.ops.aten
EPS = 1e-5  # nn.LayerNorm's default, as in the readable forms


def _layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, out: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
    """(LN(x), mean, 1/std) over the last dimension; LN(x) written into `out` when given (no copy)."""
    if out is None:
        return aten.native_layer_norm(x, [x.shape[-1]], weight, bias, EPS)
    stats = x.new_empty(2, *x.shape[:-1], 1)
    return aten.native_layer_norm.out(x, [x.shape[-1]], weight, bias, EPS, out0=out, out1=stats[0],
                                      out2=stats[1])


def _layer_norm_backward(grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None,
                         bias: Tensor | None, out: tuple[Tensor, Tensor, Tensor] | None = None
                         ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(dx, dweight, dbias); with `out`, written into those tensors (rows of the caller's buffers)."""
    affine = weight is not None
    mask = [True, affine, affine]
    if out is None:
        return aten.native_layer_norm_backward(grad, x, [x.shape[-1]], mean, rstd, weight, bias, mask)
    return aten.native_layer_norm_backward.out(grad, x, [x.shape[-1]], mean, rstd, weight, bias, mask,
                                               out0=out[0], out1=out[1], out2=out[2])


def _relu_backward(grad: Tensor, out: Tensor) -> Tensor:
    return aten.threshold_backward(grad, out, 0)


def _row_buffer(batch: int, rows: int, dim: int, like: Tensor) -> Tensor:
    """A [batch, rows, dim] buffer like `like` whose rows start on 64-byte boundaries on CPU (the row
    stride padded up to a multiple of 64 bytes): the C kernels' vector loads then never straddle two cache
    lines. Rows of 800 bytes (D = 200: the FW-LSTM at H = 50) would otherwise start at every other half
    line, and the memory's products took 16% more time."""
    per_line = 64 // like.element_size() if like.device.type == "cpu" else 1
    return like.new_empty(batch, rows, -(-dim // per_line) * per_line)[..., :dim]


class _DecayedMemory:
    """A(n) q = Σ_{k≤n} η λ^(n-k) (v_k·q) v_k over the stored vectors, with its backward batched.

    `read_times[r]` is n for read r (reads in forward order, n never decreasing): the newest stored
    vector that read r sees. Each read keeps its query q_r and, in backward, its output gradient g_r
    (rows 2r+1 and 2r of GQ), and the weighted dot products of both with every vector it saw
    (rows 2r and 2r+1 of SG, written there by the product itself). Then
    dv_k = Σ_r SG[2r, k] g_r + SG[2r+1, k] q_r, one product.

    Here each product is `torch.bmm`; native_cells.py's C time steps do the same products on the same
    buffers.
    """

    def __init__(self, batch: int, length: int, dim: int, read_times: list[int], fast_lr: float,
                 decay: float, like: Tensor):
        self.read_times = read_times
        powers = fast_lr * decay ** torch.arange(length, dtype=like.dtype, device=like.device)
        self.weights = powers.flip(0)  # weights[T-1-n:][k] = η λ^(n-k)
        self.GQ = _row_buffer(batch, 2 * len(read_times), dim, like)  # g_0, q_0, g_1, q_1, ...
        # v_0 .. v_{T-1}. One read per step, of the vector just written (FW-LSTM with S = 1): that vector
        # is the read's query, so the memory is the query rows of GQ (no second copy of each vector).
        self.queries_are_stored = read_times == list(range(length))
        self.V = self.GQ[:, 1::2] if self.queries_are_stored else _row_buffer(batch, length, dim, like)
        # SG[:, 2r, k] = w (q_r·v_k), SG[:, 2r+1, k] = w (g_r·v_k)
        self.SG = like.new_empty(batch, 2 * len(read_times), length)
        self.first_read = [bisect.bisect_left(read_times, k) for k in range(length)]

    def keep_one_block(self, rows: int) -> bool:
        """Whether GQ (and V, its query rows) now holds `rows` batch rows only: native.py's sequence loops
        (S = 1) reuse one block's rows for every block and recompute the stored vectors in the backward,
        so the memory stays in L2 (7.8 MB for all rows at H = 100, B = 128). Not for S > 1: its queries
        are not the stored vectors, and the backward needs them all."""
        if not self.queries_are_stored:
            return False
        self.GQ = _row_buffer(rows, *self.GQ.shape[1:], like=self.GQ)
        self.V = self.GQ[:, 1::2]
        return True

    def write(self, k: int, v: Tensor) -> Tensor:
        """Store v_k; returns the stored copy (for S = 1 the query row a read of it then finds in place)."""
        self.V[:, k] = v
        return self.V[:, k]

    def write_relu(self, k: int, x: Tensor) -> Tensor:
        """v_k = ReLU(x), computed straight into the memory (no copy); returns v_k."""
        return torch.clamp_min(x, 0, out=self.V[:, k])

    def _weighted_dots(self, r: int, x: Tensor, column: int) -> tuple[Tensor, Tensor]:
        n = self.read_times[r]
        past = self.V[:, : n + 1]
        dots = torch.mul(torch.bmm(x.unsqueeze(1), past.transpose(1, 2)), self.weights[-n - 1 :],
                         out=self.SG[:, column : column + 1, : n + 1])
        return dots, past

    def read(self, r: int, q: Tensor) -> Tensor:
        if q.data_ptr() != self.GQ[:, 2 * r + 1].data_ptr():  # else q is v_r, already there
            self.GQ[:, 2 * r + 1] = q
        scores, past = self._weighted_dots(r, q, 2 * r)
        return torch.bmm(scores, past).squeeze(1)

    def query(self, r: int) -> Tensor:
        return self.GQ[:, 2 * r + 1]

    def read_backward(self, r: int, grad_out: Tensor) -> Tensor:
        """The gradient of read r's query; keeps grad_out for the stored vectors' gradients."""
        self.GQ[:, 2 * r] = grad_out
        grad_scores, past = self._weighted_dots(r, grad_out, 2 * r + 1)
        return torch.bmm(grad_scores, past).squeeze(1)

    def stored_grad(self, k: int, plus: Tensor | None = None) -> Tensor | None:
        """dv_k from every read that saw v_k (+ `plus`, another gradient of v_k); call once all of
        them have had `read_backward`. None when no read saw v_k and there is no `plus`."""
        lo = 2 * self.first_read[k]
        if lo == self.GQ.shape[1]:
            return plus
        dv = torch.bmm(self.SG[:, lo:, k : k + 1].transpose(1, 2), self.GQ[:, lo:]).squeeze(1)
        return dv if plus is None else dv + plus


class FWLSTMSequence(torch.autograd.Function):
    """h(T) of the FW-LSTM (fw_lstm.py) from xW = x W_x + b [B, T, 4H]; memory on all gates or on j.
    With `tokens` [B, T], xW is the projected vocabulary [V, 4H] and the inputs are xW[tokens]."""

    @staticmethod
    def forward(ctx, xW, W_h, gamma, beta, gamma_c, beta_c, forget_bias: float, fast_lr: float,
                decay: float, reads: int, candidate: bool, tokens: Tensor | None = None):
        ctx.native = native.usable_for(xW)
        if not ctx.native:
            ctx.lookup = (tokens, xW.shape[0])
            xW, tokens = lookup(xW, tokens), None
        B, T, G = xW.shape if tokens is None else (*tokens.shape, xW.shape[-1])
        H = G // 4
        m0 = 3 * H if candidate else 0  # the memory's slice of the gates
        mem = _DecayedMemory(B, T, G - m0, [t for t in range(T) for _ in range(reads)], fast_lr, decay, xW)
        fb = xW.new_zeros(G)
        fb[H : 2 * H] = forget_bias
        if ctx.native:
            return native_cells.fw_lstm_forward(ctx, mem, xW, W_h, gamma, beta, fb, gamma_c, beta_c, reads,
                                                m0, tokens)
        W_hT = W_h.t()
        Z, C_pre = xW.new_empty(T, B, G), xW.new_empty(T, B, H)
        Hs = xW.new_zeros(T + 1, B, H)  # h(-1) = 0, h(0) .. h(T-1)
        c = xW.new_zeros(B, H)
        saved = []
        for t in range(T):
            z = torch.addmm(xW[:, t], Hs[t], W_hT, out=Z[t])
            z_hat, z_mean, z_rstd = _layer_norm(z, gamma, beta)
            pre = z_hat[:, m0:]
            q = mem.write_relu(t, pre)
            a = mem.read(t * reads, q)
            for s in range(1, reads):
                a = mem.read(t * reads + s, torch.relu(pre + a))
            gates = z_hat + fb
            gates[:, m0:].add_(a)  # not `+=` on a slice: Python would copy the slice back onto itself
            sig = torch.sigmoid(gates[:, : 3 * H])  # i, f, o
            g = torch.relu(gates[:, 3 * H :])
            c_pre = torch.addcmul(c * sig[:, H : 2 * H], sig[:, :H], g, out=C_pre[t])
            c_prev = c
            c, c_mean, c_rstd = _layer_norm(c_pre, gamma_c, beta_c)
            relu_c = torch.relu(c)
            torch.mul(relu_c, sig[:, 2 * H :], out=Hs[t + 1])
            saved.append((z_mean, z_rstd, sig, g, c_prev, c_mean, c_rstd, relu_c))
        ctx.mem, ctx.saved, ctx.Z, ctx.C_pre, ctx.Hs = mem, saved, Z, C_pre, Hs
        ctx.sizes, ctx.params = (B, T, G, H, m0, reads), (W_h, gamma, beta, gamma_c, beta_c)
        return Hs[T].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h):
        if ctx.native:
            return *native_cells.fw_lstm_backward(ctx, grad_h), None, None, None, None, None, None
        B, T, G, H, m0, reads = ctx.sizes
        W_h, gamma, beta, gamma_c, beta_c = ctx.params
        mem, Z, C_pre, Hs = ctx.mem, ctx.Z, ctx.C_pre, ctx.Hs
        dZ = Z.new_empty(T, B, G)
        d_ln = Z.new_empty(2, T, G)  # each step's d gamma, d beta of the gates' LN, summed at the end
        d_cell_ln = Z.new_empty(2, T, H)
        dh, dc = grad_h, None
        for t in reversed(range(T)):
            z_mean, z_rstd, sig, g, c_prev, c_mean, c_rstd, relu_c = ctx.saved[t]
            dsig = torch.empty_like(sig)
            torch.mul(dh, relu_c, out=dsig[:, 2 * H :])  # d σ(o)
            dc_out = _relu_backward(dh * sig[:, 2 * H :], relu_c)
            dc = dc_out if dc is None else dc + dc_out
            dc_pre = _layer_norm_backward(dc, C_pre[t], c_mean, c_rstd, gamma_c, beta_c,
                                          out=(torch.empty_like(dc), d_cell_ln[0, t], d_cell_ln[1, t]))[0]
            torch.mul(dc_pre, c_prev, out=dsig[:, H : 2 * H])  # d σ(f)
            torch.mul(dc_pre, g, out=dsig[:, :H])  # d σ(i)
            dc = dc_pre * sig[:, H : 2 * H]
            d_gates = Z.new_empty(B, G)
            aten.sigmoid_backward.grad_input(dsig, sig, grad_input=d_gates[:, : 3 * H])
            aten.threshold_backward.grad_input(dc_pre * sig[:, :H], g, 0, grad_input=d_gates[:, 3 * H :])
            # the memory: gates = ẑ + a_{S-1}, r_s = ReLU(ẑ + a_{s-1}), r_0 = ReLU(ẑ) = v_t
            da, d_pre = d_gates[:, m0:], None
            for s in reversed(range(reads)):
                r = t * reads + s
                dq = mem.read_backward(r, da)
                if s == 0:
                    dq = mem.stored_grad(t, plus=dq)  # r_0 is also the vector written at t
                da = _relu_backward(dq, mem.query(r))
                d_pre = da if d_pre is None else d_pre + da
            d_gates[:, m0:].add_(d_pre)
            _layer_norm_backward(d_gates, Z[t], z_mean, z_rstd, gamma, beta,
                                 out=(dZ[t], d_ln[0, t], d_ln[1, t]))
            dh = dZ[t] @ W_h
        dW_h = dZ.view(T * B, G).t() @ Hs[:T].view(T * B, H)
        dgamma, dbeta = d_ln.sum(1)
        dgamma_c, dbeta_c = d_cell_ln.sum(1)
        dxW = table_grad(dZ.transpose(0, 1), *ctx.lookup)
        return dxW, dW_h, dgamma, dbeta, dgamma_c, dbeta_c, None, None, None, None, None, None


class FWRNNSequence(torch.autograd.Function):
    """h(T) of the FW-RNN (fw_rnn.py) from Cx = C x + b [B, T, H]; Ba et al.'s equations or the authors'."""

    @staticmethod
    def forward(ctx, Cx, W, gamma, beta, fast_lr: float, decay: float, reads: int, authors: bool):
        B, T, H = Cx.shape
        # Ba: step t reads h(0) .. h(t-1) (none at t = 0); authors: u(t) is written before step t reads
        times = [t for t in range(T) for _ in range(reads)] if authors else [
            t - 1 for t in range(1, T) for _ in range(reads)]
        mem = _DecayedMemory(B, T, H, times, fast_lr, decay, Cx)
        ctx.native = native.usable_for(Cx)
        if ctx.native:
            return native_cells.fw_rnn_forward(ctx, mem, Cx, W, gamma, beta, reads, authors)
        WT = W.t()
        Hs = Cx.new_zeros(T + 1, B, H)  # h(-1) = 0, then h(0) .. h(T-1)
        U = Cx.new_empty(T, B, H)  # the authors' u(t), the input of their slow path
        saved = []
        for t in range(T):
            slow = torch.addmm(Cx[:, t], Hs[t], WT)
            if authors:  # u = ReLU(W h(t-1) + C x), written before the inner loop reads
                h_s = mem.write(t, torch.clamp_min(slow, 0, out=U[t]))  # ReLU, into U and the memory
                slow = torch.addmm(Cx[:, t], h_s, WT)
            else:
                h_s = torch.relu(slow)
            has_read = authors or t > 0
            steps = []
            for s in range(reads):
                pre = slow + mem.read(_read_index(t, s, reads, authors), h_s) if has_read else slow
                out, mean, rstd = _layer_norm(pre, gamma, beta)
                h_s = torch.relu(out)
                steps.append((pre, mean, rstd, h_s))
            Hs[t + 1] = h_s
            if not authors and t < T - 1:  # A(T) is never read
                mem.write(t, h_s)
            saved.append(steps)
        ctx.mem, ctx.saved, ctx.Hs, ctx.U = mem, saved, Hs, U
        ctx.sizes, ctx.params, ctx.authors = (B, T, H, reads), (W, gamma, beta), authors
        return Hs[T].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h):
        if ctx.native:
            return *native_cells.fw_rnn_backward(ctx, grad_h), None, None, None, None
        B, T, H, reads = ctx.sizes
        W, gamma, beta = ctx.params
        mem, Hs, U, authors = ctx.mem, ctx.Hs, ctx.U, ctx.authors
        d_slow_all = Hs.new_empty(T, B, H)
        d_u_pre_all = Hs.new_zeros(T, B, H) if authors else None
        dh = grad_h
        dgamma = dbeta = None
        for t in reversed(range(T)):
            if not authors and t < T - 1:  # h(t) as a stored vector
                dh = mem.stored_grad(t, plus=dh)
            has_read = authors or t > 0
            d_slow, d_hs = None, dh
            for s in reversed(range(reads)):
                pre, mean, rstd, h_s = ctx.saved[t][s]
                d_out = _relu_backward(d_hs, h_s)
                d_pre, dg_, db_ = _layer_norm_backward(d_out, pre, mean, rstd, gamma, beta)
                dgamma = dg_ if dgamma is None else dgamma + dg_
                dbeta = db_ if dbeta is None else dbeta + db_
                d_slow = d_pre if d_slow is None else d_slow + d_pre
                d_hs = mem.read_backward(_read_index(t, s, reads, authors), d_pre) if has_read else None
                if d_hs is None:
                    break  # without a read, the inner steps depend on the slow path only
            if authors:  # h_0 = u, slow = u Wᵀ + Cx, u = ReLU(h(t-1) Wᵀ + Cx), v_t = u
                du = mem.stored_grad(t, plus=torch.addmm(d_hs, d_slow, W))
                d_u_pre = _relu_backward(du, U[t])
                d_u_pre_all[t] = d_u_pre
                d_slow_all[t] = d_slow
                dh = d_u_pre @ W
            else:  # h_0 = ReLU(slow), slow = h(t-1) Wᵀ + Cx
                if d_hs is not None:  # h_0 = ReLU(slow) is read 0's query
                    d_slow = d_slow + _relu_backward(d_hs, mem.query(_read_index(t, 0, reads, False)))
                d_slow_all[t] = d_slow
                dh = d_slow @ W
        flat = d_slow_all.view(T * B, H)
        if authors:
            u_pre_flat = d_u_pre_all.view(T * B, H)
            dW = flat.t() @ U.view(T * B, H) + u_pre_flat.t() @ Hs[:T].view(T * B, H)
            dCx = d_slow_all + d_u_pre_all
        else:
            dW = flat.t() @ Hs[:T].view(T * B, H)
            dCx = d_slow_all
        return dCx.transpose(0, 1), dW, dgamma, dbeta, None, None, None, None


def _read_index(t: int, s: int, reads: int, authors: bool) -> int:
    return (t if authors else t - 1) * reads + s


class LNLSTMSequence(torch.autograd.Function):
    """h(T) of the LN-LSTM (ln_lstm.py) from xW = x W_x + b [B, T, 4H], gates i, j, f, o. With `tokens`
    [B, T], xW is the projected vocabulary [V, 4H] and the inputs are xW[tokens]."""

    @staticmethod
    def forward(ctx, xW, W_h, gamma, beta, gamma_c, beta_c, forget_bias: float, tokens: Tensor | None = None):
        beta_fb = beta.clone()
        beta_fb[2] += forget_bias  # σ(LN_f(f) + forget_bias); i and o have no bias, j is not a sigmoid
        ctx.native = native.usable_for(xW)
        if ctx.native:
            return native_cells.ln_lstm_forward(ctx, xW, W_h, gamma, beta_fb, gamma_c, beta_c, tokens)
        ctx.lookup = (tokens, xW.shape[0])
        xW = lookup(xW, tokens)
        B, T, G = xW.shape
        H = G // 4
        W_hT = W_h.t()
        Z, N, C_pre = xW.new_empty(T, B, G), xW.new_empty(T, B, 4, H), xW.new_empty(T, B, H)
        Hs = xW.new_zeros(T + 1, B, H)
        c = xW.new_zeros(B, H)
        saved = []
        for t in range(T):
            z = torch.addmm(xW[:, t], Hs[t], W_hT, out=Z[t])
            n, z_mean, z_rstd = _layer_norm(z.view(B, 4, H), None, None, out=N[t])
            y = torch.addcmul(beta_fb, n, gamma)  # the four gates' LN, forget bias included
            sig = torch.sigmoid(y)  # σ of i, (j), f, o
            g = torch.tanh(y[:, 1])
            c_pre = torch.addcmul(c * sig[:, 2], sig[:, 0], g, out=C_pre[t])
            c_prev = c
            c, c_mean, c_rstd = _layer_norm(c_pre, gamma_c, beta_c)
            tanh_c = torch.tanh(c)
            torch.mul(tanh_c, sig[:, 3], out=Hs[t + 1])
            saved.append((z_mean, z_rstd, sig, g, c_prev, c_mean, c_rstd, tanh_c))
        ctx.saved, ctx.Z, ctx.N, ctx.C_pre, ctx.Hs = saved, Z, N, C_pre, Hs
        ctx.sizes, ctx.params = (B, T, G, H), (W_h, gamma, gamma_c, beta_c)
        return Hs[T].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h):
        if ctx.native:
            return *native_cells.ln_lstm_backward(ctx, grad_h), None, None
        B, T, G, H = ctx.sizes
        W_h, gamma, gamma_c, beta_c = ctx.params
        Z, N, C_pre, Hs = ctx.Z, ctx.N, ctx.C_pre, ctx.Hs
        dZ, dY = Z.new_empty(T, B, G), Z.new_empty(T, B, 4, H)
        dh, dc = grad_h, None
        cell_ln_grads = []
        for t in reversed(range(T)):
            z_mean, z_rstd, sig, g, c_prev, c_mean, c_rstd, tanh_c = ctx.saved[t]
            dsig = torch.empty_like(sig)
            torch.mul(dh, tanh_c, out=dsig[:, 3])
            dc_out = aten.tanh_backward(dh * sig[:, 3], tanh_c)
            dc = dc_out if dc is None else dc + dc_out
            dc_pre, dgc, dbc = _layer_norm_backward(dc, C_pre[t], c_mean, c_rstd, gamma_c, beta_c)
            cell_ln_grads.append((dgc, dbc))
            torch.mul(dc_pre, c_prev, out=dsig[:, 2])
            torch.mul(dc_pre, g, out=dsig[:, 0])
            dc = dc_pre * sig[:, 2]
            torch.mul(dc_pre, sig[:, 0], out=dsig[:, 1])  # d g (no uninitialised memory: denormals are slow)
            aten.sigmoid_backward.grad_input(dsig, sig, grad_input=dY[t])  # row j is overwritten next
            aten.tanh_backward.grad_input(dsig[:, 1], g, grad_input=dY[t][:, 1])
            dz = _layer_norm_backward(dY[t] * gamma, Z[t].view(B, 4, H), z_mean, z_rstd, None, None)[0]
            dZ[t] = dz.view(B, G)
            dh = dZ[t] @ W_h
        dW_h = dZ.view(T * B, G).t() @ Hs[:T].view(T * B, H)
        ones = dY.new_ones(1, T * B)  # column sums as a matmul: a reduction over rows is slow on CPU
        dgamma = (ones @ (dY * N).view(T * B, G)).view(4, H)
        dbeta = (ones @ dY.view(T * B, G)).view(4, H)
        dgamma_c, dbeta_c = (torch.stack(x).sum(0) for x in zip(*cell_ln_grads, strict=True))
        dxW = table_grad(dZ.transpose(0, 1), *ctx.lookup)
        return dxW, dW_h, dgamma, dbeta, dgamma_c, dbeta_c, None, None
