"""Learning-curve plots (PNG) for one trial and for a whole sweep; headless (Agg), no pyplot state kept."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402

ACCURACY_KEYS = ("train_accuracy", "val_accuracy")
LOSS_KEYS = ("train_loss", "val_loss")


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, row in enumerate(history, start=1):
        value = row.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            xs.append(float(row.get("epoch", i)))
            ys.append(float(value))
    return xs, ys


def plot_learning_curve(history: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Accuracy (left) and loss (right) against epoch, one point per report."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax_acc, ax_loss = fig.subplots(1, 2)
    for ax, keys, label in ((ax_acc, ACCURACY_KEYS, "accuracy"), (ax_loss, LOSS_KEYS, "loss")):
        for key in keys:
            xs, ys = _series(history, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    losses = [y for k in LOSS_KEYS for y in _series(history, k)[1]]
    if losses and min(losses) > 0:
        ax_loss.set_yscale("log")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_sweep_curves(histories: Mapping[str, tuple[str, Sequence[Mapping[str, Any]]]], metric: str,
                      path: str | Path, title: str = "") -> Path:
    """Every trial's `metric` against epoch in one chart, one colour per model (trial_id -> (model, rows))."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    models = sorted({model for model, _ in histories.values()})
    colours = {m: f"C{i % 10}" for i, m in enumerate(models)}
    labelled: set[str] = set()
    for model, rows in histories.values():
        xs, ys = _series(rows, metric)
        if xs:
            ax.plot(xs, ys, color=colours[model], alpha=0.7, linewidth=1.2,
                    label=None if model in labelled else model)
            labelled.add(model)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if labelled:
        ax.legend(loc="best", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
