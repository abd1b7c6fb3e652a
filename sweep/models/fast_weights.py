"""The fast-weight memory A(t) = λ A(t-1) + η v(t) v(t)ᵀ and its read A(t) q, in two exact forms.

Unrolled, A(t) = η Σ_{τ≤t} λ^(t-τ) v(τ) v(τ)ᵀ, so

    A(t) q = η Σ_{τ≤t} λ^(t-τ) (v(τ)·q) v(τ),

attention over the stored vectors weighted by dot product and decay (Ba et al. 2016 note this).

- `MatrixMemory` materialises A, a [B, D, D] tensor per step: the papers' form, kept as the reference.
  Autograd keeps every A(t) for the backward pass (B·D²·T numbers).
- `AttentionMemory` keeps the stored vectors [B, t, D] and never forms A: B·D·t numbers per step and
  two batched mat-vec products per read. Cheaper whenever the sequence is shorter than ~D.

Both are plain objects (no trainable parameters: fast weights are activity, not weights), made fresh
for each batch of sequences by `new_memory` and driven by the model's time loop through `write(v)` and
`read(q)`. A is symmetric, so `read` serves both A q and the authors' row-vector form q A.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch

FastWeightForm = Literal["attention", "matrix"]


class FastWeightMemory(Protocol):
    def write(self, v: torch.Tensor) -> None: ...

    def read(self, q: torch.Tensor) -> torch.Tensor: ...


class MatrixMemory:
    """A(t) as a [B, D, D] tensor (the papers' form)."""

    def __init__(self, fast_lr: float, decay: float):
        self.fast_lr, self.decay = fast_lr, decay
        self.A: torch.Tensor | None = None  # A(0) = 0

    def write(self, v: torch.Tensor) -> None:
        """A(t) = λ A(t-1) + η v vᵀ."""
        outer = self.fast_lr * v.unsqueeze(2) * v.unsqueeze(1)
        self.A = outer if self.A is None else self.decay * self.A + outer

    def read(self, q: torch.Tensor) -> torch.Tensor:
        """A(t) q, [B, D]."""
        if self.A is None:
            return torch.zeros_like(q)
        return torch.bmm(self.A, q.unsqueeze(2)).squeeze(2)


class AttentionMemory:
    """A(t) q = η Σ_τ λ^(t-τ) (v(τ)·q) v(τ), over the stored vectors; A is never formed.

    The stored vectors live in one preallocated [B, T, D] buffer, and their gradients in another, so a
    step costs O(B·t·D) time and no copy of the past (stacking the past anew at each step would copy
    O(B·T²·D) and dominate the run time). Autograd cannot track writes into a shared buffer, so a write
    and a read are two small autograd Functions with their gradients written out by hand (checked
    against the matrix form in tests/test_models.py). A scalar token passed from each write to the
    following reads and write orders the backward pass: the backward of the write of v(τ) runs after
    the backward of every read that saw v(τ), when all of v(τ)'s gradient is in the buffer.
    """

    def __init__(self, fast_lr: float, decay: float, max_len: int, like: torch.Tensor):
        # weights[k] = η λ^(max_len-1-k): the last t entries weight t stored vectors, newest last
        exponents = torch.arange(max_len - 1, -1, -1, dtype=like.dtype, device=like.device)
        self.weights = fast_lr * decay**exponents
        self.max_len = max_len
        self.count = 0  # t, the number of stored vectors
        self.V: torch.Tensor | None = None  # [B, max_len, D]: v(1) .. v(t), then unused slots
        self.dV: torch.Tensor | None = None  # the gradients of the stored vectors, filled by backward
        self.token = like.new_zeros(())

    def write(self, v: torch.Tensor) -> None:
        if self.count == self.max_len:
            raise ValueError(f"AttentionMemory holds at most max_len={self.max_len} vectors")
        if self.V is None:
            self.V = v.new_empty(v.shape[0], self.max_len, v.shape[1])  # slots are written before read
            self.dV = torch.zeros_like(self.V) if torch.is_grad_enabled() else None
        self.token = _Store.apply(v, self.token, self.V, self.dV, self.count)
        self.count += 1

    def read(self, q: torch.Tensor) -> torch.Tensor:
        """A(t) q, [B, D]."""
        if self.count == 0:
            return torch.zeros_like(q)
        weights = self.weights[self.max_len - self.count :]
        return _DecayedRead.apply(q, self.token, self.V, self.dV, weights)


class _Store(torch.autograd.Function):
    """V[:, slot] = v; backward hands v the gradient that the reads accumulated in dV[:, slot]."""

    @staticmethod
    def forward(ctx, v, token, V, dV, slot):
        V[:, slot] = v
        ctx.dV, ctx.slot = dV, slot
        return token.clone()

    @staticmethod
    def backward(ctx, grad_token):
        dv = ctx.dV[:, ctx.slot].clone()
        ctx.dV[:, ctx.slot] = 0  # a second backward through a retained graph starts from zero again
        return dv, torch.zeros_like(grad_token), None, None, None


class _DecayedRead(torch.autograd.Function):
    """out = Σ_τ w_τ (v_τ·q) v_τ over the t stored vectors, w_τ = η λ^(t-τ)."""

    @staticmethod
    def forward(ctx, q, token, V, dV, weights):
        past = V[:, : weights.shape[0]]  # [B, t, D]; later writes touch only the slots after these
        # row-vector products (q [B, 1, D] times pastᵀ): about twice as fast on CPU as past times q
        scores = torch.bmm(q.unsqueeze(1), past.transpose(1, 2)).squeeze(1) * weights  # w_τ (v_τ·q)
        ctx.save_for_backward(q, scores, weights)  # V itself is not saved: writes bump its version
        ctx.V, ctx.dV = V, dV
        return torch.bmm(scores.unsqueeze(1), past).squeeze(1)

    @staticmethod
    def backward(ctx, grad_out):
        grad_out = grad_out.contiguous()  # e.g. an expanded gradient: bmm would loop over the batch
        q, scores, weights = ctx.saved_tensors
        t = weights.shape[0]
        past = ctx.V[:, :t]
        grad_scores = torch.bmm(grad_out.unsqueeze(1), past.transpose(1, 2)).squeeze(1) * weights
        # d out / d v_τ: scores_τ g + grad_scores_τ q, accumulated in place (no [B, t, D] temporaries)
        ctx.dV[:, :t].addcmul_(scores.unsqueeze(2), grad_out.unsqueeze(1))
        ctx.dV[:, :t].addcmul_(grad_scores.unsqueeze(2), q.unsqueeze(1))
        grad_q = torch.bmm(grad_scores.unsqueeze(1), past).squeeze(1)
        return grad_q, q.new_zeros(()), None, None, None


def new_memory(
    form: FastWeightForm, fast_lr: float, decay: float, max_len: int, like: torch.Tensor
) -> FastWeightMemory:
    """An empty memory (A(0) = 0) for one batch; `max_len` bounds the number of writes."""
    if form == "matrix":
        return MatrixMemory(fast_lr, decay)
    if form == "attention":
        return AttentionMemory(fast_lr, decay, max_len, like)
    raise ValueError(f"unknown fast-weight form {form!r}; expected 'attention' or 'matrix'")
