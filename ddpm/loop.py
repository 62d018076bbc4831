"""The reverse process, written once: :func:`reverse` takes x at schedule index ``start`` to x after step ``stop``.

    for i = start, start - 1, ..., stop:                  # schedule indices, 0 = the cleanest step
        m = model(x, timesteps[i])                        # the ORIGINAL timestep, int64 [N]
        x0_hat = clip(p_i x + q_i m, -clip, clip)
        x = a_i x + b_i x0_hat + c_i h + sigma_i z_i      # z_i = Philox(seed, global sample, step i, stream 0)
        h = x0_hat                                        # read by multistep solvers (c_i != 0) only
        on_step(i, x)

(docs/design.md, "The step" and "The loop".) What varies is injected, as in k-diffusion's ``sample_*``
functions: how a step executes (``kernel``: the fused C++/CUDA kernel, the plain torch ``ddpm.step``, or an
executor object such as ddpm.runtime's CUDA-graph replay) and who watches (``on_step``: a progress bar, the
NaN/Inf watch). The loop itself never branches on either. Arguments are validated here, once; the executors
and observers trust what they are handed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .errors import InvalidArgumentError, SamplingError
from .executors import (
    KERNELS,
    FusedExecutor,
    Model,
    ReferenceExecutor,
    StepExecutor,
    StepJob,
    split_output,
)
from .noise import STREAM_STEP, check_counter_args
from .options import SamplingOptions
from .plan import ReversePlan, rows32
from .schedule import COEF_B, COEF_C, Prediction, Schedule

__all__ = [  # the loop's pieces, re-exported from ddpm/plan.py and ddpm/executors.py
    "reverse",
    "run_reverse",
    "ReversePlan",
    "StepJob",
    "StepExecutor",
    "FusedExecutor",
    "ReferenceExecutor",
    "FiniteWatch",
    "split_output",
    "KERNELS",
    "CHECK_EVERY",
]

CHECK_EVERY = 100  # steps between NaN/Inf checks (one reduction over x each)

Observer = Callable[[int, torch.Tensor], None]


class FiniteWatch:
    """The NaN/Inf observer: ``isfinite(x).all()`` after every CHECK_EVERY-th step from ``start`` and after
    ``stop``. CPU: raise at the first bad check. CUDA: keep ``max(i + 1)`` over bad checks on the device (i
    decreases, so that is the first bad one) and read it once, after step ``stop``: the loop never waits on
    the GPU before the end."""

    def __init__(
        self,
        schedule: Schedule,
        n: int,
        *,
        device: torch.device,
        sample_offset: int = 0,
        start: int | None = None,
        stop: int = 0,
        every: int = CHECK_EVERY,
    ) -> None:
        self.schedule, self.n, self.sample_offset, self.stop = schedule, n, sample_offset, stop
        self.start = len(schedule) - 1 if start is None else start
        self.checks = frozenset(
            j for j in range(stop, self.start + 1) if (self.start + 1 - j) % every == 0 or j == stop
        )
        self.on_device = torch.device(device).type == "cuda"
        self.first_bad = torch.zeros((), dtype=torch.int64, device=device) if self.on_device else None

    def __call__(self, i: int, x: torch.Tensor) -> None:
        if i not in self.checks:
            return
        ok = torch.isfinite(x).all()
        if self.first_bad is not None:
            torch.maximum(self.first_bad, (~ok).long() * (i + 1), out=self.first_bad)
            if i == self.stop:
                bad = int(self.first_bad)  # the one host sync of the run
                if bad:
                    raise SamplingError(self._message(bad - 1))
        elif not bool(ok):
            raise SamplingError(self._message(i))

    def _message(self, i: int) -> str:
        later = [j for j in self.checks if j > i]
        first = min(later) - 1 if later else self.start  # the first step after the last clean check
        t = int(self.schedule.timesteps[i])
        last = self.sample_offset + self.n - 1
        return (
            f"sampling produced NaN/Inf between steps {first} and {i} (detected after step {i}, timestep {t}, "
            f"of {len(self.schedule)}) in samples {self.sample_offset}..{last}; the model or its export is "
            "broken, or --clip/--variance do not suit it"
        )


@torch.no_grad()
def reverse(
    model: Model,
    x: torch.Tensor,
    schedule: Schedule,
    options: SamplingOptions | None = None,
    *,
    prediction: Prediction | str = "eps",
    sample_offset: int = 0,
    start: int | None = None,
    stop: int = 0,
    kernel: str | StepExecutor | None = None,
    on_step: Observer | Sequence[Observer] | None = None,
    y: torch.Tensor | None = None,
    null_class: int | None = None,
    **fields: Any,
) -> torch.Tensor:
    """Run the reverse process from x at schedule index ``start`` through step ``stop``.

    Args:
        model: any ``model(x, t) -> output`` (a backend, an ``nn.Module``, a function), where x is
            [N, *sample_shape] float32 and t the int64 [N] ORIGINAL timestep ``schedule.timesteps[i]``; the
            output (eps, x0 or v by ``prediction``) is float32 like x.
        x: [N, *sample_shape] float32, the state at index ``start``; for a full run x_T =
            ``ddpm.noise.initial_noise(seed, shape, sample_offset=...)``. Not modified.
        schedule: the (possibly respaced) schedule whose indices i = start .. stop are run.
        options: a :class:`ddpm.SamplingOptions`; or its fields as keywords (``sampler``, ``variance``, ``eta``,
            ``clip`` (None: no clipping), ``seed``, ...; keywords override ``options``). sampler / variance /
            eta / clip select the step's coefficient table (docs/design.md, "The step").
        prediction: what the model outputs (eps | x0 | v).
        sample_offset: the global index of x[0]: sample k draws the same noise (Philox, keyed by the seed) in
            any batch, so splitting a run into batches or at any step changes nothing.
        start: the first step run, default ``len(schedule) - 1``. stop: the last step run, 0 <= stop <= start.
        kernel: "fused" (C++/CUDA kernel), "reference" (``ddpm.step``), or an executor object (see
            StepExecutor); default: the options' kernel.
        on_step: ``f(i, x)`` or a sequence of them, called after each step with x after step i
            (e.g. :class:`FiniteWatch`).
        y: for a class-conditional model, the class of each row (int64 [N]); the model is then called as
            ``model(x, t, y)``. With ``guidance=S`` (an option field; diffusers' convention, S = 1 plain
            conditional) each step runs ONE forward of the 2N rows [x; x] with classes [y; null_class] and the
            fused kernel forms m_u + S (m_c - m_u) in the same pass as the update.
        null_class: the model's null (unconditional) class index, needed for guidance != 1.
    Returns:
        x after step ``stop``: float32 like x, on x's device. That is the sample x_0 when ``stop == 0``, else the
        state at index ``stop - 1``, from which ``reverse(..., start=stop - 1)`` continues the same run.
    """
    if isinstance(kernel, str):
        fields["kernel"] = kernel
    opts = options or SamplingOptions()
    opts = opts.replace(**fields) if fields else opts
    plan = ReversePlan.create(schedule, opts, prediction=prediction, null=null_class)
    executor = opts.kernel if kernel is None or isinstance(kernel, str) else kernel
    return run_reverse(
        model, x, plan, sample_offset=sample_offset, start=start, stop=stop, kernel=executor, on_step=on_step,
        y=y,
    )  # fmt: skip


@torch.no_grad()
def run_reverse(
    model: Model,
    x: torch.Tensor,
    plan: ReversePlan,
    *,
    sample_offset: int = 0,
    start: int | None = None,
    stop: int = 0,
    kernel: str | StepExecutor = "fused",
    on_step: Observer | Sequence[Observer] | None = None,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`reverse` with the plan already made (ReversePlan.create checked it): what loops over batches call,
    so the strings are parsed and the table built once per run, not once per batch. ``y``: the rows' classes
    (int64 [N]) for a class-conditional model."""
    job = _job(model, x, plan, sample_offset, start, stop, y)
    step = _executor(kernel).bind(model, job)
    observers = _observers(on_step)
    x = job.x
    for i in range(job.start, job.stop - 1, -1):
        x = step(i)
        for observe in observers:
            observe(i, x)
    return x


