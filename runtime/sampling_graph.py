"""``--cuda-graph``: record ONE reverse step in a CUDA graph and replay it for every step of a batch.

What the graph holds (captured once per batch):

    t   <- timesteps[counter]           # index_select on the device: the step counter never visits the host
    m   <- backend(x, t)                # torch model / TensorRT enqueue on the capturing stream
    x   <- fused step, row [counter]    # DeviceStepTable reads (a, b, p, q, sigma) and the Philox step index
                                        # from device memory and decrements the counter
Coefficients passed by value into a captured kernel would be frozen at their capture-time values (the stale-
coefficient bug of other runtimes); here every per-step number is read from device memory at replay time, so
one graph serves all steps. The loop on the host is ``graph.replay()`` plus, every CHECK_EVERY steps, a NaN/Inf
reduction whose verdict stays on the device: no host synchronisation until the batch ends.
"""

from __future__ import annotations

from typing import Any

import torch

from ddpm.errors import InvalidArgumentError
from .sampling import FiniteWatch, SamplingPlan, StepCallback

__all__ = ["sample_batch_graph"]

_WARMUP = 2  # eager iterations before capture: lazy initialisation, cuDNN/cuBLAS autotuning, torch.compile


def sample_batch_graph(
    backend: Any,
    plan: SamplingPlan,
    n: int,
    *,
    sample_offset: int = 0,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Like :func:`ddpm.runtime.sampling.sample_batch` (same numbers), with each step a graph replay."""
    from ddpm.kernels import DeviceStepTable
    from ddpm.noise import initial_noise

    dev = backend.device
    if dev.type != "cuda" or not getattr(backend, "capturable", False):
        raise InvalidArgumentError(
            f"CUDA-graph sampling needs a capturable backend on a CUDA device, got {backend.name} on {dev}"
        )
    steps = plan.steps
    x = initial_noise(plan.seed, (n, *plan.sample_shape), sample_offset=sample_offset, device=dev)
    timesteps = torch.from_numpy(plan.schedule.timesteps.copy()).to(dev)
    t = torch.empty(n, dtype=torch.int64, device=dev)
    table = DeviceStepTable(plan.table, plan.clip, plan.seed, sample_offset, dev)

    def one_step(xbuf: torch.Tensor) -> None:
        # t from the table's device counter (read before table.step decrements it): no host value captured
        t.copy_(timesteps.index_select(0, table.counter).expand(n))
        m = backend(xbuf, t)
        table.step(xbuf, m, out=xbuf)

    def rewind() -> None:
        table.set_counter(steps - 1)

    # Warm-up on a scratch copy, on a side stream (torch.cuda.graph's documented recipe); x stays x_T.
    scratch = x.clone()
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(min(_WARMUP, steps)):
            rewind()
            one_step(scratch)
    torch.cuda.current_stream(dev).wait_stream(side)
    del scratch

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        one_step(x)
    rewind()  # capture recorded the step without running it; start from row steps-1

    watch = FiniteWatch(plan, dev, sample_offset, n)
    checks = set(watch.checks)
    for i in range(steps - 1, -1, -1):
        graph.replay()
        if i in checks:
            watch.check(x, i)
        if on_step is not None:
            on_step(1)
    watch.finish()
    out = x.clone()  # x belongs to this graph's buffers; hand back memory the caller owns
    del graph
    return out
