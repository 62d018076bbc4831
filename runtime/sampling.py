"""The reverse process: ``x_T`` from Philox, then ``m = backend(x, t_i)``, ``x = fused_step(...)`` for every step.

    x = initial_noise(seed, [N, *shape], sample_offset)          # Philox stream 1 (DESIGN.md)
    for i = steps-1 .. 0:
        m = backend(x, timesteps[i])                             # the ORIGINAL timestep, int64 [N]
        x = a_i x + b_i clip(p_i x + q_i m) + sigma_i z_i        # one fused kernel, z_i = Philox stream 0, step i

The noise depends only on (seed, global sample index, step), never on the batch layout, so sample k is the same
whatever ``batch`` is and whichever backend or device ran it. ``kernel="reference"`` replaces the fused kernel
by the plain torch step (``ddpm.step``) fed the SAME noise (``noise.normal``), for checking and benchmarking.
A NaN/Inf check runs every ``CHECK_EVERY`` steps and at the end (one reduction; on CUDA its verdict stays on the
device until the end, so the loop never waits on the GPU).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from ddpm.errors import InvalidArgumentError, SamplingError
from ddpm.metadata import schedule_from_meta
from ddpm.noise import check_seed
from ddpm.schedule import COEF_SIGMA, Prediction, Sampler, Schedule, Variance
from ddpm.diffusion import check_clip

__all__ = ["KERNELS", "CHECK_EVERY", "SamplingPlan", "SampleRun", "sample_batch", "run_batches", "sample"]

KERNELS = ("fused", "reference")
CHECK_EVERY = 100  # steps between NaN/Inf checks

StepCallback = Callable[[int], None]


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < lo
        or (hi is not None and value > hi)
    ):
        allowed = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise InvalidArgumentError(f"{name} must be an integer {allowed}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class SamplingPlan:
    """Everything that fixes a run's numbers except the network.

    Attributes:
        schedule: the sampling schedule (the training schedule respaced to ``steps``); entry i feeds the model
            the original timestep ``schedule.timesteps[i]``.
        prediction / sampler / variance / eta: select the [steps, 5] coefficient table (a, b, p, q, sigma).
        clip: bound c on x0_hat (math.inf = no clipping).
        seed: Philox key (0 <= seed < 2^64).
        sample_shape: one sample's shape, e.g. (C, H, W) or (2,).
        kernel: "fused" (the C++/CUDA kernel) or "reference" (ddpm.step + noise.normal).
    """

    schedule: Schedule
    prediction: Prediction
    sampler: Sampler = Sampler.DDPM
    variance: Variance = Variance.FIXED_SMALL
    eta: float = 0.0
    clip: float = math.inf
    seed: int = 0
    sample_shape: tuple[int, ...] = field(default=())
    kernel: str = "fused"

    @classmethod
    def create(
        cls,
        meta: dict[str, Any],
        *,
        steps: int | None = None,
        sampler: Sampler | str = "ddpm",
        eta: float = 0.0,
        variance: Variance | str = "fixed_small",
        clip: float | None = None,
        seed: int = 0,
        kernel: str = "fused",
    ) -> SamplingPlan:
        """A plan for an artifact's metadata; every argument is validated with a message naming it."""
        base = schedule_from_meta(meta)
        T = len(base)
        schedule = base if steps is None else base.respace(_check_int("steps", steps, 1, T))
        if kernel not in KERNELS:
            raise InvalidArgumentError(f"unknown kernel {kernel!r}; allowed: {', '.join(KERNELS)}")
        eta = float(eta)
        if not math.isfinite(eta) or eta < 0:
            raise InvalidArgumentError(f"eta must be a finite number >= 0, got {eta}")
        plan = cls(
            schedule=schedule,
            prediction=Prediction.parse(meta["prediction"]),
            sampler=Sampler.parse(sampler),
            variance=Variance.parse(variance),
            eta=eta,
            clip=check_clip(clip),
            seed=check_seed(seed),
            sample_shape=tuple(int(s) for s in meta["sample_shape"]),
            kernel=kernel,
        )
        plan.table  # noqa: B018 - build (and validate) the coefficient table now, not inside the loop
        return plan

    @property
    def steps(self) -> int:
        return len(self.schedule)

    @cached_property
    def table(self) -> np.ndarray:
        """[steps, 5] float64 (a, b, p, q, sigma); row i is step i (0 = cleanest)."""
        return self.schedule.coefficients(self.prediction, self.sampler, self.variance, self.eta)

    @cached_property
    def rows32(self) -> list[tuple[float, ...]]:
        """The table cast once to float32 (what the kernels compute with), one tuple per step."""
        return [tuple(float(v) for v in row) for row in self.table.astype(np.float32)]

    @property
    def clip_or_none(self) -> float | None:
        return None if math.isinf(self.clip) else self.clip

    @cached_property
    def check_indices(self) -> tuple[int, ...]:
        """Step indices after which the NaN/Inf check runs: every CHECK_EVERY steps and after step 0."""
        return tuple(j for j in range(self.steps) if (self.steps - j) % CHECK_EVERY == 0 or j == 0)


