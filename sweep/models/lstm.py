"""The plain LSTM baseline: torch.nn.LSTM (cuDNN / fused kernels), final hidden state only."""

from __future__ import annotations

import torch
from torch import nn

from sweep.models.common import SequenceClassifier
from sweep.models.params import LSTMParams


class LSTMLayer(nn.Module):
    """Embedded inputs [B, T, E] -> last hidden state [B, H]."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h_last, _) = self.lstm(x)
        return h_last[-1]


def build(params: LSTMParams, vocab_size: int, num_classes: int) -> nn.Module:
    layer = LSTMLayer(params.embed_size, params.hidden_size)
    return SequenceClassifier(layer, params, vocab_size, num_classes)
