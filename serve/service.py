"""One server's state between the HTTP shell and the batching core: the open models, a :class:`Batcher` per
model, the limits, the metrics, and the drain flag. Async front: a request waits for its future without
blocking the event loop; the worker threads compute."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

import torch

from ddpm.errors import DDPMError
from ddpm.forward import check_timestep, timestep_for_sigma
from ddpm.metadata import schedule_from_meta
from ddpm.runtime.img2img import RESTORE_STEPS, DenoiseResult, denoise_run

from .batcher import Batcher, Closed, QueueFull
from .limits import Limits
from .metrics import Metrics
from .models import ModelHost, clip_value
from .request import DenoiseRequest, RequestError, SampleRequest

__all__ = ["Service"]


class Service:
    """Everything a request needs; ``close`` stops the workers and closes the models."""

    def __init__(
        self, hosts: Mapping[str, ModelHost], limits: Limits, metrics: Metrics | None = None
    ) -> None:
        if not hosts:
            raise DDPMError("a server needs at least one model")
        self.hosts, self.limits = dict(hosts), limits
        self.metrics = metrics or Metrics()
        self.base = next(iter(self.hosts.values())).options
        self.batchers: dict[str, Batcher] = {}
        for name, host in self.hosts.items():
            b = Batcher(
                host.backend,
                max_batch=limits.max_batch,
                max_wait_s=limits.max_wait_s,
                max_queue=limits.max_queue,
                name=name,
            )
            b.on_batch = self.metrics.track_model(name, lambda b=b: b.pending)
            self.batchers[name] = b
        self.draining = False
        self.in_flight = 0
        self.closed = False

    @property
    def models(self) -> list[str]:
        return list(self.hosts)

    async def sample(self, req: SampleRequest) -> tuple[torch.Tensor, dict[str, Any], str]:
        """(samples [n, *shape] float32 CPU, the run's settings, the network precision)."""
        host = self.hosts[req.model]
        try:
            key, plan = host.plan(req.options)
        except DDPMError as e:
            raise RequestError(str(e)) from None
        if plan.steps > self.limits.max_steps:
            raise RequestError(f"steps must be <= {self.limits.max_steps} on this server, got {plan.steps}")
        batcher = self.batchers[req.model]
        try:
            ticket = batcher.submit((req.model, key), plan, req.options.seed, req.num_samples)
        except QueueFull as e:
            raise RequestError(str(e), 429, {"Retry-After": str(e.retry_after)}) from None
        except Closed as e:
            raise RequestError(str(e), 503, {"Retry-After": "1"}) from None
        x = await self._wait(ticket.future)
        settings = {
            "model": req.model,
            "num_samples": req.num_samples,
            "seed": req.options.seed,
            "sampler": str(plan.sampler),
            "steps": plan.steps,
            "spacing": plan.schedule.config.get("spacing", "uniform"),
            "eta": plan.eta,
            "clip": clip_value(plan.clip),
            "variance": str(plan.variance),
        }
        if plan.classes is not None:  # a class-conditional model: the class indices, cycled over the samples
            settings.update(classes=list(plan.classes), guidance=plan.guidance)
        return x, settings, str(getattr(host.backend, "precision", "fp32"))

    def check_denoise(self, req: DenoiseRequest) -> None:
        """The step cap, before any image is decoded: the steps ``denoise_run`` will take (given, or its
        default from t or sigma)."""
        base = schedule_from_meta(self.hosts[req.model].meta)
        try:
            t = check_timestep(base, req.t) if req.sigma is None else timestep_for_sigma(base, req.sigma)
        except DDPMError as e:
            raise RequestError(str(e)) from None
        steps = req.options.steps or t + 1
        if not req.add_noise and req.options.sampler is None:  # restoring: denoise_run's default DDIM steps
            steps = req.options.steps or min(RESTORE_STEPS, t + 1)
        if steps > self.limits.max_steps:
            raise RequestError(
                f"denoising from t={t} takes {steps} steps; this server allows {self.limits.max_steps} "
                "(give steps)"
            )

    async def denoise(self, req: DenoiseRequest, images: torch.Tensor) -> DenoiseResult:
        """``ddpm denoise`` on the model's worker thread (its backend is called from that thread only)."""

        def job(backend: Any) -> DenoiseResult:
            return denoise_run(backend, images, req.t, req.options, sigma=req.sigma, add_noise=req.add_noise)

        try:
            fut = self.batchers[req.model].call(job, cost=images.shape[0])
        except QueueFull as e:
            raise RequestError(str(e), 429, {"Retry-After": str(e.retry_after)}) from None
        except Closed as e:
            raise RequestError(str(e), 503, {"Retry-After": "1"}) from None
        try:
            return await self._wait(fut)
        except DDPMError as e:  # the image or the options do not suit the model
            if isinstance(e, (RequestError, Closed)) or not isinstance(e, ValueError):
                raise
            raise RequestError(str(e)) from None

    async def _wait(self, fut: Future) -> Any:
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.limits.timeout_s)
        except asyncio.TimeoutError:  # the builtin TimeoutError from 3.11 on
            raise RequestError(
                f"not answered within {self.limits.timeout_s:g} s (--timeout-s); the server is busy",
                503,
                {"Retry-After": "1"},
            ) from None

    def close(self, timeout: float = 5.0) -> None:
        """Stop the workers (waiting work is refused), then close the models whose worker has stopped."""
        if self.closed:
            return
        self.closed = True
        for name, b in self.batchers.items():
            if b.close(timeout):
                self.hosts[name].close()