class FiniteWatch:
    """The NaN/Inf check of one batch. CPU: raise at the first bad check. CUDA: keep ``max(i + 1)`` over bad
    checks on the device (i decreases, so that is the first bad one) and read it once in ``finish``."""

    def __init__(self, plan: SamplingPlan, device: torch.device, sample_offset: int, n: int) -> None:
        self.plan, self.sample_offset, self.n = plan, sample_offset, n
        self.on_device = device.type == "cuda"
        self.first_bad = torch.zeros((), dtype=torch.int64, device=device) if self.on_device else None
        self.checks = plan.check_indices

    def check(self, x: torch.Tensor, i: int) -> None:
        ok = torch.isfinite(x).all()
        if self.on_device:
            torch.maximum(self.first_bad, (~ok).long() * (i + 1), out=self.first_bad)
        elif not bool(ok):
            raise SamplingError(self._message(i))

    def finish(self) -> None:
        if self.on_device:
            bad = int(self.first_bad)  # the one host sync of the batch
            if bad:
                raise SamplingError(self._message(bad - 1))

    def _message(self, i: int) -> str:
        later = [j for j in self.checks if j > i]
        first = min(later) - 1 if later else self.plan.steps - 1  # the first step after the last clean check
        t = int(self.plan.schedule.timesteps[i])
        last = self.sample_offset + self.n - 1
        return (
            f"sampling produced NaN/Inf between steps {first} and {i} (detected after step {i}, timestep {t}, "
            f"of {self.plan.steps}) in samples {self.sample_offset}..{last}; the model or its export is broken, "
            "or --clip/--variance do not suit it"
        )


