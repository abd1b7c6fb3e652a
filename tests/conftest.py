"""Shared fixtures. Keep small: one tiny trial config that trains in about a second on one CPU core."""

from __future__ import annotations

from typing import Any

import pytest
from fixtures_mlflow import mlflow_server, stop_leftover_mlflow_servers  # noqa: F401  (real MLflow server)

from sweep.config import TrialConfig

TINY_TRIAL: dict[str, Any] = {
    "task": {"name": "art", "pairs": 2, "train_size": 2000, "val_size": 400, "test_size": 400, "seed": 1},
    "model": {"name": "lstm", "hidden_size": 16, "embed_size": 16, "head_size": 16},
    "train": {"epochs": 3, "batch_size": 64, "lr": 0.003, "seed": 0, "device": "cpu", "num_threads": 1},
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        nested = isinstance(value, dict) and isinstance(base.get(key), dict)
        out[key] = _merge(base[key], value) if nested else value
    return out


@pytest.fixture
def tiny_trial():
    """tiny_trial(train={"epochs": 2}) -> TrialConfig of a ~1 s LSTM run on a small ART, overrides merged."""

    def make(**sections: dict[str, Any]) -> TrialConfig:
        return TrialConfig.model_validate(_merge(TINY_TRIAL, sections))

    return make