def _job(
    model: Any, x: Any, plan: ReversePlan, sample_offset: Any, start: Any, stop: Any, y: Any = None
) -> StepJob:
    """Check the per-call arguments and set up the loop's own state: x (a copy), h, the run's table."""
    if not callable(model):
        raise InvalidArgumentError(f"model must be callable as model(x, t), got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.dim() < 1 or x.shape[0] < 1:
        what = f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise InvalidArgumentError(f"x must be a float32 tensor [N, ...] with N >= 1, got {what}")
    last = plan.steps - 1
    start = last if start is None else start
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or not 0 <= start <= last:
        raise InvalidArgumentError(f"start must be a schedule index in 0..{last}, got {start!r}")
    if isinstance(stop, bool) or not isinstance(stop, (int, np.integer)) or not 0 <= stop <= start:
        raise InvalidArgumentError(f"stop must be an integer in 0..{start} (start), got {stop!r}")
    start, stop = int(start), int(stop)
    sample_offset = check_counter_args(
        x.shape[0], step=start, stream=STREAM_STEP, sample_offset=sample_offset
    )[2]
    table, rows = plan.table, plan.rows32
    if table[start, COEF_C] != 0.0:
        table = table.copy()
        table[start, COEF_B] += table[start, COEF_C]
        table[start, COEF_C] = 0.0
        rows = [*rows[:start], rows32(table[start : start + 1])[0], *rows[start + 1 :]]
    x = x.detach().clone(memory_format=torch.contiguous_format)  # the caller's x is never written
    # a multistep sampler always carries h (ddpm.step requires it), even over steps whose c column is all 0
    needs_h = plan.sampler.multistep or bool(np.any(plan.table[stop : start + 1, COEF_C] != 0.0))
    timesteps = torch.from_numpy(plan.schedule.timesteps.copy()).to(x.device)
    if y is not None:
        if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or tuple(y.shape) != (x.shape[0],):
            what = f"{y.dtype} {list(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise InvalidArgumentError(f"y must be the rows' classes, int64 [{x.shape[0]}], got {what}")
        y = y.to(x.device)
    elif plan.guidance != 1.0:
        raise InvalidArgumentError(f"guidance {plan.guidance:g} needs y, the rows' classes")
    return StepJob(
        plan=plan,
        x=x,
        history=torch.zeros_like(x) if needs_h else None,
        table=table,
        rows32=rows,
        timesteps=timesteps,
        sample_offset=sample_offset,
        start=start,
        stop=stop,
        y=y,
    )


def _executor(kernel: Any) -> StepExecutor:
    if isinstance(kernel, str):
        if kernel not in KERNELS:
            raise InvalidArgumentError(f"unknown kernel {kernel!r}; allowed: {', '.join(KERNELS)}")
        return KERNELS[kernel]
    if not callable(getattr(kernel, "bind", None)):
        raise InvalidArgumentError(
            f"kernel must be one of {', '.join(KERNELS)} or an executor with .bind(model, job), "
            f"got {type(kernel).__name__}"
        )
    return kernel


def _observers(on_step: Any) -> tuple[Observer, ...]:
    if on_step is None:
        observers: tuple[Any, ...] = ()
    elif isinstance(on_step, (list, tuple)):
        observers = tuple(on_step)
    else:
        observers = (on_step,)
    for obs in observers:
        if not callable(obs):
            raise InvalidArgumentError(f"on_step must be callable as f(i, x), got {type(obs).__name__}")
    return observers
