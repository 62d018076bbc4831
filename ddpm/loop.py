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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from .diffusion import check_clip
from .diffusion import step as reference_step
from .errors import InvalidArgumentError, SamplingError
from .kernels import fused_step_raw
from .noise import STREAM_STEP, check_counter_args, check_seed, normal
from .schedule import COEF_B, COEF_C, COEF_P, COEF_Q, COEF_SIGMA, Prediction, Sampler, Schedule, Variance

if TYPE_CHECKING:  # typing.Self is Python 3.11+; the package supports 3.10
    from typing_extensions import Self

__all__ = [
    "reverse",
    "run_reverse",
    "ReversePlan",
    "StepJob",
    "StepExecutor",
    "FusedExecutor",
    "ReferenceExecutor",
    "FiniteWatch",
    "KERNELS",
    "CHECK_EVERY",
]

CHECK_EVERY = 100  # steps between NaN/Inf checks (one reduction over x each)

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Observer = Callable[[int, torch.Tensor], None]


@dataclass(frozen=True)
class ReversePlan:
    """Everything that fixes a reverse run's numbers except the model and x, validated (see :meth:`parse`).

    Attributes:
        schedule: the (possibly respaced) schedule; entry i feeds the model ``schedule.timesteps[i]``.
        prediction / sampler / variance / eta: select the [steps, 6] coefficient table (a, b, c, p, q, sigma).
        clip: the bound on x0_hat (math.inf = no clipping).
        seed: the Philox key, 0 <= seed < 2^64.
    """

    schedule: Schedule
    prediction: Prediction = Prediction.EPS
    sampler: Sampler = Sampler.DDPM
    variance: Variance = Variance.FIXED_SMALL
    eta: float = 0.0
    clip: float = math.inf
    seed: int = 0

    @classmethod
    def parse(
        cls,
        schedule: Schedule,
        *,
        prediction: Prediction | str = "eps",
        sampler: Sampler | str = "ddpm",
        variance: Variance | str = "fixed_small",
        eta: float = 0.0,
        clip: float | None = None,
        seed: int = 0,
        **extra: Any,
    ) -> Self:
        """Strings become enums and every value is checked, with a message naming it; ``extra`` fields are a
        subclass's (ddpm.runtime's SamplingPlan adds the sample shape and the kernel name)."""
        if not isinstance(schedule, Schedule):
            raise InvalidArgumentError(f"schedule must be a ddpm.Schedule, got {type(schedule).__name__}")
        try:
            eta = float(eta)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"eta must be a finite number >= 0, got {eta!r}") from None
        if not math.isfinite(eta) or eta < 0:
            raise InvalidArgumentError(f"eta must be a finite number >= 0, got {eta}")
        plan = cls(
            schedule=schedule,
            prediction=Prediction.parse(prediction),
            sampler=Sampler.parse(sampler),
            variance=Variance.parse(variance),
            eta=eta,
            clip=check_clip(clip),
            seed=check_seed(seed),
            **extra,
        )
        plan.table  # noqa: B018 - build (and let the solver validate) the table now, not inside the loop
        return plan

    @property
    def steps(self) -> int:
        return len(self.schedule)

    @cached_property
    def table(self) -> np.ndarray:
        """[steps, 6] float64 (a, b, c, p, q, sigma), read-only; row i is step i (0 = cleanest)."""
        return self.schedule.coefficients(self.prediction, self.sampler, self.variance, self.eta)

    @cached_property
    def rows32(self) -> list[tuple[float, ...]]:
        """The table cast once to float32 (what the kernels compute with), one tuple per step."""
        return _rows32(self.table)

    @property
    def clip_or_none(self) -> float | None:
        return None if math.isinf(self.clip) else self.clip


def _rows32(table: np.ndarray) -> list[tuple[float, ...]]:
    return [tuple(float(v) for v in row) for row in table.astype(np.float32)]


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

    def t(self, i: int) -> torch.Tensor:
        """timesteps[i] broadcast to [N]: a device op, no host sync on CUDA."""
        return self.timesteps[i : i + 1].expand(self.x.shape[0]).contiguous()


class StepExecutor(Protocol):
    """How steps execute: ``bind`` once per loop call; the callable it returns runs step i (model call and
    update) and returns x after it. Called with i = start, start - 1, ..., stop, in that order."""

    def bind(self, model: Model, job: StepJob) -> Callable[[int], torch.Tensor]: ...


