"""Fast-weight RNN (Ba et al. 2016, "Using Fast Weights to Attend to the Recent Past").

    A(0) = 0,   A(t) = λ A(t-1) + η h(t) h(t)ᵀ
    h_0(t+1) = ReLU(W h(t) + C x(t))
    h_{s+1}(t+1) = ReLU(LN[W h(t) + C x(t) + A(t) h_s(t+1)]),   s = 0 .. S-1
    h(t+1) = h_S(t+1)

variant="authors" follows the authors' TF cell (akandykeller/fast_weights, lnfw_rnn_cell.py): the
preliminary vector u = h_0(t+1) is written into A before the inner loop reads it, and the inner loop
uses W u instead of W h(t):

    u = ReLU(W h(t) + C x(t)),   A(t+1) = λ A(t) + η u uᵀ
    h_{s+1} = ReLU(LN[W u + C x(t) + A(t+1) h_s]),   h_0 = u

fw_form="fused" runs the same equations in one kernel per sequence (sweep/models/fused.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sweep.models.common import SequenceClassifier, init_uniform_, lookup
from sweep.models.fast_weights import new_memory
from sweep.models.fused import FWRNNSequence
from sweep.models.params import FWRNNParams


class FastWeightRNN(nn.Module):
    """Embedded inputs [B, T, E] -> last hidden state h(T) [B, H]."""

    def __init__(self, p: FWRNNParams):
        super().__init__()
        self.input_proj = nn.Linear(p.embed_size, p.hidden_size)  # C x + b
        self.recurrent = nn.Linear(p.hidden_size, p.hidden_size, bias=False)  # W, slow weights
        self.norm = nn.LayerNorm(p.hidden_size)
        self.fast_lr, self.decay, self.inner_steps = p.fast_lr, p.decay, p.inner_steps
        self.fw_form, self.variant = p.fw_form, p.variant
        init_uniform_(self.input_proj.weight, p.embed_size)
        nn.init.zeros_(self.input_proj.bias)
        with torch.no_grad():
            self.recurrent.weight.copy_(p.slow_init_scale * torch.eye(p.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_projected(self.input_proj(x))  # C x(t) + b for every t at once

    def from_projected(self, Cx: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """h(T) from the projected inputs C x(t) + b [B, T, H], or from the projected vocabulary [V, H] and
        `tokens` [B, T]."""
        Cx = lookup(Cx, tokens)
        if self.fw_form == "fused":
            return FWRNNSequence.apply(Cx, self.recurrent.weight, self.norm.weight, self.norm.bias,
                                       self.fast_lr, self.decay, self.inner_steps, self.variant == "authors")
        return self.unrolled(Cx)

    def unrolled(self, Cx: torch.Tensor) -> torch.Tensor:
        """The readable time loop under autograd (fw_form attention or matrix)."""
        B, T, _ = Cx.shape
        h = Cx.new_zeros(B, self.recurrent.in_features)
        memory = new_memory(self.fw_form, self.fast_lr, self.decay, T, like=Cx)
        for t, Cx_t in enumerate(Cx.unbind(1)):  # unbind: one backward node, not T
            if self.variant == "ba":
                slow = self.recurrent(h) + Cx_t  # W h(t) + C x(t)
                h_s = F.relu(slow)
                for _ in range(self.inner_steps):
                    h_s = F.relu(self.norm(slow + memory.read(h_s)))
                h = h_s
                if t < T - 1:  # A(T) is never read
                    memory.write(h)
            else:  # the authors' cell
                u = F.relu(self.recurrent(h) + Cx_t)
                memory.write(u)
                slow = self.recurrent(u) + Cx_t
                h_s = u
                for _ in range(self.inner_steps):
                    h_s = F.relu(self.norm(slow + memory.read(h_s)))
                h = h_s
        return h


def build(params: FWRNNParams, vocab_size: int, num_classes: int) -> nn.Module:
    return SequenceClassifier(FastWeightRNN(params), params, vocab_size, num_classes)
