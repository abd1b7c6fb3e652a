"""Tiny trainables for tests and demos of the Tune/MLflow plumbing (Ray workers import them from here).

They train nothing: each reports a made-up learning curve in milliseconds, writes a small checkpoint per
epoch, and can be told to fail, so a sweep's bookkeeping is tested without paying for real training.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any


def tiny_trainable(config: dict[str, Any]) -> None:
    """Report `epochs` epochs of a curve that rises with `quality`.

    Knobs: epochs (3), quality (0.5), sleep_s (0), fail_at_epoch (fails there), fail_once_marker (a path:
    fail at fail_at_epoch only while the file does not exist, creating it, to test retries and resume),
    checkpoint_epochs (the epochs that save a checkpoint; default all).
    """
    from ray import tune

    epochs = int(config.get("epochs", 3))
    quality = float(config.get("quality", 0.5))
    fail_at = config.get("fail_at_epoch")
    marker = config.get("fail_once_marker")
    checkpoint_epochs = config.get("checkpoint_epochs")
    start_epoch = 1
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start_epoch = json.loads((Path(folder) / "state.json").read_text())["epoch"] + 1
    for epoch in range(start_epoch, epochs + 1):
        time.sleep(float(config.get("sleep_s", 0)))
        failing = fail_at is not None and epoch == int(fail_at)
        if failing and (marker is None or not Path(marker).exists()):
            if marker is not None:
                Path(marker).touch()
            raise RuntimeError(f"tiny_trainable: planned failure at epoch {epoch}")
        val_accuracy = quality * (1 - 0.5 ** epoch)
        metrics = {
            "epoch": epoch,
            "step": epoch * 10,
            "train_loss": 1.0 / (epoch * (0.5 + quality)),
            "val_loss": 1.1 / (epoch * (0.5 + quality)),
            "val_accuracy": val_accuracy,
            "num_params": 1234,
        }
        if checkpoint_epochs is not None and epoch not in checkpoint_epochs:
            tune.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "state.json").write_text(json.dumps({"epoch": epoch}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
