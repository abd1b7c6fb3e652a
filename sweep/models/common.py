"""The wrapper every model shares: embedding -> recurrent layer over T -> final state -> ReLU head.

The paper's ART setup (Ba et al. §4.1): a learned embedding, one recurrent layer, and the final hidden
state fed to a ReLU layer and a softmax over the answers. Each model only supplies its recurrent layer,
a module mapping embedded inputs [B, T, E] to the final hidden state [B, H].

A recurrent layer whose first step is a linear map of each input, `input_proj` (x W_x + b), with a method
`from_projected` taking those projected inputs (or the projected vocabulary and the tokens), is fed a lookup
in the projected vocabulary instead:
embedding then projection is one linear map per token, so xW = (E W_x + b)[tokens], the same function with
the same gradients (by the chain rule through the lookup's scatter-add), for a [V, E] x [E, 4H] matmul
instead of [B·T, E] x [E, 4H] forward and twice that backward. ART's vocabulary has 37 tokens, a batch
2,432; the usual path is taken when a batch has fewer tokens than the vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sweep.models.params import ModelParams
from sweep.models.registry import count_parameters

__all__ = ["SequenceClassifier", "count_parameters", "init_uniform_", "lookup", "table_grad"]


class SequenceClassifier(nn.Module):
    """Token ids [B, T] (long) -> logits [B, num_classes] (softmax is left to the loss)."""

    def __init__(self, recurrent: nn.Module, params: ModelParams, vocab_size: int, num_classes: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, params.embed_size)
        self.recurrent = recurrent
        self.head = nn.Sequential(
            nn.Linear(params.hidden_size, params.head_size),
            nn.ReLU(),
            nn.Linear(params.head_size, num_classes),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        proj = getattr(self.recurrent, "input_proj", None)
        if proj is not None and tokens.numel() >= self.embed.num_embeddings:
            projected_vocabulary = proj(self.embed.weight)  # [V, E] -> [V, width of the projection]
            return self.head(self.recurrent.from_projected(projected_vocabulary, tokens))
        return self.head(self.recurrent(self.embed(tokens)))


def lookup(table: Tensor, tokens: Tensor | None) -> Tensor:
    """xW = table[tokens] [B, T, G] from the projected vocabulary (the inputs as they are without tokens)."""
    return table if tokens is None else F.embedding(tokens, table)


def table_grad(grad_xW: Tensor, tokens: Tensor | None, rows: int) -> Tensor:
    """The projected vocabulary's gradient from that of xW = table[tokens] (that of xW without tokens): for
    the fused forms, whose backward is written out."""
    if tokens is None:
        return grad_xW
    G = grad_xW.shape[-1]
    return grad_xW.new_zeros(rows, G).index_add_(0, tokens.reshape(-1), grad_xW.reshape(-1, G))


def init_uniform_(weight: torch.Tensor, fan_in: int) -> torch.Tensor:
    """U(-√(2/fan_in), √(2/fan_in)): the initialisation of the authors' TF cells."""
    bound = (2.0 / fan_in) ** 0.5
    with torch.no_grad():
        return weight.uniform_(-bound, bound)
