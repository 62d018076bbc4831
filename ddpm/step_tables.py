"""The launcher the fused-step front shares, and the coefficient tables with a step counter.

One binding per device: ``ddpm._C.fused_step`` (CPU) and ``ddpm._C_cuda.fused_step`` (CUDA). :func:`launch` is the
one Python layer in front of them and checks tensors only (dtype, shape, device, contiguity); the bindings check
every number they are handed (pointers, overlap, sizes, coefficients, clip, seed, Philox words) and name it, and
their ValueError becomes :class:`InvalidArgumentError` here. Without a compiled module a pure torch path (NumPy
reference noise) runs instead, with a one-time warning.

* :class:`HostStepTable` - the [steps, 6] table and a step counter held by ddpm._C; ``bind(x, m, out)`` checks
  the buffers once and returns a callable that runs one step per call (the fastest CPU loop).
* :class:`DeviceStepTable` - CUDA: the table and an int32 counter in device memory; the kernel reads row
  [counter] and decrements it, so one captured CUDA graph replays every step.
Public names are re-exported by :mod:`ddpm.kernels`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from . import extension
from .diffusion import check_clip
from .errors import InvalidArgumentError, MissingDependencyError
from .noise import normal_reference
from .schedule import NUM_COEFS, Prediction, Sampler, Schedule, Variance

__all__ = ["DeviceStepTable", "HostStepTable", "check_step_tensors", "launch", "host_table", "table32"]

_F32 = torch.float32


def check_step_tensors(**tensors: torch.Tensor | None) -> None:
    """Every tensor float32, contiguous, [N, ...], same shape and device as the first; None entries are skipped.
    The message names the culprit."""
    named = [(k, t) for k, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise InvalidArgumentError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != _F32:
            raise InvalidArgumentError(f"{name} must be float32, got {t.dtype}")
        if not t.is_contiguous():
            raise InvalidArgumentError(
                f"{name} must be contiguous (call .contiguous()), got strides {t.stride()}"
            )
        if t.dim() < 1:
            raise InvalidArgumentError(f"{name} must be [N, ...] with a batch dimension, got a 0-d tensor")
        if t.device != first.device:
            raise InvalidArgumentError(f"{name} is on {t.device} but {first_name} is on {first.device}")
        if t.shape != first.shape:
            raise InvalidArgumentError(
                f"{name} has shape {tuple(t.shape)} but {first_name} has shape {tuple(first.shape)}"
            )


def table32(table: np.ndarray) -> np.ndarray:
    """A [steps, 6] coefficient table as C-contiguous float32 (its values are the binding's to check)."""
    t = np.ascontiguousarray(np.asarray(table, dtype=np.float64).astype(np.float32))
    if t.ndim != 2 or t.shape[1] != NUM_COEFS or t.shape[0] < 1:
        raise InvalidArgumentError(f"table must be [steps, 6] (a, b, c, p, q, sigma), got shape {t.shape}")
    t.setflags(write=False)
    return t


def host_table(ext: Any, t32: np.ndarray) -> Any:
    try:
        return ext.StepTable(t32.ctypes.data, t32.shape[0])
    except ValueError as e:
        raise InvalidArgumentError(f"coefficient table: {e}") from None


def launch(
    x: torch.Tensor,
    m: torch.Tensor,
    coeffs: Any,
    rows: Sequence[tuple[float, ...]] | None,
    clip: float,
    seed: int,
    step: int | None,
    sample_offset: int,
    out: torch.Tensor,
    history: torch.Tensor | None,
) -> torch.Tensor:
    """Check the tensors, then call the device's binding. ``coeffs``: a float32 row, a ``_C.StepTable`` (row
    ``step``, or with step=None its counter's) or a ``_C_cuda.DeviceTable``; ``rows``: the table's rows by value,
    for the devices and paths that cannot read a ``_C.StepTable``."""
    # Fast path: the checks a CPU sampling loop passes every step, cheapest first (~0.5 us; a torch attribute
    # costs 40-80 ns, so each one counts at 1x1x28x28, where the kernel itself takes ~1 us). Anything unusual
    # falls through to the full checks, which name the offending tensor.
    try:
        shape = x.shape
        ok = (
            shape
            and x.dtype is _F32
            and m.dtype is _F32
            and x.is_cpu
            and m.is_cpu
            and x.is_contiguous()
            and m.is_contiguous()
            and m.shape == shape
            and (out is x or out is m or same_cpu_layout(out, shape))
            and (history is None or same_cpu_layout(history, shape))
        )
    except AttributeError:
        ok = False
    if not ok or (ext := extension.cpu_extension()) is None:
        return launch_checked(x, m, coeffs, rows, clip, seed, step, sample_offset, out, history)
    n, numel = shape[0], x.numel()
    if numel:
        xp, mp = x.data_ptr(), m.data_ptr()
        op = xp if out is x else mp if out is m else out.data_ptr()
        h = 0 if history is None else history.data_ptr()
        try:
            ext.fused_step(xp, mp, op, n, numel // n, coeffs, clip, seed, step, sample_offset, h)
        except ValueError as e:  # the binding's own checks, by name
            raise InvalidArgumentError(f"fused_step: {e}") from None
    return out


def same_cpu_layout(t: torch.Tensor, shape: torch.Size) -> bool:
    return t.dtype is _F32 and t.is_cpu and t.is_contiguous() and t.shape == shape


def launch_checked(x, m, coeffs, rows, clip, seed, step, sample_offset, out, history) -> torch.Tensor:
    """launch with the full tensor checks, for CUDA tensors, the pure torch path and error messages."""
    check_step_tensors(x=x, m=m, out=out, history=history)
    if x.numel() == 0:
        return out
    n = x.shape[0]
    ptrs = (x.data_ptr(), m.data_ptr(), out.data_ptr(), n, x.numel() // n)
    h = 0 if history is None else history.data_ptr()
    row = coeffs if rows is None else _row(rows, step)
    try:
        if x.is_cpu and (ext := extension.cpu_extension()) is not None:
            ext.fused_step(*ptrs, row if coeffs is None else coeffs, clip, seed, step, sample_offset, h)
            return out
        if x.is_cuda and (ext := extension.cuda_extension()) is not None:
            dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
            stream = torch.cuda.current_stream(x.device).cuda_stream
            ext.fused_step(*ptrs, row, clip, seed, step, sample_offset, h, dev, stream)
            return out
    except (ValueError, TypeError) as e:
        raise InvalidArgumentError(f"fused_step: {e}") from None
    extension.warn_once(
        f"fused_step:{x.device.type}",
        f"ddpm.fused_step: no compiled kernel for {x.device.type} tensors (ddpm._C / ddpm._C_cuda not built or no "
        "GPU visible); using the (slow) pure torch path. Reinstall with `pip install -e .` to build the kernels.",
    )
    if step is None:
        raise MissingDependencyError("a step table's counter needs the compiled module (pip install -e .)")
    return _fused_step_torch(x, m, row, clip, seed, step, sample_offset, out, history)


def _row(rows: Sequence[tuple[float, ...]], i: Any) -> tuple[float, ...]:
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < len(rows):
        raise InvalidArgumentError(f"step index i must be an integer in 0..{len(rows) - 1}, got {i!r}")
    return rows[int(i)]


def _fused_step_torch(x, m, coeffs, clip, seed, step, sample_offset, out, history) -> torch.Tensor:
    """The pure torch path: ddpm.step's arithmetic (plus c h) with the NumPy reference noise; it checks what the
    binding would have checked."""
    try:
        a, b, c, p, q, sigma = (float(v) for v in coeffs)
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"coeffs must be 6 floats (a, b, c, p, q, sigma), got {coeffs!r}"
        ) from None
    for name, v in zip("a b c p q sigma".split(), (a, b, c, p, q, sigma), strict=True):
        if not math.isfinite(v):
            raise InvalidArgumentError(f"coefficient {name} is not finite: {v}")
    if not float(clip) > 0:
        raise InvalidArgumentError(f"clip must be > 0 (math.inf for no clipping), got {clip}")
    if history is not None and any(_overlap(history, t) for t in (x, m, out)):
        raise InvalidArgumentError("history must not overlap x, m or out (history needs its own buffer)")
    if c != 0.0 and history is None:
        raise InvalidArgumentError(f"coefficient c = {c} != 0 needs a history buffer (the previous x0_hat)")
    x0_hat = p * x + q * m
    if math.isfinite(clip):
        x0_hat = x0_hat.clamp(-clip, clip)
    res = a * x + b * x0_hat
    if c != 0.0:
        res = res + c * history
    if sigma != 0.0:
        z = normal_reference(seed, tuple(x.shape), step=step, sample_offset=sample_offset)
        res = res + sigma * torch.from_numpy(z).to(x.device)
    if history is not None:
        history.copy_(x0_hat)
    return out.copy_(res)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    nbytes = a.numel() * a.element_size()
    return a.data_ptr() < b.data_ptr() + nbytes and b.data_ptr() < a.data_ptr() + nbytes


class HostStepTable:
    """A coefficient table and a step counter held by ddpm._C: the CPU twin of :class:`DeviceStepTable`.

    ``step(x, m, out)`` runs row [counter] (step index = counter) and decrements the counter. ``bind(x, m, out)``
    checks the tensors once and returns a callable that does the same with nothing left to check or convert
    (the sampling loop's fast path when the model writes into a fixed ``m`` buffer). The bound tensors are kept
    alive by the callable; do not resize them while it is in use.
    """

    def __init__(self, table: np.ndarray, clip: float, seed: int, sample_offset: int = 0) -> None:
        ext = extension.cpu_extension()
        if ext is None:
            raise MissingDependencyError(
                "HostStepTable needs the compiled CPU extension ddpm._C (pip install -e .)"
            )
        self._table = host_table(ext, table32(table))
        self._ext, self.clip, self.seed, self.sample_offset = ext, clip, seed, sample_offset

    @classmethod
    def from_schedule(
        cls,
        schedule: Schedule,
        *,
        seed: int,
        sample_offset: int = 0,
        prediction: Prediction | str = "eps",
        sampler: Sampler | str = "ddpm",
        variance: Variance | str = "fixed_small",
        eta: float = 0.0,
        clip: float | None = None,
    ) -> HostStepTable:
        """The table of ``schedule.coefficients(prediction, sampler, variance, eta)``."""
        table = schedule.coefficients(prediction, sampler, variance, eta)
        return cls(table, check_clip(clip), seed, sample_offset)

    @property
    def steps(self) -> int:
        return int(self._table.rows)

    @property
    def counter(self) -> int:
        """The step index the next call will run."""
        return int(self._table.counter)

    def set_counter(self, i: int) -> None:
        try:
            self._table.set_counter(operator.index(i))
        except (TypeError, ValueError):
            raise InvalidArgumentError(
                f"step counter must be an integer in 0..{self.steps - 1}, got {i!r}"
            ) from None

    def step(
        self, x: torch.Tensor, m: torch.Tensor, out: torch.Tensor, history: torch.Tensor | None = None
    ) -> torch.Tensor:
        """out = the fused step of row [counter] on (x, m); then counter -= 1. Returns out (may be x)."""
        if isinstance(x, torch.Tensor) and not x.is_cpu:
            raise InvalidArgumentError(f"HostStepTable works on CPU tensors, got x on {x.device}")
        return launch(x, m, self._table, None, self.clip, self.seed, None, self.sample_offset, out, history)

    def bind(
        self, x: torch.Tensor, m: torch.Tensor, out: torch.Tensor, history: torch.Tensor | None = None
    ) -> Callable[[], torch.Tensor]:
        """A callable ``run() -> out`` doing :meth:`step` on these tensors, checked once, here."""
        check_step_tensors(x=x, m=m, out=out, history=history)
        if not x.is_cpu:
            raise InvalidArgumentError(f"HostStepTable works on CPU tensors, got x on {x.device}")
        n = x.shape[0]
        d = x.numel() // n if n else 1
        h = 0 if history is None else history.data_ptr()
        try:
            return self._ext.BoundStep(
                x.data_ptr(), m.data_ptr(), out.data_ptr(), n, d, self._table, self.clip, self.seed, None,
                self.sample_offset, h, returns=out, keep_alive=(x, m, out, history),
            )  # fmt: skip
        except (ValueError, TypeError) as e:
            raise InvalidArgumentError(f"HostStepTable.bind: {e}") from None


class DeviceStepTable:
    """The coefficient table and an int32 step counter in CUDA device memory, for CUDA-graph sampling.

    ``step(x, m, out)`` launches the kernel on torch's current stream: it reads row ``counter`` of the table, uses
    ``counter`` as the step index of the noise, then decrements the counter on the device. Capture one ``step``
    (with the model call) in a ``torch.cuda.CUDAGraph``, ``set_counter(steps - 1)``, and replay the graph ``steps``
    times: the loop runs i = steps-1 .. 0 without re-capturing, and without the stale by-value coefficients a
    captured kernel argument would have. A counter outside the table makes the kernel write NaN (caught by the
    loop's finiteness check), never an out-of-bounds read.
    """

    def __init__(
        self, table: np.ndarray, clip: float, seed: int, sample_offset: int, device: torch.device | str
    ) -> None:
        dev = torch.device(device)
        if dev.type != "cuda":
            raise InvalidArgumentError(f"DeviceStepTable needs a CUDA device, got {dev}")
        ext = extension.cuda_extension()
        if ext is None:
            raise MissingDependencyError(
                "DeviceStepTable needs the CUDA extension ddpm._C_cuda and a visible GPU "
                "(build with nvcc installed: pip install -e .)"
            )
        t32 = table32(table)
        self.device = dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
        self.table = torch.empty(t32.shape, dtype=_F32, device=self.device)
        self.counter = torch.empty(1, dtype=torch.int32, device=self.device)
        try:  # checks the rows, uploads them, sets the counter to steps - 1
            self._table = ext.DeviceTable(
                t32.ctypes.data,
                t32.shape[0],
                self.table.data_ptr(),
                self.counter.data_ptr(),
                self.device.index,
            )
        except ValueError as e:
            raise InvalidArgumentError(f"DeviceStepTable: {e}") from None
        self.clip, self.seed, self.sample_offset = clip, seed, sample_offset

    @classmethod
    def from_schedule(
        cls,
        schedule: Schedule,
        *,
        seed: int,
        sample_offset: int = 0,
        prediction: Prediction | str = "eps",
        sampler: Sampler | str = "ddpm",
        variance: Variance | str = "fixed_small",
        eta: float = 0.0,
        clip: float | None = None,
        device: torch.device | str = "cuda",
    ) -> DeviceStepTable:
        """The table of ``schedule.coefficients(prediction, sampler, variance, eta)``."""
        table = schedule.coefficients(prediction, sampler, variance, eta)
        return cls(table, check_clip(clip), seed, sample_offset, device)

    @property
    def steps(self) -> int:
        return int(self.table.shape[0])

    def set_counter(self, i: int) -> None:
        """Set the device step counter to i (an async write on the current stream; do it outside capture)."""
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self.steps:
            raise InvalidArgumentError(f"step counter must be an integer in 0..{self.steps - 1}, got {i!r}")
        self.counter.fill_(int(i))

    def step(
        self, x: torch.Tensor, m: torch.Tensor, out: torch.Tensor, history: torch.Tensor | None = None
    ) -> torch.Tensor:
        """out = the fused step of row [counter] on (x, m); then counter -= 1. Returns out (may be x)."""
        if isinstance(x, torch.Tensor) and x.device != self.device:
            raise InvalidArgumentError(f"x is on {x.device} but the table is on {self.device}")
        return launch(x, m, self._table, None, self.clip, self.seed, None, self.sample_offset, out, history)
