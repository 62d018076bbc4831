"""Parity checks: an exported artifact against the PyTorch model it came from, on fresh random inputs.

The check runs both sides on the same inputs (x ~ N(0, I) [N, *sample_shape] float32, t uniform over the
model's timesteps 0..T-1 int64, N = 1 and 7 by default; for a class-conditional model also y, uniform over its
classes and the null class when it has one, the null class always among the rows of a batch over 1) and reports

    max_abs = max |out - ref|                 max_rel = max |out - ref| / max |ref|

The relative error is normwise (divided by the largest reference magnitude, not element by element): an eps
prediction has elements near zero whose elementwise ratio says nothing about the export. Tolerances on max_rel:

    fp32  1e-4   both sides compute in fp32 and differ only in summation order / kernel choice: float32's
                 unit roundoff is 6e-8 and the worst case we measured over the presets (tiny .. the 35.7M
                 cifar10 UNet, perturbed weights) is ~5e-6, so 1e-4 has a 20x margin, while a wrong operator,
                 a lost normalisation or a mis-fed timestep shows up at 1e-2..1.
    tf32  1e-2   TF32 rounds conv/matmul inputs to 10 mantissa bits (unit roundoff 4.9e-4), like fp16.
    fp16  1e-2   weights and activations rounded to fp16 (4.9e-4 per op) through ~30 conv layers; measured
                 1e-3..3e-3 on the presets (cifar10 the worst), a 3x margin.
    bf16  5e-2   bf16 has 8 mantissa bits (unit roundoff 3.9e-3), 8x coarser than fp16.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ddpm.devices import resolve_device
from ddpm.errors import ArtifactError, MissingDependencyError
from ddpm.metadata import class_info, schedule_from_meta
from ddpm.runtime.backends import Backend, OnnxRuntimeBackend
from ddpm.runtime.backends.onnx_backend import import_onnxruntime

__all__ = [
    "Runner",
    "TOLERANCES",
    "DEFAULT_BATCHES",
    "ParityError",
    "ParityResult",
    "compare",
    "random_inputs",
    "random_classes",
    "torch_reference",
    "check_parity",
    "backend_runner",
    "onnxruntime_backends",
]

# A runner (and the reference): x [N, *sample_shape] float32, t [N] int64 (and y [N] int64, the classes, for a
# class-conditional model: called with a third argument only then) -> the model output.
Runner = Callable[..., np.ndarray]

TOLERANCES = {"fp32": 1e-4, "tf32": 1e-2, "fp16": 1e-2, "bf16": 5e-2}
# Batch 1 and a batch that is neither 1 nor the batch the graph was traced with (2), nor a power of two.
DEFAULT_BATCHES = (1, 7)


class ParityError(ArtifactError):
    """The exported artifact does not reproduce the PyTorch model within the stated tolerance."""


@dataclass(frozen=True)
class ParityResult:
    """One comparison: ``backend`` at batch ``batch`` against the reference."""

    backend: str
    batch: int
    max_abs: float
    max_rel: float
    tol: float

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_rel) and self.max_rel <= self.tol)

    def line(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return (
            f"parity {self.backend} batch {self.batch}: max abs err {self.max_abs:.3e}, "
            f"max rel err {self.max_rel:.3e} (tolerance {self.tol:.0e}) {verdict}"
        )


def compare(ref: np.ndarray, out: np.ndarray) -> tuple[float, float]:
    """(max_abs, max_rel) of ``out`` against ``ref``; inf when shapes differ or out is not finite."""
    ref = np.asarray(ref, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    if ref.shape != out.shape or not np.all(np.isfinite(out)):
        return float("inf"), float("inf")
    max_abs = float(np.max(np.abs(out - ref))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return max_abs, (max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf")))


def random_inputs(
    sample_shape: Sequence[int], batch: int, num_timesteps: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """x ~ N(0, I) as [batch, *sample_shape] float32 and t uniform in 0..num_timesteps-1 as [batch] int64."""
    x = rng.standard_normal((batch, *sample_shape), dtype=np.float32)
    t = rng.integers(0, num_timesteps, size=batch, dtype=np.int64)
    return x, t


def random_classes(meta: dict[str, Any], batch: int, rng: np.random.Generator) -> np.ndarray | None:
    """y [batch] int64 for a class-conditional artifact (None otherwise): uniform over its classes and its null
    class, the null class in the last row (and a real class in the first) whenever the batch has two rows."""
    info = class_info(meta)
    if info is None:
        return None
    top = info.count if info.null == info.count else info.count - 1
    y = rng.integers(0, top + 1, size=batch, dtype=np.int64)
    if batch > 1:
        y[0] = rng.integers(0, info.count)
        if info.null is not None:
            y[-1] = info.null
    return y


def torch_reference(model: Any, x: np.ndarray, t: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """The PyTorch model's output in float32 on the CPU (exact fp32, no TF32): the parity reference."""
    import torch

    args = [torch.from_numpy(x), torch.from_numpy(t)] + ([] if y is None else [torch.from_numpy(y)])
    with torch.inference_mode():
        out = model.to("cpu").float()(*args)
    return out.float().numpy()


