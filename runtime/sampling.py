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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ddpm.errors import InvalidArgumentError
from ddpm.loop import CHECK_EVERY, KERNELS, FiniteWatch, ReversePlan, StepExecutor, run_reverse
from ddpm.metadata import schedule_from_meta
from ddpm.noise import initial_noise
from ddpm.options import SamplingOptions, check_num_samples
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
    "sample_run",
    "sample",
    "open_engine",
    "image_shape",
    "plan_run",
]

StepCallback = Callable[[int], None]  # progress: called with the number of steps just done
BatchCallback = Callable[[int, torch.Tensor], None]  # (sample offset, finished batch on the CPU)
# on_start(backend, plan, taken): taken = the options filled from the model's recommendation
StartCallback = Callable[[Any, "SamplingPlan", dict[str, Any]], None]


@dataclass(frozen=True)
class SamplingPlan(ReversePlan):
    """A :class:`ddpm.loop.ReversePlan` for an artifact, plus what its batches need.

    Attributes:
        sample_shape: one sample's shape, e.g. (C, H, W) or (2,).
        kernel: "fused" (the C++/CUDA kernel) or "reference" (ddpm.step + noise.normal).
        classes: a class-conditional model's classes, cycled over the global sample index (sample k gets
            classes[k % len]), so sample k is the same image in any batch, shard or runtime; None otherwise.
    """

    sample_shape: tuple[int, ...] = ()
    kernel: str = "fused"
    classes: tuple[int, ...] | None = None

    def class_rows(self, first: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """int64 [n]: the classes of global samples first .. first + n - 1 (None when unconditional)."""
        if self.classes is None:
            return None
        table = torch.tensor(self.classes, dtype=torch.int64)
        return table[torch.arange(first, first + n, dtype=torch.int64) % len(self.classes)].to(device)

    @classmethod
    def for_artifact(cls, meta: dict[str, Any], options: SamplingOptions | None = None) -> SamplingPlan:
        """The plan of ``options`` (resolved against the artifact: ``SamplingOptions.resolve``) for an artifact's
        validated metadata: the training schedule respaced to ``options.steps`` with ``options.spacing`` (None:
        the sampler's default, ``Sampler.default_spacing``)."""
        opts, _ = (options or SamplingOptions()).resolve(meta)
        base = schedule_from_meta(meta)
        schedule = base
        if opts.steps is not None:
            if opts.steps > len(base):
                raise InvalidArgumentError(f"steps must be an integer in 1..{len(base)}, got {opts.steps}")
            schedule = base.respace(opts.steps, spacing=opts.spacing or opts.sampler.default_spacing)
        info = meta.get("classes")
        return cls.create(
            schedule,
            opts,
            prediction=meta["prediction"],
            null=info.get("null") if isinstance(info, dict) else None,
            sample_shape=tuple(int(s) for s in meta["sample_shape"]),
            kernel=opts.kernel,
            classes=None if opts.classes is None else tuple(int(c) for c in opts.classes),
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
    y = plan.class_rows(sample_offset, n, dev)
    return run_reverse(backend, x, plan, sample_offset=sample_offset, kernel=kernel, on_step=observers, y=y)


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
    options: SamplingOptions | None = None,
    *,
    on_start: StartCallback | None = None,
    on_step: StepCallback | None = None,
    model_hook: Callable[[Any, SamplingPlan], Any] | None = None,
    on_batch: BatchCallback | None = None,
    first: int = 0,
) -> SampleRun:
    """:func:`sample` with the run's facts: what ``ddpm run`` calls. The artifact is opened (and its metadata
    read) once, the plan built once; ``on_start(backend, plan, taken)`` runs before the first batch (the CLI
    prints its header and starts the progress bar there; ``taken``: the options the model's recommendation
    filled in), ``on_step(k)`` after every k steps. ``model_hook(backend, plan)`` returns what the loop calls
    instead of the backend (``--trajectory`` records x and m through it). ``on_batch(offset, x)`` receives each
    finished batch (CPU float32) instead of the result keeping it, so memory is bounded by the batch, not by
    ``num_samples``. ``first`` is the global index of the first sample (a shard's start, runtime/shard.py):
    the run draws samples ``first .. first + num_samples - 1``."""
    options = options or SamplingOptions()
    num_samples = check_num_samples(num_samples)
    if (
        isinstance(first, bool)
        or not isinstance(first, int)
        or not 0 <= first <= MAX_NUM_SAMPLES - num_samples
    ):
        raise InvalidArgumentError(
            f"first must be an integer in 0..{MAX_NUM_SAMPLES - num_samples}, got {first!r}"
        )
    with open_engine(engine, options) as backend:
        resolved, taken, plan = plan_run(backend.meta, options, [min(options.batch, num_samples)])
        batch = resolved.batch
        if on_start is not None:
            on_start(backend, plan, taken)
        model = backend if model_hook is None else model_hook(backend, plan)
        return _run_batches(model, plan, num_samples, batch, resolved.cuda_graph, on_step, on_batch, first)


def plan_run(
    meta: dict[str, Any], options: SamplingOptions, batches: Sequence[int]
) -> tuple[SamplingOptions, dict[str, Any], SamplingPlan]:
    """What every command that samples an artifact checks before it computes anything (``ddpm run``, ``ddpm
    bench``, the server): the options resolved against the artifact (and what its recommendation filled in), the
    plan (steps within its T), and each batch size's tensor within MAX_BATCH_ELEMENTS values."""
    resolved, taken = options.resolve(meta)
    plan = SamplingPlan.for_artifact(meta, resolved)
    values = math.prod(plan.sample_shape)
    for batch in batches:
        if batch * values > MAX_BATCH_ELEMENTS:
            raise InvalidArgumentError(
                f"batch {batch} x {values} values per sample exceeds {MAX_BATCH_ELEMENTS} values per batch tensor; "
                f"use a batch <= {max(1, MAX_BATCH_ELEMENTS // values)}"
            )
    return resolved, taken, plan


def sample(
    engine: str | os.PathLike | Any,
    num_samples: int,
    options: SamplingOptions | None = None,
    *,
    shard: tuple[int, int] | None = None,
    **fields: Any,
) -> torch.Tensor:
    """Draw ``num_samples`` samples from an artifact (checkpoint, ONNX file, TensorRT engine or diffusers folder),
    like ``ddpm run``.

    Args:
        engine: a path, or an already opened backend (runtime/backends).
        options: a :class:`ddpm.SamplingOptions`, or its fields as keywords (keywords override ``options``):
            steps (N <= T, respaced, improved-diffusion semantics; None = T), spacing (uniform | trailing |
            logsnr; None = the sampler's default), batch (samples per batch; sample k is the same for any batch
            size: Philox noise keyed by sample index), seed, sampler (ddpm | ddim | dpm++2m | dpm++2m-sde;
            default ddpm), eta, variance, clip (None: no clipping), kernel (see :func:`ddpm.reverse`), device
            (auto | cpu | cuda | cuda:N), compile / threads / cuda_graph (backend options), runtime (None: the
            artifact's default | onnxruntime | openvino), precision (fp32 | bf16 | fp16, None: the artifact's
            own; the update runs in float32 whatever it is). Unsupported combinations raise InvalidArgumentError.
        shard: (k, n) returns only shard k of n: the contiguous global samples k M // n .. (k + 1) M // n - 1,
            exactly those rows of the full run (runtime/shard.py).
    Returns:
        [num_samples, *sample_shape] float32 on the CPU (images in [-1, 1] scale, as trained); with ``shard``,
        [shard size, *sample_shape].
    """
    options = options or SamplingOptions()
    options = options.replace(**fields) if fields else options
    num_samples = check_num_samples(num_samples)
    first, stop = Shard.parse(shard).range(num_samples) if shard is not None else (0, num_samples)
    return sample_run(engine, stop - first, options, first=first).samples


def open_engine(engine: Any, options: SamplingOptions) -> contextlib.AbstractContextManager:
    """The backend ``options`` ask for: a path opens (and later closes) one; a backend the caller opened stays
    open (its precision was fixed when it opened: asking for another is refused)."""
    if isinstance(engine, (str, os.PathLike)):
        return open_backend(
            engine,
            device=options.device,
            compile=options.compile,
            threads=options.threads,
            cuda_graph=options.cuda_graph,
            runtime=options.runtime,
            precision=options.precision,
        )
    if not callable(engine) or not hasattr(engine, "meta") or not hasattr(engine, "device"):
        raise InvalidArgumentError(f"engine must be a path or an open backend, got {type(engine).__name__}")
    want, have = options.precision, str(getattr(engine, "precision", "fp32"))
    if want is not None and str(want) != have:
        raise InvalidArgumentError(
            f"precision {str(want)!r} asked of an open {have} backend; open it with that precision"
        )
    return contextlib.nullcontext(engine)


def image_shape(meta: dict[str, Any], *, source: str = "the engine") -> tuple[int, int, int]:
    """The model's sample shape (C, H, W); InvalidArgumentError for a model of vectors (the 2-D MLP)."""
    shape = tuple(int(s) for s in meta["sample_shape"])
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise InvalidArgumentError(
            f"{source} models samples of shape {list(shape)}, not images [C, H, W] with C = 1 or 3; "
            "image-in commands need an image model"
        )
    return shape  # type: ignore[return-value]
