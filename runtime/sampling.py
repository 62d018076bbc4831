"""Sampling from an artifact: x_T from Philox, then :func:`ddpm.reverse`'s loop, batch by batch.

    x = initial_noise(seed, [N, *shape], sample_offset)          # Philox stream 1 (docs/design.md, "Noise")
    x = run_reverse(backend, x, plan, sample_offset=...)         # the one reverse loop (ddpm/loop.py)

The noise depends only on (seed, global sample index, step), never on the batch layout, so sample k is the same
whatever ``batch`` is and whichever backend or device ran it. This module adds what the core loop does not know
about: artifact metadata (the plan), backends and their streams, batches, the NaN/Inf watch on every batch and
the ``--cuda-graph`` executor.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ddpm.errors import InvalidArgumentError
from ddpm.loop import CHECK_EVERY, KERNELS, FiniteWatch, ReversePlan, StepExecutor, run_reverse
from ddpm.metadata import schedule_from_meta
from ddpm.noise import initial_noise
from ddpm.schedule import Sampler, Variance

from .backends import open_backend
from .sampling_graph import CudaGraphExecutor

__all__ = [
    "KERNELS",
    "CHECK_EVERY",
    "SamplingPlan",
    "SampleRun",
    "sample_batch",
    "run_batches",
    "sample_run",
    "sample",
]

StepCallback = Callable[[int], None]  # progress: called with the number of steps just done


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
class SamplingPlan(ReversePlan):
    """A :class:`ddpm.loop.ReversePlan` for an artifact, plus what its batches need.

    Attributes:
        sample_shape: one sample's shape, e.g. (C, H, W) or (2,).
        kernel: "fused" (the C++/CUDA kernel) or "reference" (ddpm.step + noise.normal).
    """

    sample_shape: tuple[int, ...] = ()
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
        """A plan for an artifact's (already validated) metadata; every argument is checked here, once."""
        base = schedule_from_meta(meta)
        schedule = base if steps is None else base.respace(_check_int("steps", steps, 1, len(base)))
        if kernel not in KERNELS:
            raise InvalidArgumentError(f"unknown kernel {kernel!r}; allowed: {', '.join(KERNELS)}")
        return cls.parse(
            schedule,
            prediction=meta["prediction"],
            sampler=sampler,
            variance=variance,
            eta=eta,
            clip=clip,
            seed=seed,
            sample_shape=tuple(int(s) for s in meta["sample_shape"]),
            kernel=kernel,
        )


def sample_batch(
    backend: Any,
    plan: SamplingPlan,
    n: int,
    *,
    sample_offset: int = 0,
    on_step: StepCallback | None = None,
    executor: StepExecutor | None = None,
) -> torch.Tensor:
    """Samples ``sample_offset .. sample_offset + n - 1``: [n, *sample_shape] float32 on ``backend.device``.

    ``executor`` replaces the plan's kernel (the CUDA-graph executor does)."""
    dev = backend.device
    x = initial_noise(plan.seed, (n, *plan.sample_shape), sample_offset=sample_offset, device=dev)
    observers: list[Callable[[int, torch.Tensor], None]] = [
        FiniteWatch(plan.schedule, n, device=dev, sample_offset=sample_offset)
    ]
    if on_step is not None:
        observers.append(lambda _i, _x: on_step(1))  # host-side bookkeeping only: no device sync
    kernel = executor if executor is not None else plan.kernel
    return run_reverse(backend, x, plan, sample_offset=sample_offset, kernel=kernel, on_step=observers)


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


def graph_executor(backend: Any, plan: SamplingPlan, cuda_graph: bool) -> StepExecutor | None:
    """The executor ``--cuda-graph`` asks for: a captured step for capturable backends (torch, TensorRT); None
    (the plan's kernel) for onnxruntime, which records its own CUDA graph inside the session."""
    if not cuda_graph:
        return None
    if backend.device.type != "cuda":
        raise InvalidArgumentError(f"--cuda-graph needs a CUDA device; this run is on {backend.device}")
    if plan.kernel != "fused":
        raise InvalidArgumentError(
            "--cuda-graph records the fused kernel; it cannot be combined with --kernel reference"
        )
    return CudaGraphExecutor() if getattr(backend, "capturable", False) else None


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
    return _run_batches(backend, plan, num_samples, batch, cuda_graph, on_step)


def _run_batches(
    backend: Any,
    plan: SamplingPlan,
    num_samples: int,
    batch: int,
    cuda_graph: bool,
    on_step: StepCallback | None,
) -> SampleRun:
    executor = graph_executor(backend, plan, cuda_graph)
    dev = backend.device
    stream = getattr(backend, "stream", None)
    if dev.type == "cuda" and stream is None:
        stream = torch.cuda.current_stream(dev)
    outs = []
    start = time.perf_counter()
    with torch.no_grad(), torch.cuda.stream(stream) if dev.type == "cuda" else contextlib.nullcontext():
        for offset in range(0, num_samples, batch):
            n = min(batch, num_samples - offset)
            x = sample_batch(backend, plan, n, sample_offset=offset, on_step=on_step, executor=executor)
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


def sample_run(
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
    on_start: Callable[[Any, SamplingPlan], None] | None = None,
    on_step: StepCallback | None = None,
) -> SampleRun:
    """:func:`sample` with the run's facts: what ``ddpm run`` calls. The artifact is opened (and its metadata
    read) once, the plan built once; ``on_start(backend, plan)`` runs before the first batch (the CLI prints
    its header and starts the progress bar there), ``on_step(k)`` after every k steps."""
    num_samples = _check_int("num_samples", num_samples, 1)
    batch = _check_int("batch", batch, 1)
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
        if on_start is not None:
            on_start(backend, plan)
        return _run_batches(backend, plan, num_samples, batch, cuda_graph, on_step)


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
        seed / sampler / eta / variance / clip / kernel: see :func:`ddpm.reverse`; sampler is any name
            ``ddpm.Sampler`` accepts (ddpm, ddim, dpm++2m, dpm++2m-sde).
        device: auto | cpu | cuda | cuda:N.  compile, threads, cuda_graph: backend options (runtime/backends).
    Returns:
        [num_samples, *sample_shape] float32 on the CPU (images in [-1, 1] scale, as trained).
    """
    return sample_run(
        engine,
        num_samples,
        steps=steps,
        batch=batch,
        seed=seed,
        sampler=sampler,
        eta=eta,
        variance=variance,
        clip=clip,
        kernel=kernel,
        device=device,
        compile=compile,
        cuda_graph=cuda_graph,
        threads=threads,
    ).samples


def _open(engine: Any, **options: Any) -> contextlib.AbstractContextManager:
    """A path opens (and later closes) a backend; a backend the caller opened stays open."""
    if isinstance(engine, (str, os.PathLike)):
        return open_backend(engine, **options)
    if not callable(engine) or not hasattr(engine, "meta") or not hasattr(engine, "device"):
        raise InvalidArgumentError(f"engine must be a path or an open backend, got {type(engine).__name__}")
    return contextlib.nullcontext(engine)
