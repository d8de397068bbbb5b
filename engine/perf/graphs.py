"""A step's forwards and backwards as CUDA graphs (train.cuda_graphs): each forward shape is captured once and
replayed after, so a step costs the host a few copies and one launch per forward instead of thousands of
kernel launches.

Packed steps repeat a few shapes (engine.perf.packing pads rows and answer slots to a few sizes; the FSKU mix
makes 5 row layouts in 113 steps), and the step is host-bound without graphs (bench/NOTES.md: the GPU waits
for the host half of a compiled step). The first time a shape comes it runs eagerly, which also compiles,
autotunes and initialises whatever that shape needs; the second time it runs on the graph's own inputs and is
captured; from the third on it is replayed.

What makes a replay the same function as the eager step:
- the inputs the loss reads are copied into the graph's own tensors before each replay, the step's
  denominator into a device scalar;
- gradients accumulate into fixed buffers (`grads`), set as the adapters' `.grad` at every step start and
  zeroed there: the captured backward adds into them in place, as eager backward adds into an existing
  `.grad`, so a step of several forwards sums them whichever way each ran;
- the graph's random numbers (LoRA dropout) come from PyTorch's generator, which advances at each replay.
PyTorch's graph trees (`mode="reduce-overhead"`) are not used: they lose gradient contributions under
gradient accumulation (pytorch/pytorch#169545).
A capture that fails (an operation graphs cannot hold) is logged once, and the run goes on eagerly.

Not in `train.speed: auto`'s plan yet: on the H200 (2026-12-02, bench/NOTES.md) the first captures failed
because a compiled layer recompiled inside the capture (inductor's constant folding launched a kernel there);
the warm-up on the graph's own inputs and the fail-on-recompile stance are the answer to that, not yet run on
a GPU.
"""
from __future__ import annotations

import copy
import logging
from typing import Callable, Sequence

import torch

from engine.batch import Batch
from engine.loss import micro_batch_loss

log = logging.getLogger("engine")

READ_BY_THE_LOSS = ("input_ids", "attention_mask", "position_ids", "answer_index", "answer_targets", "answer_owner")
"""The batch tensors a forward and its loss read: a graph's static inputs."""


class Captured:
    """One forward shape's forward + backward, captured: `run` replays it on another batch of that shape.

    Built on the shape's second occurrence, which it also computes: first eagerly on the graph's own input
    tensors on a side stream (the step's real share, and the warm-up that compiles whatever those inputs
    need: a compile inside a capture fails), then the capture, under dynamo's fail-on-recompile stance so
    that anything left to compile raises before it touches the stream."""

    def __init__(self, compute: Callable[[Batch, torch.Tensor], torch.Tensor], batch: Batch, denom: float):
        self.batch = copy.copy(batch)
        for name in READ_BY_THE_LOSS:
            value = getattr(batch, name)
            setattr(self.batch, name, None if value is None else value.clone())
        self.denom = torch.full((), float(denom), device=batch.input_ids.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.first = compute(self.batch, self.denom)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.out = None

    def capture(self, compute: Callable[[Batch, torch.Tensor], torch.Tensor], pool) -> None:
        """Record `compute` on the graph's inputs (nothing runs: the gradients stay as `__init__` left them)."""
        with torch.compiler.set_stance("fail_on_recompile"), torch.cuda.graph(self.graph, pool=pool):
            self.out = compute(self.batch, self.denom)

    def run(self, batch: Batch, denom: float) -> torch.Tensor:
        """The loss share of `batch`, its gradient added into the adapters' grads. The returned tensor is
        the graph's own output: read it before the next replay."""
        for name in READ_BY_THE_LOSS:
            static = getattr(self.batch, name)
            if static is not None:
                static.copy_(getattr(batch, name), non_blocking=True)
        self.denom.fill_(denom)
        self.graph.replay()
        return self.out


class GraphedForwards:
    """`engine.loss.forward_backward` for one run, with each forward shape captured on its second occurrence
    (module docstring). Call it with a step's batches and denominator; it returns the step's loss."""

    def __init__(self, model, params: Sequence[torch.nn.Parameter], weighting: str, chunk: int):
        self.model, self.params, self.weighting, self.chunk = model, list(params), weighting, chunk
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.pool = torch.cuda.graph_pool_handle()  # shared: one graph runs at a time, its inputs and grads live outside
        self.seen: set[tuple] = set()
        self.graphs: dict[tuple, Captured] = {}
        self.broken = ""
        """Why capture stopped (the first failure's message); empty while it works."""

    def __call__(self, batches: Sequence[Batch], denom: float) -> torch.Tensor:
        for p, g in zip(self.params, self.grads):
            p.grad = g
        torch._foreach_zero_(self.grads)
        loss = torch.zeros((), device=batches[0].input_ids.device)
        for b in batches:
            loss += self.forward_backward(b, max(1, denom))
        return loss

    def compute(self, batch: Batch, denom: float | torch.Tensor) -> torch.Tensor:
        part = micro_batch_loss(self.model, batch, self.weighting, self.chunk, denom)
        part.backward()
        return part.detach()

    def forward_backward(self, batch: Batch, denom: float) -> torch.Tensor:
        key = batch.key
        if key in self.graphs:
            return self.graphs[key].run(batch, denom)
        if key in self.seen and not self.broken:
            return self.capture(key, batch, denom)
        self.seen.add(key)
        return self.compute(batch, denom)

    def capture(self, key: tuple, batch: Batch, denom: float) -> torch.Tensor:
        """`batch`'s loss share, computed on its graph's inputs, then its shape captured for later steps."""
        graph = Captured(self.compute, batch, denom)
        try:
            graph.capture(self.compute, self.pool)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 -- any failure of capture leaves the eager path, which is correct
            while e.__context__ is not None:  # capture_end's error hides the first one
                e = e.__context__
            self.broken = f"{type(e).__name__}: {e}".splitlines()[0]
            log.warning("CUDA graph capture failed (%s); this run goes on without graphs", self.broken)
            return graph.first
        self.graphs[key] = graph
        rows, width = key[0]
        log.info("CUDA graph %d captured: forwards of %d x %d tokens, %d answer slots", len(self.graphs), rows, width,
                 key[2])
        return graph.first
