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
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ddpm.errors import InvalidArgumentError
from ddpm.loop import CHECK_EVERY, KERNELS, FiniteWatch, ReversePlan, StepExecutor, run_reverse
from ddpm.metadata import recommended_sampling, schedule_from_meta
from ddpm.noise import initial_noise
from ddpm.schedule import Sampler, Spacing, Variance
from ddpm.validate import MAX_BATCH_ELEMENTS, MAX_NUM_SAMPLES

from .backends import open_backend
from .sampling_graph import CudaGraphExecutor
from .shard import Shard

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
BatchCallback = Callable[[int, torch.Tensor], None]  # (sample offset, finished batch on the CPU)


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
        spacing: Spacing | str | None = None,
    ) -> SamplingPlan:
        """A plan for an artifact's (already validated) metadata; every argument is checked here, once.
        ``spacing`` (uniform | trailing | logsnr, ddpm/spacing.py) picks the kept timesteps when ``steps`` < T;
        None takes the sampler's default (``Sampler.default_spacing``)."""
        base = schedule_from_meta(meta)
        spacing = Sampler.parse(sampler).default_spacing if spacing is None else Spacing.parse(spacing)
        schedule = (
            base if steps is None else base.respace(_check_int("steps", steps, 1, len(base)), spacing=spacing)
        )
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
    precision: str = "fp32"  # the network's arithmetic; the update always runs in float32
    # samples produced; when batches were streamed to ``on_batch``, ``samples`` holds none of them
    count: int | None = None

    @property
    def produced(self) -> int:
        return self.samples.shape[0] if self.count is None else self.count

    @property
    def samples_per_second(self) -> float:
        return self.produced / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        graph = " cuda_graph=on" if self.cuda_graph else ""
        graph += f" precision={self.precision}" if self.precision != "fp32" else ""
        return (
            f"backend={self.backend} device={self.device} steps={self.steps} batch={self.batch} "
            f"samples={self.produced} kernel={self.kernel}{graph} seconds={self.seconds:.2f} "
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
    on_batch: BatchCallback | None = None,
    first: int = 0,
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
            x = sample_batch(
                backend, plan, n, sample_offset=first + offset, on_step=on_step, executor=executor
            )
            x = x.to("cpu")  # on CUDA: the sync that ends the batch
            if on_batch is None:
                outs.append(x)
            else:  # streamed: memory stays one batch, whatever num_samples is
                on_batch(offset, x)
    seconds = time.perf_counter() - start
    return SampleRun(
        samples=torch.cat(outs) if outs else torch.empty((0, *plan.sample_shape)),
        backend=backend.name,
        description=backend.description,
        device=str(dev),
        steps=plan.steps,
        batch=batch,
        kernel=plan.kernel,
        cuda_graph=cuda_graph,
        seconds=seconds,
        precision=str(getattr(backend, "precision", "fp32")),
        count=None if on_batch is None else num_samples,
    )


def sample_run(
    engine: str | os.PathLike | Any,
    num_samples: int,
    *,
    steps: int | None = None,
    batch: int = 64,
    seed: int = 0,
    sampler: Sampler | str | None = "ddpm",
    eta: float = 0.0,
    variance: Variance | str = "fixed_small",
    clip: float | None = None,
    kernel: str = "fused",
    device: str | torch.device = "auto",
    compile: bool = False,
    cuda_graph: bool = False,
    threads: int | None = None,
    runtime: str | None = None,
    precision: str | None = None,
    spacing: Spacing | str | None = None,
    on_start: Callable[[Any, SamplingPlan], None] | None = None,
    on_step: StepCallback | None = None,
    model_hook: Callable[[Any, SamplingPlan], Any] | None = None,
    on_batch: BatchCallback | None = None,
    first: int = 0,
    recommended: bool = False,
) -> SampleRun:
    """:func:`sample` with the run's facts: what ``ddpm run`` calls. The artifact is opened (and its metadata
    read) once, the plan built once; ``on_start(backend, plan)`` runs before the first batch (the CLI prints
    its header and starts the progress bar there), ``on_step(k)`` after every k steps. ``model_hook(backend,
    plan)`` returns what the loop calls instead of the backend (``--trajectory`` records x and m through it).
    ``on_batch(offset, x)`` receives each finished batch (CPU float32) instead of the result keeping it, so
    memory is bounded by the batch, not by ``num_samples``. ``first`` is the global index of the first sample
    (a shard's start, runtime/shard.py): the run draws samples ``first .. first + num_samples - 1``.
    ``recommended``: a ``sampler``/``steps``/``clip`` left at None takes the artifact's recommendation
    (``ddpm.metadata.recommended_sampling``: what its training previews used), as ``ddpm run`` does."""
    num_samples = _check_int("num_samples", num_samples, 1, MAX_NUM_SAMPLES)
    first = _check_int("first", first, 0, MAX_NUM_SAMPLES - num_samples)
    batch = _check_int("batch", batch, 1)
    options = {"compile": compile, "threads": threads, "cuda_graph": cuda_graph}
    with _open(engine, device=device, runtime=runtime, precision=precision, **options) as backend:
        if recommended:
            rec = recommended_sampling(backend.meta)
            sampler = rec.get("sampler", "ddpm") if sampler is None else sampler
            steps = rec.get("steps") if steps is None else steps
            clip = rec.get("clip") if clip is None else clip
        plan = SamplingPlan.create(
            backend.meta,
            steps=steps,
            sampler="ddpm" if sampler is None else sampler,
            eta=eta,
            variance=variance,
            clip=clip,
            seed=seed,
            kernel=kernel,
            spacing=spacing,
        )
        values = math.prod(plan.sample_shape)
        if min(batch, num_samples) * values > MAX_BATCH_ELEMENTS:
            raise InvalidArgumentError(
                f"batch {batch} x {values} values per sample exceeds {MAX_BATCH_ELEMENTS} values per batch tensor; "
                f"use a batch <= {max(1, MAX_BATCH_ELEMENTS // values)}"
            )
        if on_start is not None:
            on_start(backend, plan)
        model = backend if model_hook is None else model_hook(backend, plan)
        return _run_batches(model, plan, num_samples, batch, cuda_graph, on_step, on_batch, first)


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
    runtime: str | None = None,
    precision: str | None = None,
    spacing: Spacing | str | None = None,
    shard: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Draw ``num_samples`` samples from an artifact (checkpoint, ONNX file or TensorRT engine), like ``ddpm run``.

    Args:
        engine: a path, or an already opened backend (runtime/backends).
        steps: sampling steps N <= T (respaced, improved-diffusion semantics); None = T.
        spacing: which N timesteps (uniform | trailing | logsnr); None = the sampler's default (uniform for
            ddpm/ddim, trailing for dpm++2m/dpm++2m-sde).
        batch: samples per batch; sample k is the same for any batch size (Philox noise keyed by sample index).
        seed / sampler / eta / variance / clip / kernel: see :func:`ddpm.reverse`; sampler is any name
            ``ddpm.Sampler`` accepts (ddpm, ddim, dpm++2m, dpm++2m-sde).
        device: auto | cpu | cuda | cuda:N.  compile, threads, cuda_graph: backend options (runtime/backends).
        runtime: None (the artifact's default) | onnxruntime | openvino (ONNX on CPU).
        precision: the network's arithmetic, fp32 | bf16 | fp16, or None for the artifact's own; the update
            runs in float32 whatever it is. Unsupported combinations raise InvalidArgumentError.
        shard: (k, n) returns only shard k of n: the contiguous global samples k M // n .. (k + 1) M // n - 1,
            exactly those rows of the full run (runtime/shard.py).
    Returns:
        [num_samples, *sample_shape] float32 on the CPU (images in [-1, 1] scale, as trained); with ``shard``,
        [shard size, *sample_shape].
    """
    first, stop = Shard.parse(shard).range(num_samples) if shard is not None else (0, num_samples)
    return sample_run(
        engine,
        stop - first,
        first=first,
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
        runtime=runtime,
        precision=precision,
        spacing=spacing,
    ).samples


def _open(engine: Any, **options: Any) -> contextlib.AbstractContextManager:
    """A path opens (and later closes) a backend; a backend the caller opened stays open."""
    if isinstance(engine, (str, os.PathLike)):
        return open_backend(engine, **options)
    if not callable(engine) or not hasattr(engine, "meta") or not hasattr(engine, "device"):
        raise InvalidArgumentError(f"engine must be a path or an open backend, got {type(engine).__name__}")
    want, have = options.get("precision"), str(getattr(engine, "precision", "fp32"))
    if want is not None and str(want).lower() != have:  # an open backend's precision was fixed when it opened
        raise InvalidArgumentError(
            f"precision {want!r} asked of an open {have} backend; open it with that precision"
        )
    return contextlib.nullcontext(engine)
