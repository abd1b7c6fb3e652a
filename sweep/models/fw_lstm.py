"""Fast Weight LSTM (Keller, Sridhar & Wang 2018), following the authors' TF cell.

    z = [h(t-1), x(t)] W + b                      gates in order i, f, o, j (4H units)
    ẑ = LN(z)                                      one layer norm over all 4H units
    r = ReLU(ẑ),   A(t) = λ A(t-1) + η r rᵀ       (4H x 4H per sequence)
    a = r A(t) = [i_A, f_A, o_A, j_A]
    g = ReLU(ĵ + j_A)
    c(t) = LN_c(c(t-1) ⊙ σ(f̂ + f_A + forget_bias) + σ(î + i_A) ⊙ g)
    h(t) = ReLU(c(t)) ⊙ σ(ô + o_A)

Inner loop (S = inner_steps): the memory is re-read with the updated rectified gates,
r_{s+1} = ReLU(ẑ + a_s), a_{s+1} = r_{s+1} A(t); the gates use the last read. S = 1 is the authors'
cell. `authors_inner_loop=True` reproduces their loop, which recomputes the same c, h S times, so S > 1
changes nothing. `fw_form="fused"` runs the same equations in one kernel (sweep/models/fused.py).
`memory="candidate"` keeps an H x H memory of r = ReLU(ĵ) that feeds the candidate
only (i_A = f_A = o_A = 0). The fast weights hold no trainable parameters: the parameter count is the
LN-LSTM's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sweep.models.common import SequenceClassifier, init_uniform_, lookup
from sweep.models.fast_weights import FastWeightMemory, new_memory
from sweep.models.fused import FWLSTMSequence
from sweep.models.params import FWLSTMParams


class FastWeightLSTM(nn.Module):
    """Embedded inputs [B, T, E] -> last hidden state h(T) [B, H]."""

    def __init__(self, p: FWLSTMParams):
        super().__init__()
        H, E = p.hidden_size, p.embed_size
        # [h, x] W + b, split as h W_h + (x W_x + b) so the input part is one matmul over all t
        self.input_proj = nn.Linear(E, 4 * H)
        self.hidden_proj = nn.Linear(H, 4 * H, bias=False)
        self.gate_norm = nn.LayerNorm(4 * H)
        self.cell_norm = nn.LayerNorm(H)
        self.hidden_size, self.forget_bias = H, p.forget_bias
        self.fast_lr, self.decay, self.inner_steps = p.fast_lr, p.decay, p.inner_steps
        self.fw_form, self.memory_kind, self.authors_inner_loop = p.fw_form, p.memory, p.authors_inner_loop
        for proj in (self.input_proj, self.hidden_proj):
            init_uniform_(proj.weight, H + E)
        nn.init.zeros_(self.input_proj.bias)

    def read_memory(self, memory: FastWeightMemory, pre: torch.Tensor) -> torch.Tensor:
        """Write r = ReLU(pre) into A, then read a = r A(t), S times with the updated gates."""
        r = F.relu(pre)
        memory.write(r)
        a = memory.read(r)
        if not self.authors_inner_loop:
            for _ in range(self.inner_steps - 1):
                a = memory.read(F.relu(pre + a))
        return a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_projected(self.input_proj(x))  # x(t) W_x + b for every t at once

    def from_projected(self, xW: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """h(T) from the projected inputs x(t) W_x + b [B, T, 4H], or from the projected vocabulary
        [V, 4H] and `tokens` [B, T] (the fused form then reads each step's rows from it)."""
        if self.fw_form == "fused":
            reads = 1 if self.authors_inner_loop else self.inner_steps
            return FWLSTMSequence.apply(
                xW, self.hidden_proj.weight, self.gate_norm.weight, self.gate_norm.bias,
                self.cell_norm.weight, self.cell_norm.bias, self.forget_bias, self.fast_lr, self.decay,
                reads, self.memory_kind == "candidate", tokens,
            )
        return self.unrolled(lookup(xW, tokens))

    def unrolled(self, xW: torch.Tensor) -> torch.Tensor:
        """The readable time loop under autograd (fw_form attention or matrix)."""
        B, T, _ = xW.shape
        H = self.hidden_size
        h = c = xW.new_zeros(B, H)
        memory = new_memory(self.fw_form, self.fast_lr, self.decay, T, like=xW)
        for xW_t in xW.unbind(1):  # unbind: one backward node instead of T slices
            z_hat = self.gate_norm(xW_t + self.hidden_proj(h))
            if self.memory_kind == "gates":
                gates = z_hat + self.read_memory(memory, z_hat)  # î+i_A, f̂+f_A, ô+o_A, ĵ+j_A
            else:
                j_hat = z_hat[:, 3 * H :]
                gates = torch.cat([z_hat[:, : 3 * H], j_hat + self.read_memory(memory, j_hat)], dim=1)
            i, f, o, j = gates.split(H, dim=1)
            g = F.relu(j)
            c = self.cell_norm(c * torch.sigmoid(f + self.forget_bias) + torch.sigmoid(i) * g)
            h = F.relu(c) * torch.sigmoid(o)
        return h


def build(params: FWLSTMParams, vocab_size: int, num_classes: int) -> nn.Module:
    return SequenceClassifier(FastWeightLSTM(params), params, vocab_size, num_classes)
