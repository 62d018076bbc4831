"""How the reverse loop's steps execute (docs/design.md, "The loop"): the executor protocol and the two the core
has, the fused C++/CUDA kernel and the plain torch reference step (the fast path's oracle). An executor is bound
once per loop call to the model and a :class:`StepJob`, and returns the callable that runs step i.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from .diffusion import DynamicThreshold
from .diffusion import step as reference_step
from .errors import InvalidArgumentError
from .kernels import dynamic_thresholds, fused_step_raw
from .noise import STREAM_STEP, normal
from .plan import ReversePlan
from .schedule import COEF_C, COEF_P, COEF_Q, COEF_SIGMA

__all__ = [
    "Model",
    "StepJob",
    "StepExecutor",
    "FusedExecutor",
    "ReferenceExecutor",
    "split_output",
    "KERNELS",
]

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class StepJob:
    """One call of the loop as an executor sees it (built by :func:`run_reverse`, already checked).

    Attributes:
        x: [N, ...] float32, contiguous, owned by the loop: executors may update it in place.
        history: h, zeros like x, when a step in ``start .. stop`` has c != 0; else None.
        table / rows32: the run's [steps, 6] float64 table and its float32 rows. When row ``start`` reads the
            history, nothing precedes it, so it is made first order here: (b, c) -> (b + c, 0), which is the
            same as h = this step's x0_hat (DPM-Solver++(2M)'s D = (1 + 1/2r) x0_hat - (1/2r) h becomes x0_hat).
        timesteps: [steps] int64, the original timesteps on x's device.
        y: the class of each row, int64 [N] on x's device, for a class-conditional model; else None.
    """

    plan: ReversePlan
    x: torch.Tensor
    history: torch.Tensor | None
    table: np.ndarray
    rows32: Sequence[tuple[float, ...]]
    timesteps: torch.Tensor
    sample_offset: int
    start: int
    stop: int
    y: torch.Tensor | None = None

    def t(self, i: int, rows: int | None = None) -> torch.Tensor:
        """timesteps[i] broadcast to [N] (or ``rows``): a device op, no host sync on CUDA."""
        return self.timesteps[i : i + 1].expand(self.x.shape[0] if rows is None else rows).contiguous()


class StepExecutor(Protocol):
    """How steps execute: ``bind`` once per loop call; the callable it returns runs step i (model call and
    update) and returns x after it. Called with i = start, start - 1, ..., stop, in that order."""

    def bind(self, model: Model, job: StepJob) -> Callable[[int], torch.Tensor]: ...


def split_output(
    out: torch.Tensor, x: torch.Tensor, learned: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model output as (mean part m, variance part v): a learned-variance model outputs [N, 2C, ...] for x
    [N, C, ...] (improved DDPM; diffusers' ``learned_range``); m = out[:, :C] and v = out[:, C:] are views (each
    sample contiguous), which the kernels take as they are. v is None for a C-channel output, and when the plan
    does not use it (``learned`` False: ddim, dpm++ or a fixed variance read the mean only)."""
    if out.shape == x.shape:
        if learned:
            raise InvalidArgumentError(
                f"variance learned_range needs a model that outputs its variance: [N, 2C, ...] for x {list(x.shape)}, "
                f"got {list(out.shape)}; use --variance fixed_small or fixed_large"
            )
        return out, None
    c = x.shape[1]
    if (
        out.dim() != x.dim()
        or out.shape[1] != 2 * c
        or out.shape[2:] != x.shape[2:]
        or out.shape[0] != x.shape[0]
    ):
        raise InvalidArgumentError(
            f"model output {list(out.shape)} is neither x's shape {list(x.shape)} nor its 2C-channel learned-variance form"
        )
    return out[:, :c], (out[:, c:] if learned else None)