def sample_batch(
    backend: Any,
    plan: SamplingPlan,
    n: int,
    *,
    sample_offset: int = 0,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Samples ``sample_offset .. sample_offset + n - 1``: [n, *sample_shape] float32 on ``backend.device``."""
    from ddpm.noise import STREAM_STEP, initial_noise, normal

    dev = backend.device
    shape = (n, *plan.sample_shape)
    x = initial_noise(plan.seed, shape, sample_offset=sample_offset, device=dev)
    timesteps = torch.from_numpy(plan.schedule.timesteps.copy()).to(dev)  # [steps] int64 original t
    watch = FiniteWatch(plan, dev, sample_offset, n)
    checks = set(watch.checks)
    if plan.kernel == "fused":
        from ddpm.kernels import fused_step_raw
    for i in range(plan.steps - 1, -1, -1):
        t = timesteps[i : i + 1].expand(n).contiguous()  # a device op: no host sync on CUDA
        m = backend(x, t)
        if plan.kernel == "fused":
            fused_step_raw(x, m, plan.rows32[i], plan.clip, plan.seed, i, sample_offset, out=x)  # in place
        else:
            sigma = plan.rows32[i][COEF_SIGMA]  # the float32 value the kernels and ddpm.step use
            z = (
                normal(plan.seed, shape, step=i, stream=STREAM_STEP, sample_offset=sample_offset, device=dev)
                if sigma != 0.0
                else None
            )
            x = _reference_step(plan, i, x, m, z)
        if i in checks:
            watch.check(x, i)
        if on_step is not None:
            on_step(1)
    watch.finish()
    return x


def _reference_step(plan: SamplingPlan, i: int, x: torch.Tensor, m: torch.Tensor, z: torch.Tensor | None):
    from ddpm.diffusion import step

    return step(
        plan.schedule,
        i,
        x,
        m,
        z,
        prediction=plan.prediction,
        sampler=plan.sampler,
        variance=plan.variance,
        eta=plan.eta,
        clip=plan.clip_or_none,
    )


@dataclass
class SampleRun:
    """What a run produced and how fast: samples [M, *sample_shape] float32 on the CPU."""

    samples: torch.Tensor
    backend: str
    description: str
    device: str
    steps: int
    batch: int
    kernel: str
    cuda_graph: bool
    seconds: float

    @property
    def samples_per_second(self) -> float:
        return self.samples.shape[0] / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        graph = " cuda_graph=on" if self.cuda_graph else ""
        return (
            f"backend={self.backend} device={self.device} steps={self.steps} batch={self.batch} "
            f"samples={self.samples.shape[0]} kernel={self.kernel}{graph} seconds={self.seconds:.2f} "
            f"samples/s={self.samples_per_second:.2f}"
        )


def run_batches(
    backend: Any,
    plan: SamplingPlan,
    num_samples: int,
    batch: int,
    *,
    cuda_graph: bool = False,
    on_step: StepCallback | None = None,
) -> SampleRun:
    """ceil(M / B) batches; batch b holds the global samples b*B .. min((b+1)*B, M) - 1."""
    num_samples = _check_int("num_samples", num_samples, 1)
    batch = _check_int("batch", batch, 1)
    dev = backend.device
    graph_loop = cuda_graph and getattr(backend, "capturable", False)
    if cuda_graph:
        if dev.type != "cuda":
            raise InvalidArgumentError(f"--cuda-graph needs a CUDA device; this run is on {dev}")
        if plan.kernel != "fused":
            raise InvalidArgumentError(
                "--cuda-graph records the fused kernel; it cannot be combined with --kernel reference"
            )
    if graph_loop:
        from .sampling_graph import sample_batch_graph
    outs = []
    stream = getattr(backend, "stream", None)
    if dev.type == "cuda" and stream is None:
        stream = torch.cuda.current_stream(dev)
    start = time.perf_counter()
    with torch.no_grad(), torch.cuda.stream(stream) if dev.type == "cuda" else contextlib.nullcontext():
        for offset in range(0, num_samples, batch):
            n = min(batch, num_samples - offset)
            if graph_loop:
                x = sample_batch_graph(backend, plan, n, sample_offset=offset, on_step=on_step)
            else:
                x = sample_batch(backend, plan, n, sample_offset=offset, on_step=on_step)
            outs.append(x.to("cpu"))  # on CUDA: the sync that ends the batch
    seconds = time.perf_counter() - start
    return SampleRun(
        samples=torch.cat(outs),
        backend=backend.name,
        description=backend.description,
        device=str(dev),
        steps=plan.steps,
        batch=batch,
        kernel=plan.kernel,
        cuda_graph=cuda_graph,
        seconds=seconds,
    )


def sample(
    engine: str | os.PathLike | Any,
    num_samples: int,
    *,
    steps: int | None = None,
    batch: int = 64,
    seed: int = 0,
    sampler: Sampler | str = "ddpm",
    eta: float = 0.0,
    variance: Variance | str = "fixed_small",
    clip: float | None = None,
    kernel: str = "fused",
    device: str | torch.device = "auto",
    compile: bool = False,
    cuda_graph: bool = False,
    threads: int | None = None,
) -> torch.Tensor:
    """Draw ``num_samples`` samples from an artifact (checkpoint, ONNX file or TensorRT engine), like ``ddpm run``.

    Args:
        engine: a path, or an already opened backend (runtime/backends).
        steps: sampling steps N <= T (respaced, improved-diffusion semantics); None = T.
        batch: samples per batch; sample k is the same for any batch size (Philox noise keyed by sample index).
        seed / sampler / eta / variance / clip / kernel: see SamplingPlan.
        device: auto | cpu | cuda | cuda:N.  compile, threads, cuda_graph: backend options (runtime/backends).
    Returns:
        [num_samples, *sample_shape] float32 on the CPU (images in [-1, 1] scale, as trained).
    """
    _check_int("num_samples", num_samples, 1)
    _check_int("batch", batch, 1)
    check_clip(clip)
    with _open(engine, device=device, compile=compile, threads=threads, cuda_graph=cuda_graph) as backend:
        plan = SamplingPlan.create(
            backend.meta,
            steps=steps,
            sampler=sampler,
            eta=eta,
            variance=variance,
            clip=clip,
            seed=seed,
            kernel=kernel,
        )
        return run_batches(backend, plan, num_samples, batch, cuda_graph=cuda_graph).samples


def _open(engine: Any, **options: Any) -> contextlib.AbstractContextManager:
    """A path opens (and later closes) a backend; a backend the caller opened stays open."""
    if isinstance(engine, (str, os.PathLike)):
        from .backends import open_backend

        return open_backend(engine, **options)
    if not callable(engine) or not hasattr(engine, "meta") or not hasattr(engine, "device"):
        raise InvalidArgumentError(f"engine must be a path or an open backend, got {type(engine).__name__}")
    return contextlib.nullcontext(engine)
