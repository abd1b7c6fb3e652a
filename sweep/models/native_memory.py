"""The fast-weight memory's batched matrix-vector products as one C call each (native.py's kernels).

Each read of the memory is, per batch element, a handful of dot products and weighted sums of length D
over at most T stored vectors. `torch.bmm` runs those as one small matrix product per batch element and
pays a fixed cost for each (about 1 us: ~130 us per read at batch 128 whatever T and D). Here one C call
does a read for the whole batch: per batch element, the dots and then the weighted sum while the stored
vectors are still in cache, written straight into the caller's buffers (no copies). The FW-RNN's fused
form reads through these; the FW-LSTM's C time step (native_cells.py) reads the same buffers itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sweep.models import native


class BatchedReads:
    """The C loops bound to one memory's buffers (fused.py's `_DecayedMemory`: V, GQ, SG, weights).

    Each call passes addresses computed here by integer arithmetic: slicing the buffers into views
    would cost a few microseconds per view, as much as the loop itself at small sizes.
    """

    def __init__(self, V: Tensor, GQ: Tensor, SG: Tensor, weights: Tensor):
        for t in (V, GQ, SG, weights):  # the loops read rows of D (or T) contiguous elements
            assert t.device.type == "cpu" and t.dtype == V.dtype and t.stride(-1) == 1, (t.shape, t.stride())
        self._dots_combine = native.kernel("dots_combine", V.dtype)
        self._column_combine = native.kernel("column_combine", V.dtype)
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