def model_call(model: Model, job: StepJob) -> Callable[[int, torch.Tensor], tuple[Any, Any, Any]]:
    """``call(i, x) -> (m, v, u)``: the network's output at step i as the step's operands: m the (conditional)
    mean part, v its learned variance (None unless the plan uses it), u the null class's mean part when the plan
    is guided (one forward of the 2N rows [x; x] with classes [y; null], Ho & Salimans 2022: the guidance is done
    by the kernel, in the model's own parameterisation). Unconditional models are called as model(x, t)."""
    plan, y, learned = job.plan, job.y, job.plan.learned_variance
    if y is None:

        def plain(i: int, x: torch.Tensor) -> tuple[Any, Any, Any]:
            return (*split_output(model(x, job.t(i)), x, learned), None)

        return plain
    if not plan.guided:
        labels = y if plan.guidance == 1.0 else torch.full_like(y, plan.null)  # S = 0: the null class alone

        def conditional(i: int, x: torch.Tensor) -> tuple[Any, Any, Any]:
            return (*split_output(model(x, job.t(i), labels), x, learned), None)

        return conditional
    n = y.shape[0]
    both = torch.cat([y, torch.full_like(y, plan.null)])

    def guided(i: int, x: torch.Tensor) -> tuple[Any, Any, Any]:
        out = model(torch.cat([x, x]), job.t(i, 2 * n), both)
        m, v = split_output(out[:n], x, learned)  # the conditional half's variance (as GLIDE samples)
        u, _ = split_output(out[n:], x, False)
        return m, v, u

    return guided


class FusedExecutor:
    """The fused C++/CUDA kernel (``fused_step_raw``), in place on x, Philox noise drawn in the kernel; the
    learned-variance operand and the dynamic thresholds (computed per step, a first pass) when the plan has them."""

    def bind(self, model: Model, job: StepJob) -> Callable[[int], torch.Tensor]:
        x, plan, rows, off = job.x, job.plan, job.rows32, job.sample_offset
        dynamic = plan.clip if isinstance(plan.clip, DynamicThreshold) else None
        clip = math.inf if dynamic is not None else plan.clip
        # history only where the table has a c column: the contract's kwarg, absent for ddpm/ddim
        kw: dict[str, Any] = {} if job.history is None else {"history": job.history}
        call = model_call(model, job)
        guidance = plan.guidance

        def step(i: int) -> torch.Tensor:
            m, v, u = call(i, x)
            row = rows[i]
            if v is not None or u is not None or dynamic is not None:
                extra = dict(kw, variance=v, uncond=u, guidance=guidance if u is not None else 1.0)
                if dynamic is not None:
                    extra["thresholds"] = dynamic_thresholds(
                        x, m, row[COEF_P], row[COEF_Q], dynamic, uncond=u, guidance=extra["guidance"]
                    )
                return fused_step_raw(x, m, row, clip, plan.seed, i, off, x, **extra)
            return fused_step_raw(x, m, row, clip, plan.seed, i, off, x, **kw)

        return step


class ReferenceExecutor:
    """The plain torch step ``ddpm.step`` fed the same Philox noise as the kernel: the fast paths' oracle."""

    def bind(self, model: Model, job: StepJob) -> Callable[[int], torch.Tensor]:
        plan, h = job.plan, job.history
        shape, dev = tuple(job.x.shape), job.x.device
        opts: dict[str, Any] = {
            "prediction": plan.prediction,
            "sampler": plan.sampler,
            "variance": plan.variance,
        }
        opts.update(eta=plan.eta, clip=plan.clip_or_none, **({} if h is None else {"history": h}))
        x = job.x
        # ddpm.step derives row `start` from the schedule, not from job.table: give it h = x0_hat instead
        prime = h is not None and plan.table[job.start, COEF_C] != 0.0
        call = model_call(model, job)

        def step(i: int) -> torch.Tensor:
            nonlocal x, prime
            m, v, u = call(i, x)
            if u is not None:  # the reference is ddpm.step on the guided output, computed in torch
                m = u + plan.guidance * (m - u)
            if prime:
                _x0_hat(job.rows32[i], x, m, plan.clip, out=h)
                prime = False
            z = None
            if job.rows32[i][COEF_SIGMA] != 0.0:  # the float32 sigma the kernels and ddpm.step use
                z = normal(
                    plan.seed, shape, step=i, stream=STREAM_STEP, sample_offset=job.sample_offset, device=dev
                )
            x = reference_step(plan.schedule, i, x, m, z, **opts, variance_output=v)
            return x

        return step


def _x0_hat(
    row: Sequence[float],
    x: torch.Tensor,
    m: torch.Tensor,
    clip: float | DynamicThreshold,
    *,
    out: torch.Tensor,
) -> None:
    """out = clip(p x + q m, -clip, clip): the first line of the step (docs/design.md, "The step")."""
    x0 = row[COEF_P] * x + row[COEF_Q] * m
    if isinstance(clip, DynamicThreshold):
        out.copy_(clip.apply(x0))
    else:
        out.copy_(x0.clamp(-clip, clip) if math.isfinite(clip) else x0)


KERNELS: dict[str, StepExecutor] = {"fused": FusedExecutor(), "reference": ReferenceExecutor()}
