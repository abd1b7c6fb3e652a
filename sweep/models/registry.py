"""Model registry: the one place to add a model.

An entry names its hyperparameters (a pydantic class, torch-free) and the builder that makes the
torch module, imported only when a model is built. To add a model: write `sweep/models/<name>.py` with
`build(params, vocab_size, num_classes) -> nn.Module`, its params class in `params.py`, and a line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sweep.models.params import FWLSTMParams, FWRNNParams, LNLSTMParams, LSTMParams, ModelParams

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class ModelEntry:
    params: type[ModelParams]
    builder: str  # "module:function", imported lazily
    summary: str


MODELS: dict[str, ModelEntry] = {
    "fw_lstm": ModelEntry(
        FWLSTMParams, "sweep.models.fw_lstm:build", "Fast Weight LSTM (Keller et al. 2018)"
    ),
    "fw_rnn": ModelEntry(FWRNNParams, "sweep.models.fw_rnn:build", "Fast-weight RNN (Ba et al. 2016)"),
    "ln_lstm": ModelEntry(LNLSTMParams, "sweep.models.ln_lstm:build", "Layer-normalised LSTM"),
    "lstm": ModelEntry(LSTMParams, "sweep.models.lstm:build", "torch.nn.LSTM baseline"),
}


def model_names() -> list[str]:
    return sorted(MODELS)


def params_class(name: str) -> type[ModelParams]:
    try:
        return MODELS[name].params
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(model_names())}") from None


def build_model(params: ModelParams, vocab_size: int, num_classes: int) -> nn.Module:
    """Build the torch module for `params` (token ids [B, T] -> logits [B, num_classes])."""
    module_name, func_name = MODELS[params.name].builder.split(":")
    builder = getattr(importlib.import_module(module_name), func_name)
    return builder(params, vocab_size, num_classes)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of scalar parameters (trainable ones by default): the num_params each trial reports."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
