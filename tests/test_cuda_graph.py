"""Graphed train steps (sweep/cuda_graph.py): the eager steps' arithmetic, captured once; skipped without
a GPU except where the CPU's answer (never graphed) is the point."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sweep.config import TrainConfig
from sweep.cuda_graph import WARMUP_STEPS, GraphedStep, graphed_if_cuda
from sweep.models import build_model, params_class
from sweep.reporter import NullReporter
from sweep.train import make_optimizer, run_trial, train_step

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CASES = [("fw_lstm", "adam"), ("fw_rnn", "adamw"), ("ln_lstm", "sgd"), ("lstm", "adam")]


def test_on_the_cpu_the_step_is_never_graphed() -> None:
    def step(x, y):
        return x

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert graphed_if_cuda(step, optimizer, torch.device("cpu"), enabled=True) is step
    cuda = torch.device("cuda")
    assert isinstance(graphed_if_cuda(step, optimizer, cuda, enabled=True), GraphedStep)
    assert graphed_if_cuda(step, optimizer, cuda, enabled=False) is step


def steps_in_float64(name: str, optimizer: str, graphed: bool, steps: int = 12) -> tuple[list, list]:
    """(losses, parameters) after `steps` train steps on fixed random batches, in float64 on CUDA."""
    torch.manual_seed(0)
    fields = {"hidden_size": 12, "embed_size": 8, "head_size": 8}
    model = build_model(params_class(name)(**fields), 37, 10).to("cuda", torch.float64)
    train = TrainConfig(optimizer=optimizer, lr=0.01)
    opt = make_optimizer(train, model)
    step = graphed_if_cuda(lambda x, y: train_step(model, opt, x, y, train.grad_clip), opt,
                           torch.device("cuda"), graphed)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 37, (16, 9), generator=g), torch.randint(0, 10, (16,), generator=g))
               for _ in range(steps)]
    losses = [float(step(x.cuda(), y.cuda()).detach()) for x, y in batches]
    if graphed:
        assert step.graph is not None and not step.failed  # captured, and the later steps replayed
    return losses, [p.detach().cpu() for p in model.parameters()]


@needs_cuda
@pytest.mark.parametrize(("name", "optimizer"), CASES)
def test_graphed_steps_compute_the_eager_steps(name: str, optimizer: str) -> None:
    """In float64, where unordered sums move results by ~1e-16: a replay that read a stale buffer, a
    constant baked in at capture or a missed gradient would show at once."""
    assert WARMUP_STEPS + 1 < 12  # some steps are replays
    eager_losses, eager_params = steps_in_float64(name, optimizer, graphed=False)
    graph_losses, graph_params = steps_in_float64(name, optimizer, graphed=True)
    assert graph_losses == pytest.approx(eager_losses, rel=1e-10)
    for a, b in zip(graph_params, eager_params, strict=True):
        assert ((a - b).norm() / b.norm()).item() < 1e-10


@needs_cuda
@pytest.mark.parametrize(("model", "optimizer"), CASES)
def test_a_graphed_trial_captures_learns_and_is_faster(tiny_trial, tmp_path: Path, caplog, model: str,
                                                       optimizer: str) -> None:
    """A whole trial: every step after the warm-up replayed (no fallback warning), and faster than the
    eager trial, since these steps are bound by kernel launches."""
    runs = {}
    for graph in (False, True):
        rep = NullReporter()
        train = {"device": "cuda", "cuda_graph": graph, "optimizer": optimizer}
        with caplog.at_level("WARNING", logger="sweep.cuda_graph"):
            run_trial(tiny_trial(model={"name": model}, train=train), rep, tmp_path / str(graph))
        runs[graph] = rep.history
    assert "capture" not in caplog.text
    assert runs[True][-1]["train_loss"] < runs[True][0]["train_loss"]
    speedup = runs[True][-1]["steps_per_s"] / runs[False][-1]["steps_per_s"]
    assert speedup > (1.5 if model.startswith("fw") else 1.0), speedup