def check_parity(
    runners: Sequence[tuple[str, Runner]],
    reference: Runner,
    meta: dict[str, Any],
    *,
    precision: str = "fp32",
    batches: Sequence[int] = DEFAULT_BATCHES,
    log: Callable[[str], None] | None = None,
    what: str = "the export",
) -> list[ParityResult]:
    """Run every ``(label, runner)`` and ``reference`` on the same fresh random inputs at each batch size.

    Inputs follow the artifact metadata ``meta``: its sample shape, and timesteps over its training schedule.

    Each runner and the reference map (x [N, *sample_shape] float32, t [N] int64[, y [N] int64]) to a float
    array shaped like x (y, :func:`random_classes`, only for a class-conditional artifact). Prints one line per
    comparison through ``log``; raises ParityError naming the worst comparison when any is over
    ``TOLERANCES[precision]`` (after all have run, so every figure is printed).
    """
    tol = TOLERANCES[precision]
    sample_shape, num_timesteps = meta["sample_shape"], schedule_from_meta(meta).num_timesteps
    rng = np.random.default_rng()  # fresh, unseeded: the check must hold for any input
    results: list[ParityResult] = []
    for batch in batches:
        x, t = random_inputs(sample_shape, batch, num_timesteps, rng)
        y = random_classes(meta, batch, rng)
        args = (x, t) if y is None else (x, t, y)
        ref = reference(*args)
        if log is not None and not np.any(ref):
            # A freshly initialised UNet outputs exactly 0 (zero-initialised output conv): nothing to compare.
            log(
                f"note: the reference output is all zeros at batch {batch} (an untrained network?); parity is vacuous"
            )
        for label, run in runners:
            max_abs, max_rel = compare(ref, run(*args))
            res = ParityResult(label, batch, max_abs, max_rel, tol)
            results.append(res)
            if log is not None:
                log(res.line())
    bad = [r for r in results if not r.ok]
    if bad:
        worst = max(bad, key=lambda r: r.max_rel)
        raise ParityError(
            f"parity check failed for {what}: {worst.backend} at batch {worst.batch} has max rel error "
            f"{worst.max_rel:.3e} > tolerance {worst.tol:.0e} ({precision})"
        )
    return results


def backend_runner(backend: Backend) -> Runner:
    """A runner over a runtime backend, called exactly as ``ddpm run`` calls it: inputs moved to its device and
    run on its stream; the output copied out (a backend may reuse its output buffer)."""
    import torch

    def run(x: np.ndarray, t: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        on_stream = (
            torch.cuda.stream(backend.stream) if backend.stream is not None else contextlib.nullcontext()
        )
        args = [torch.from_numpy(a).to(backend.device) for a in ((x, t) if y is None else (x, t, y))]
        with on_stream:
            return backend(*args).to("cpu", torch.float32, copy=True).numpy()

    return run


@contextlib.contextmanager
def onnxruntime_backends(model: str | bytes, meta: dict[str, Any]) -> Iterator[list[tuple[str, Backend]]]:
    """``[(label, backend)]`` over one ONNX file or graph: always the runtime's onnxruntime backend on the CPU,
    plus one on CUDA (TF32 off: the check compares fp32 arithmetic) when torch sees a GPU and onnxruntime really
    starts its CUDA execution provider. Closed on exit."""
    with contextlib.ExitStack() as stack:
        cpu = resolve_device("cpu")
        found: list[tuple[str, Backend]] = [
            ("onnxruntime[cpu]", stack.enter_context(OnnxRuntimeBackend(model, cpu, meta=meta)))
        ]
        gpu = resolve_device("auto")
        if gpu.type == "cuda" and "CUDAExecutionProvider" in import_onnxruntime().get_available_providers():
            try:
                cuda = OnnxRuntimeBackend(model, gpu, meta=meta, tf32=False)
            except MissingDependencyError:  # CUDA libraries missing: the CPU comparison stands alone
                pass
            else:
                found.append(("onnxruntime[cuda]", stack.enter_context(cuda)))
        yield found
