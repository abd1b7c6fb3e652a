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
    """A(t) q = η Σ_τ λ^(t-τ) (v(τ)·q) v(τ), over the stored vectors; A is never formed."""

    def __init__(self, fast_lr: float, decay: float, max_len: int, like: torch.Tensor):
        # weights[k] = η λ^(max_len-1-k): the last n entries weight n stored vectors, newest last
        exponents = torch.arange(max_len - 1, -1, -1, dtype=like.dtype, device=like.device)
        self.weights = fast_lr * decay**exponents
        self.max_len = max_len
        self.stored: list[torch.Tensor] = []
        self.V: torch.Tensor | None = None  # [B, t, D], v(1) .. v(t)

    def write(self, v: torch.Tensor) -> None:
        if len(self.stored) == self.max_len:
            raise ValueError(f"AttentionMemory holds at most max_len={self.max_len} vectors")
        self.stored.append(v)
        self.V = torch.stack(self.stored, dim=1)

    def read(self, q: torch.Tensor) -> torch.Tensor:
        """A(t) q, [B, D]: scores (v(τ)·q) scaled by η λ^(t-τ), then a weighted sum of the v(τ)."""
        if self.V is None:
            return torch.zeros_like(q)
        scores = torch.bmm(self.V, q.unsqueeze(2)).squeeze(2)  # [B, t]
        scores = scores * self.weights[self.max_len - self.V.shape[1] :]
        return torch.bmm(scores.unsqueeze(1), self.V).squeeze(1)


def new_memory(
    form: FastWeightForm, fast_lr: float, decay: float, max_len: int, like: torch.Tensor
) -> FastWeightMemory:
    """An empty memory (A(0) = 0) for one batch; `max_len` bounds the number of writes."""
    if form == "matrix":
        return MatrixMemory(fast_lr, decay)
    if form == "attention":
        return AttentionMemory(fast_lr, decay, max_len, like)
    raise ValueError(f"unknown fast-weight form {form!r}; expected 'attention' or 'matrix'")
