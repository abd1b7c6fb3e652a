"""One trial: build the data and model, train, evaluate every epoch, checkpoint, report.

Runs the same under Ray Tune (through a Reporter that calls `tune.report`) and alone (`sweep train`).
For a fixed config the trajectory is a pure function of the seeds: the data from `task.seed`, the
initial weights from `train.seed`, and the batch of step s from (`train.seed`, s), so a run resumed
from any checkpoint, even one taken mid-epoch, retraces the uninterrupted run step for step.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sweep.allocator import keep_freed_memory
from sweep.checkpoint import CHECKPOINTS, find_checkpoint, load_resumable, prune_checkpoints, save_checkpoint
from sweep.config import TrainConfig, TrialConfig, dump_yaml
from sweep.cuda_graph import graphed_if_cuda
from sweep.errors import Problem, TrialDiverged, UserError
from sweep.models import build_model
from sweep.reporter import Reporter
from sweep.tasks import make_splits
from sweep.tasks.retrieval import Split

Status = Literal["completed", "target_reached", "diverged"]
StepCallback = Callable[[int, int, float], None]  # (global step, epoch, mean train loss so far this epoch)

# Training fields that shape the trajectory: a checkpoint only resumes under the same values.
_TRAJECTORY_FIELDS = ("lr", "batch_size", "steps_per_epoch", "optimizer", "weight_decay", "grad_clip", "seed")


@dataclass
class TrialOutcome:
    status: Status
    metrics: dict[str, Any]  # the last report
    best_val_accuracy: float
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint_dir: Path | None = None


class TrialInterrupted(Exception):  # noqa: N818 (an outcome, not an error)
    """Training stopped on request (Ctrl-C); the state was saved to `checkpoint_dir`."""

    def __init__(self, checkpoint_dir: Path) -> None:
        super().__init__(f"interrupted; state saved to {checkpoint_dir}")
        self.checkpoint_dir = checkpoint_dir


def steps_per_epoch(config: TrialConfig) -> int:
    """Optimizer steps between two evaluations: train.steps_per_epoch, else one pass over the train set."""
    return config.train.steps_per_epoch or _BatchOrder.batches_per_pass(config.task.train_size,
                                                                         config.train.batch_size)


def resolve_device(requested: str) -> torch.device:
    """'auto' -> CUDA when available; 'cuda' without a GPU falls back to the CPU with a warning."""
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "cuda":
        warnings.warn("train.device is 'cuda' but no CUDA GPU is visible; training on the CPU",
                      RuntimeWarning, stacklevel=2)
    return torch.device("cpu")


def run_trial(
    config: TrialConfig,
    reporter: Reporter,
    workdir: Path,
    *,
    on_step: StepCallback | None = None,
    stop: threading.Event | None = None,
) -> TrialOutcome:
    """Train one trial to its last epoch or its target accuracy; report and checkpoint every epoch.

    `on_step` is called about ten times a second for live progress; when `stop` is set the loop saves a
    checkpoint after the current step and raises TrialInterrupted. NaN/inf loss: a last report with
    `diverged: 1`, then TrialDiverged.
    """
    started = time.perf_counter()
    keep_freed_memory()  # no page faults per step (sweep/allocator.py)
    tc = config.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    device = resolve_device(tc.device)
    splits = make_splits(config.task)
    torch.manual_seed(tc.seed)
    model = build_model(config.model, splits.vocab_size, splits.num_classes).to(device)
    optimizer = make_optimizer(tc, model)
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    loop = _Loop(config, model, optimizer, device, workdir / CHECKPOINTS, num_params)

    restore = reporter.restore_dir()
    if restore is not None:
        loop.restore(Path(restore))
    loop.started = started - loop.elapsed_before

    train_x, train_y = splits.train.x.to(device), splits.train.y.to(device)
    order = _BatchOrder(len(splits.train), tc.batch_size, tc.seed, device)
    per_epoch = steps_per_epoch(config)
    last_callback = 0.0
    step_fn = graphed_if_cuda(lambda x, y: train_step(model, optimizer, x, y, tc.grad_clip), optimizer,
                              device, tc.cuda_graph)

    if loop.finished():
        return loop.final_report(reporter, splits.test)

    while loop.epoch < tc.epochs:
        epoch = loop.epoch + 1
        tick = time.perf_counter()
        for step in range(loop.step, epoch * per_epoch):
            idx = order.batch(step)
            loss = step_fn(train_x[idx], train_y[idx])
            loop.add_loss(loss)
            if (device.type == "cpu" or loop.step % 25 == 0) and not loop.loss_finite():
                loop.diverge(reporter, splits.val, time.perf_counter() - tick)
            if on_step is not None and time.perf_counter() - last_callback > 0.1:
                last_callback = time.perf_counter()
                on_step(loop.step, epoch, loop.mean_loss())
            if stop is not None and stop.is_set():
                loop.epoch_train_s += time.perf_counter() - tick
                raise TrialInterrupted(loop.save())
        loop.epoch_train_s += time.perf_counter() - tick
        if not loop.loss_finite():
            loop.diverge(reporter, splits.val, 0.0)
        metrics = loop.end_epoch(epoch, splits.val)
        reached = tc.target_accuracy is not None and metrics["val_accuracy"] >= tc.target_accuracy
        if reached or epoch == tc.epochs:
            loop.status = "target_reached" if reached else "completed"
            metrics |= _test_metrics(model, splits.test, tc.eval_batch_size)
        loop.history.append(metrics)
        checkpoint = loop.save()
        reporter.report(dict(metrics), checkpoint)
        prune_checkpoints(loop.checkpoints, tc.keep_checkpoints)
        if reached:
            break
    return loop.outcome()


# --------------------------------------------------------------------------------------- the loop state


class _Loop:
    """Everything that changes while training, and how it is saved, restored and reported."""

    def __init__(self, config: TrialConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, checkpoints: Path, num_params: int) -> None:
        self.config, self.model, self.optimizer, self.device = config, model, optimizer, device
        self.checkpoints, self.num_params = checkpoints, num_params
        self.epoch = 0  # completed epochs
        self.step = 0  # completed optimizer steps
        self.history: list[dict[str, Any]] = []
        self.status: Status | None = None
        self.best_val_accuracy = 0.0
        self.elapsed_before = 0.0  # wall time of earlier runs of this trial (before a resume)
        self.started = time.perf_counter()
        self.last_checkpoint: Path | None = None
        self._reset_epoch()

    def _reset_epoch(self, loss_sum: float = 0.0, steps: int = 0, train_s: float = 0.0) -> None:
        self.loss_sum = torch.tensor(loss_sum, dtype=torch.float64, device=self.device)
        self.epoch_steps = steps
        self.epoch_train_s = train_s

    # ---- per step
    def add_loss(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss.detach()
        self.epoch_steps += 1
        self.step += 1

    def loss_finite(self) -> bool:
        return bool(torch.isfinite(self.loss_sum))

    def mean_loss(self) -> float:
        return float(self.loss_sum) / max(1, self.epoch_steps)

    # ---- per epoch
    def end_epoch(self, epoch: int, val: Split) -> dict[str, Any]:
        tc = self.config.train
        val_loss, val_acc = evaluate(self.model, val, tc.eval_batch_size)
        self.best_val_accuracy = max(self.best_val_accuracy, val_acc)
        train_s = max(self.epoch_train_s, 1e-9)
        metrics = {
            "epoch": epoch,
            "step": self.step,
            "train_loss": self.mean_loss(),
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "best_val_accuracy": self.best_val_accuracy,
            "steps_per_s": self.epoch_steps / train_s,
            "sequences_per_s": self.epoch_steps * min(tc.batch_size, self.config.task.train_size) / train_s,
            "elapsed_s": time.perf_counter() - self.started,
            "num_params": self.num_params,
            "diverged": 0,
        }
        self.epoch = epoch
        self._reset_epoch()
        return metrics

    def diverge(self, reporter: Reporter, val: Split, train_s: float) -> None:
        """Report the divergence (no checkpoint: its weights are NaN), then raise TrialDiverged."""
        bad = float(self.loss_sum)
        self.epoch_train_s += train_s
        metrics = self.end_epoch(self.epoch + 1, val)
        metrics |= {"train_loss": bad, "diverged": 1}
        self.status = "diverged"
        self.history.append(metrics)
        reporter.report(dict(metrics), None)
        err = TrialDiverged(
            f"the training loss became {bad} by step {self.step} (epoch {metrics['epoch']}); "
            "lower train.lr or set train.grad_clip"
        )
        err.outcome = self.outcome()  # type: ignore[attr-defined]
        raise err

    def finished(self) -> bool:
        """Restored from the last checkpoint of a trial that ended, and not extended (more epochs, or a
        higher target accuracy than the one it reached)."""
        tc = self.config.train
        if self.epoch >= tc.epochs:
            return True
        if self.status == "target_reached":
            last = self.history[-1]["val_accuracy"] if self.history else 0.0
            return tc.target_accuracy is not None and last >= tc.target_accuracy
        return False

    def final_report(self, reporter: Reporter, test: Split) -> TrialOutcome:
        """A finished trial restored again: report its last metrics (with test results) once more."""
        metrics = dict(self.history[-1]) if self.history else {}
        if "test_accuracy" not in metrics:
            metrics |= _test_metrics(self.model, test, self.config.train.eval_batch_size)
            if self.history:
                self.history[-1] = metrics
        reporter.report(dict(metrics), None)
        return self.outcome()

    def outcome(self) -> TrialOutcome:
        return TrialOutcome(
            status=self.status or "completed",
            metrics=dict(self.history[-1]) if self.history else {},
            best_val_accuracy=self.best_val_accuracy,
            history=[dict(h) for h in self.history],
            checkpoint_dir=self.last_checkpoint,
        )

    # ---- checkpoints
    def save(self) -> Path:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        meta = {
            "epoch": self.epoch,
            "step": self.step,
            "status": self.status,
            "best_val_accuracy": self.best_val_accuracy,
            "elapsed_s": time.perf_counter() - self.started,
            "epoch_loss_sum": float(self.loss_sum),
            "epoch_steps": self.epoch_steps,
            "epoch_train_s": self.epoch_train_s,
            "history": self.history,
            "config": self.config.to_dict(),
        }
        self.last_checkpoint = save_checkpoint(self.checkpoints, self.step, state, meta,
                                               dump_yaml(self.config.to_dict()))
        return self.last_checkpoint

    def restore(self, path: Path) -> None:
        found = find_checkpoint(path)
        if found is None:
            raise UserError(Problem(str(path), "holds no checkpoint (state.pt + meta.json)",
                                    "give a run folder or a checkpoint folder written by `sweep train`"))
        state, meta = load_resumable(found, map_location=self.device)
        _check_same_trial(self.config, meta.get("config", {}), found)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        self.epoch, self.step, self.status = meta["epoch"], meta["step"], meta["status"]
        self.best_val_accuracy = meta["best_val_accuracy"]
        self.history = meta["history"]
        self.elapsed_before = meta["elapsed_s"]
        self._reset_epoch(meta["epoch_loss_sum"], meta["epoch_steps"], meta["epoch_train_s"])


def _check_same_trial(config: TrialConfig, saved: dict[str, Any], where: Path) -> None:
    """A checkpoint resumes only the trial it came from (epochs, device and the like may change)."""
    now = config.to_dict()
    problems = [
        Problem(section, f"differs from the checkpoint's ({saved.get(section)})",
                f"resume with the original {section} settings (see {where / 'config.yaml'}) "
                "or start a new run")
        for section in ("task", "model") if saved.get(section) != now[section]
    ]
    saved_train = saved.get("train", {})
    problems += [
        Problem(f"train.{name}", f"is {now['train'][name]!r} but the checkpoint was trained with "
                f"{saved_train.get(name)!r}", "resume with the original value or start a new run")
        for name in _TRAJECTORY_FIELDS if saved_train.get(name) != now["train"][name]
    ]
    if problems:
        raise UserError(problems, source=f"resuming from {where}")


# ------------------------------------------------------------------------------------------- pieces


class _BatchOrder:
    """The batch of global step s: a slice of the permutation of pass s // batches_per_pass.

    Each pass over the train set has its own permutation, seeded by (seed, pass), so the order is a
    function of the step alone and a resumed run needs no sampler state. The last partial batch of a
    pass is dropped.
    """

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device) -> None:
        self.n, self.batch_size, self.seed, self.device = n, min(batch_size, n), seed, device
        self.per_pass = self.batches_per_pass(n, batch_size)
        self._pass = -1
        self._perm = torch.empty(0, dtype=torch.long)

    @staticmethod
    def batches_per_pass(n: int, batch_size: int) -> int:
        return max(1, n // batch_size)

    def batch(self, step: int) -> torch.Tensor:
        pass_, i = divmod(step, self.per_pass)
        if pass_ != self._pass:
            rng = np.random.Generator(np.random.PCG64([self.seed, pass_]))
            self._perm = torch.from_numpy(rng.permutation(self.n)).to(self.device)
            self._pass = pass_
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size]


def make_optimizer(tc: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The configured optimizer, with torch's fused kernel where it has one (CPU and CUDA): one call for
    all parameters instead of several small ops per parameter (Adam's step at H=100: 0.27 -> 0.08 ms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    # None elsewhere: torch's own default there (an explicit False would also turn off its foreach choice)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params) or None
    if tc.optimizer == "adam":
        return torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=fused)
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=fused)
    return torch.optim.SGD(params, lr=tc.lr, momentum=0.9, weight_decay=tc.weight_decay, fused=fused)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               grad_clip: float | None) -> torch.Tensor:
    """One optimizer step on one batch, as every trial takes it (benchmarks/gpu.py times this too)."""
    model.train()
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss


def _batches(
    split: Split, batch_size: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(split), batch_size):
        yield split.x[i : i + batch_size].to(device), split.y[i : i + batch_size].to(device)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over a split."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for x, y in _batches(split, batch_size, device):
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(dim=1) == y).sum()
    model.train(was_training)
    n = max(1, len(split))
    return float(loss_sum) / n, int(correct) / n


def _test_metrics(model: nn.Module, test: Split, batch_size: int) -> dict[str, float]:
    loss, acc = evaluate(model, test, batch_size)
    return {"test_loss": loss, "test_accuracy": acc, "test_error": 1.0 - acc}