class FusedExecutor:
    """The fused C++/CUDA kernel (``fused_step_raw``), in place on x, Philox noise drawn in the kernel."""

    def bind(self, model: Model, job: StepJob) -> Callable[[int], torch.Tensor]:
        x, plan, rows, off = job.x, job.plan, job.rows32, job.sample_offset
        # history only where the table has a c column: the contract's kwarg, absent for ddpm/ddim
        kw = {} if job.history is None else {"history": job.history}

        def step(i: int) -> torch.Tensor:
            m = model(x, job.t(i))
            return fused_step_raw(x, m, rows[i], plan.clip, plan.seed, i, off, x, **kw)

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

        def step(i: int) -> torch.Tensor:
            nonlocal x, prime
            m = model(x, job.t(i))
            if prime:
                _x0_hat(job.rows32[i], x, m, plan.clip, out=h)
                prime = False
            z = None
            if job.rows32[i][COEF_SIGMA] != 0.0:  # the float32 sigma the kernels and ddpm.step use
                z = normal(
                    plan.seed, shape, step=i, stream=STREAM_STEP, sample_offset=job.sample_offset, device=dev
                )
            x = reference_step(plan.schedule, i, x, m, z, **opts)
            return x

        return step


def _x0_hat(
    row: Sequence[float], x: torch.Tensor, m: torch.Tensor, clip: float, *, out: torch.Tensor
) -> None:
    """out = clip(p x + q m, -clip, clip): the first line of the step (docs/design.md, "The step")."""
    x0 = row[COEF_P] * x + row[COEF_Q] * m
    out.copy_(x0.clamp(-clip, clip) if math.isfinite(clip) else x0)


KERNELS: dict[str, StepExecutor] = {"fused": FusedExecutor(), "reference": ReferenceExecutor()}


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
    *,
    prediction: Prediction | str = "eps",
    sampler: Sampler | str = "ddpm",
    variance: Variance | str = "fixed_small",
    eta: float = 0.0,
    clip: float | None = None,
    seed: int = 0,
    sample_offset: int = 0,
    start: int | None = None,
    stop: int = 0,
    kernel: str | StepExecutor = "fused",
    on_step: Observer | Sequence[Observer] | None = None,
) -> torch.Tensor:
    """Run the reverse process from x at schedule index ``start`` through step ``stop``.

    Args:
        model: any ``model(x, t) -> output`` (a backend, an ``nn.Module``, a function), where x is
            [N, *sample_shape] float32 and t the int64 [N] ORIGINAL timestep ``schedule.timesteps[i]``; the
            output (eps, x0 or v by ``prediction``) is float32 like x.
        x: [N, *sample_shape] float32, the state at index ``start``; for a full run x_T =
            ``ddpm.noise.initial_noise(seed, shape, sample_offset=...)``. Not modified.
        schedule: the (possibly respaced) schedule whose indices i = start .. stop are run.
        prediction / sampler / variance / eta / clip: the step's coefficient table (docs/design.md, "The step");
            clip bounds x0_hat to [-clip, clip], None for no clipping.
        seed / sample_offset: the Philox key and the global index of x[0]: sample k draws the same noise in any
            batch, so splitting a run into batches or at any step changes nothing.
        start: the first step run, default ``len(schedule) - 1``. stop: the last step run, 0 <= stop <= start.
        kernel: "fused" (C++/CUDA kernel), "reference" (``ddpm.step``), or an executor object (see StepExecutor).
        on_step: ``f(i, x)`` or a sequence of them, called after each step with x after step i
            (e.g. :class:`FiniteWatch`).
    Returns:
        x after step ``stop``: float32 like x, on x's device. That is the sample x_0 when ``stop == 0``, else the
        state at index ``stop - 1``, from which ``reverse(..., start=stop - 1)`` continues the same run.
    """
    plan = ReversePlan.parse(
        schedule, prediction=prediction, sampler=sampler, variance=variance, eta=eta, clip=clip, seed=seed
    )
    return run_reverse(
        model, x, plan, sample_offset=sample_offset, start=start, stop=stop, kernel=kernel, on_step=on_step
    )


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
) -> torch.Tensor:
    """:func:`reverse` with the plan already parsed (ReversePlan.parse checked it): what loops over batches call,
    so the strings are parsed and the table built once per run, not once per batch."""
    job = _job(model, x, plan, sample_offset, start, stop)
    step = _executor(kernel).bind(model, job)
    observers = _observers(on_step)
    x = job.x
    for i in range(job.start, job.stop - 1, -1):
        x = step(i)
        for observe in observers:
            observe(i, x)
    return x


def _job(model: Any, x: Any, plan: ReversePlan, sample_offset: Any, start: Any, stop: Any) -> StepJob:
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
        rows = [*rows[:start], _rows32(table[start : start + 1])[0], *rows[start + 1 :]]
    x = x.detach().clone(memory_format=torch.contiguous_format)  # the caller's x is never written
    needs_h = bool(np.any(plan.table[stop : start + 1, COEF_C] != 0.0))
    timesteps = torch.from_numpy(plan.schedule.timesteps.copy()).to(x.device)
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
