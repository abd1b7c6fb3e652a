"""A train step replayed as one captured CUDA graph.

On a GPU these models' steps are bound by kernel launches, not by the GPU: an FW-LSTM step at H = 100 is
about 940 small kernels, each queued by Python and the dispatcher in 18-40 µs (it depends on the host
CPU), so the H200 of docs/benchmarks.md ("GPU") sat idle most of a 17-39 ms step. A CUDA graph records
the step's kernels once and then launches them all with one call: 2.2 ms there. The arithmetic is the
same kernels on the same tensors.

torch's whole-network recipe (docs: "CUDA Graphs", torch.cuda.graph): a few eager steps on a side stream
first (lazy initialisation must not happen during capture), then capture forward, backward, clipping and
the optimizer's step against fixed input tensors; each later step copies its batch into them and replays.
Every step, warm-up and capture included, is one real training step on the batch it was given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
WARMUP_STEPS = 3  # torch's recipe uses a few; autograd, cuBLAS and the optimizer's state initialise here


class GraphedStep:
    """`step(x, y) -> loss` that runs `eager` for its first steps, then captures it and replays.

    Batches of another shape than the captured one run eagerly. If capture fails (an op that waits for
    the host, say), the step says so once in the log and stays eager: slower, never wrong.
    """

    def __init__(self, eager: Step, optimizer: torch.optim.Optimizer) -> None:
        self.eager, self.optimizer = eager, optimizer
        self.steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self.static_x = self.static_y = self.static_loss = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        if self.graph is not None and x.shape == self.static_x.shape and y.shape == self.static_y.shape:
            self.static_x.copy_(x)
            self.static_y.copy_(y)
            self.graph.replay()
            return self.static_loss
        if self.failed or self.graph is not None:
            return self.eager(x, y).detach()
        if self.steps <= WARMUP_STEPS:
            return self._on_side_stream(x, y)
        return self._capture(x, y)

    def _on_side_stream(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loss = self.eager(x, y).detach()  # the caller's loss must not keep this step's autograd graph
        torch.cuda.current_stream().wait_stream(side)  # (and its side-stream nodes) alive into the capture
        return loss

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.static_x, self.static_y = x.clone(), y.clone()
        graph = torch.cuda.CUDAGraph()
        for group in self.optimizer.param_groups:  # Adam's step refuses capture without it (it keeps its
            if "capturable" in group:  # step count on the GPU then); a restored CPU checkpoint had it off
                group["capturable"] = True
        try:
            # gradients set to None: the captured backward allocates them in the graph's own pool, and
            # every replay writes them anew (no accumulation across steps)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads may use CUDA
                self.static_loss = self.eager(self.static_x, self.static_y).detach()
        except RuntimeError as error:  # nothing captured ran: this batch's step is still to do
            self.failed, self.static_x, self.static_y, self.static_loss = True, None, None, None
            log.warning("CUDA graph capture of the train step failed (%s); training on without graphs", error)
            torch.cuda.synchronize()
            return self.eager(x, y).detach()
        self.graph = graph
        graph.replay()  # capture only records: this runs the step on this batch
        return self.static_loss


def graphed_if_cuda(eager: Step, optimizer: torch.optim.Optimizer, device: torch.device,
                    enabled: bool) -> Step:
    """The step to call: graphed on CUDA when enabled, `eager` itself everywhere else."""
    return GraphedStep(eager, optimizer) if enabled and device.type == "cuda" else eager
