"""Layer-normalised LSTM, one layer norm per gate (Ba, Kiros & Hinton 2016):

    [i, j, f, o] = [x, h] W + b
    g = tanh(LN_j(j))
    c = LN_c(c ⊙ σ(LN_f(f) + forget_bias) + σ(LN_i(i)) ⊙ g)
    h = tanh(c) ⊙ σ(LN_o(o))

`cell_form="fused"` (the default) runs the same equations in one kernel per sequence
(sweep/models/fused.py). W carries a bias b like the FW-LSTM's z, so the two models have the same
parameter count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sweep.models.common import SequenceClassifier, init_uniform_, lookup
from sweep.models.fused import LNLSTMSequence
from sweep.models.params import LNLSTMParams


class GateLayerNorm(nn.Module):
    """A separate layer norm (own gain and bias over H units) for each of `gates` gates, in one call."""

    def __init__(self, gates: int, size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(gates, size))
        self.bias = nn.Parameter(torch.zeros(gates, size))
        self.eps = eps

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """[B, gates * size] -> [B, gates, size]."""
        z = z.view(z.shape[0], *self.weight.shape)
        return F.layer_norm(z, z.shape[-1:], eps=self.eps) * self.weight + self.bias


class LayerNormLSTM(nn.Module):
    """Embedded inputs [B, T, E] -> last hidden state h(T) [B, H]."""

    def __init__(self, p: LNLSTMParams):
        super().__init__()
        H, E = p.hidden_size, p.embed_size
        self.input_proj = nn.Linear(E, 4 * H)  # x W_x + b
        self.hidden_proj = nn.Linear(H, 4 * H, bias=False)  # h W_h
        self.gate_norm = GateLayerNorm(4, H)
        self.cell_norm = nn.LayerNorm(H)
        self.hidden_size, self.forget_bias, self.cell_form = H, p.forget_bias, p.cell_form
        for proj in (self.input_proj, self.hidden_proj):
            init_uniform_(proj.weight, H + E)
        nn.init.zeros_(self.input_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_projected(self.input_proj(x))

    def from_projected(self, xW: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """h(T) from the projected inputs x(t) W_x + b [B, T, 4H], or from the projected vocabulary
        [V, 4H] and `tokens` [B, T] (the fused form then reads each step's rows from it)."""
        if self.cell_form == "fused":
            return LNLSTMSequence.apply(xW, self.hidden_proj.weight, self.gate_norm.weight,
                                        self.gate_norm.bias, self.cell_norm.weight, self.cell_norm.bias,
                                        self.forget_bias, tokens)
        return self.unrolled(lookup(xW, tokens))

    def unrolled(self, xW: torch.Tensor) -> torch.Tensor:
        """The readable time loop under autograd (cell_form autograd)."""
        B, T, _ = xW.shape
        h = c = xW.new_zeros(B, self.hidden_size)
        for xW_t in xW.unbind(1):  # unbind: one backward node instead of T slices
            i, j, f, o = self.gate_norm(xW_t + self.hidden_proj(h)).unbind(1)
            g = torch.tanh(j)
            c = self.cell_norm(c * torch.sigmoid(f + self.forget_bias) + torch.sigmoid(i) * g)
            h = torch.tanh(c) * torch.sigmoid(o)
        return h


def build(params: LNLSTMParams, vocab_size: int, num_classes: int) -> nn.Module:
    return SequenceClassifier(LayerNormLSTM(params), params, vocab_size, num_classes)
