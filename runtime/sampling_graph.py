"""``--cuda-graph``: an executor for :func:`ddpm.reverse` that records ONE reverse step in a CUDA graph and
replays it for every step of the loop.

What the graph holds (captured once per loop call):

    t   <- timesteps[counter]           # index_select on the device: the step counter never visits the host
    m   <- model(x, t[, y])             # torch model / TensorRT enqueue on the capturing stream (2N rows when
                                        # guided: [x; x] with classes [y; null])
    x   <- fused step, row [counter]    # DeviceStepTable reads (a, b, c, p, q, sigma) and the Philox step index
                                        # from device memory and decrements the counter

Coefficients passed by value into a captured kernel would be frozen at their capture-time values (the stale-
coefficient bug of other runtimes); here every per-step number is read from device memory at replay time, so
one graph serves all steps. The loop's observers run between replays (the NaN/Inf watch keeps its verdict on
the device), so nothing synchronises with the host until the loop ends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ddpm.errors import InvalidArgumentError
from ddpm.executors import StepJob, split_output
from ddpm.kernels import DeviceStepTable

__all__ = ["CudaGraphExecutor"]


class CudaGraphExecutor:
    """A :class:`ddpm.loop.StepExecutor`: the fused step from a :class:`DeviceStepTable`, the model call and
    the table step captured together and replayed once per step. Needs a CUDA x and a model that can be
    captured (a torch module, a TensorRT context: ``backend.capturable``)."""

    def __init__(self, warmup: int = 2) -> None:
        # eager iterations before capture: lazy initialisation, cuDNN/cuBLAS autotuning, torch.compile
        self.warmup = warmup

    def bind(self, model: Callable[..., torch.Tensor], job: StepJob):
        x, dev, n = job.x, job.x.device, job.x.shape[0]
        if dev.type != "cuda":
            raise InvalidArgumentError(f"CUDA-graph sampling needs x on a CUDA device, got {dev}")
        plan = job.plan
        table = DeviceStepTable(job.table, plan.clip, plan.seed, job.sample_offset, dev)
        # Guidance: ONE forward of the 2N rows [x; x] with classes [y; null], as the eager executors do
        # (ddpm/executors.py, model_call); the captured kernel forms m_u + S (m_c - m_u) in the update.
        rows = 2 * n if plan.guided else n
        t = torch.empty(rows, dtype=torch.int64, device=dev)
        labels = None
        if job.y is not None:
            null = torch.full_like(job.y, plan.null if plan.null is not None else 0)
            labels = torch.cat([job.y, null]) if plan.guided else job.y if plan.guidance == 1.0 else null
        kw: dict[str, Any] = {} if job.history is None else {"history": job.history}
        learned = plan.learned_variance

        def one_step(xbuf: torch.Tensor) -> None:
            # t from the table's device counter (read before table.step decrements it): no host value captured
            t.copy_(job.timesteps.index_select(0, table.counter).expand(rows))
            xin = torch.cat([xbuf, xbuf]) if plan.guided else xbuf
            out = model(xin, t) if labels is None else model(xin, t, labels)
            m, v = split_output(out[:n], xbuf, learned)
            extra = dict(kw, variance=v)
            if plan.guided:
                extra.update(uncond=split_output(out[n:], xbuf, False)[0], guidance=plan.guidance)
            table.step(xbuf, m, xbuf, **extra)

        # Warm-up on a scratch copy, on a side stream (torch.cuda.graph's documented recipe); x stays as given.
        # The history it writes is harmless: row `start` never reads h (StepJob makes it first order).
        scratch = x.clone()
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(min(self.warmup, job.start - job.stop + 1)):
                table.set_counter(job.start)
                one_step(scratch)
        torch.cuda.current_stream(dev).wait_stream(side)
        del scratch

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            one_step(x)
        table.set_counter(job.start)  # capture recorded the step without running it

        def step(_i: int) -> torch.Tensor:
            # the device counter, not _i, selects the row: it equals _i because the loop runs start .. stop
            graph.replay()
            return x

        return step
