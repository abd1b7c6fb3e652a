"""sweep/allocator.py: memory a train step frees stays mapped for the next step (no page faults per step)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import sweep.train as train_mod
from sweep import allocator
from sweep.reporter import NullReporter

# A FW-LSTM at the benchmark's size (H=100, batch 128, ART K=8), trained in a thread of its own as in a
# Tune trial; prints the minor page faults per step of that thread, warm, with malloc's defaults and then
# after keep_freed_memory() (five windows of three steps: malloc may grow a heap in one).
STEPS = r"""
import resource, threading
import torch, torch.nn.functional as F
from sweep.allocator import keep_freed_memory
from sweep.models import build_model, params_class

def train():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(params_class("fw_lstm")(hidden_size=100), 37, 10)
    optimizer = torch.optim.Adam(model.parameters())
    x, y = torch.randint(0, 37, (128, 19)), torch.randint(0, 10, (128,))
    def step():
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    def faults_per_step():
        step()
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for _ in range(3):
            step()
        return (resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) / 3
    default = faults_per_step()
    assert keep_freed_memory()
    print(default, *(faults_per_step() for _ in range(5)))

thread = threading.Thread(target=train)
thread.start()
thread.join()
"""


def faults_per_step() -> tuple[float, list[float]]:
    """(with malloc's defaults, [after keep_freed_memory, per window]) in one fresh process."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", STEPS], capture_output=True, text=True, env=env,
                          timeout=120, check=True)
    default, *kept = done.stdout.split()[-6:]
    return float(default), [float(window) for window in kept]


@pytest.mark.skipif(allocator._glibc() is None, reason="glibc's malloc only")
def test_a_train_step_reuses_the_memory_the_last_one_freed():
    default, kept = faults_per_step()
    if default < 200:
        pytest.skip(f"this malloc keeps freed memory anyway ({default:.0f} page faults per step)")
    assert sorted(kept)[2] < 50, f"page faults per step: {default:.0f} by default, {kept} kept"


def test_every_trial_keeps_freed_memory(tiny_trial, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train_mod, "keep_freed_memory", lambda: calls.append(1))
    train_mod.run_trial(tiny_trial(train={"epochs": 1}), NullReporter(), tmp_path)
    assert calls == [1]
