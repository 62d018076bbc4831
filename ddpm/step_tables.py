"""Coefficient tables with a step counter, for sampling loops without per-step Python work.

* :class:`DeviceStepTable` - CUDA: the [steps, 5] table and an int32 counter on the GPU; one captured CUDA graph
  replays every step (the kernel reads row [counter] and decrements it).
* :class:`HostStepTable` - its CPU twin: ``bind(x, m, out)`` checks the buffers once and returns a callable that
  runs one step per call.
"""

from __future__ import annotations

import operator

import numpy as np
import torch

from . import extension
from .errors import InvalidArgumentError, MissingDependencyError
from .noise import check_counter_args, check_seed
from .schedule import Prediction, Sampler, Schedule, Variance
from .diffusion import check_clip

__all__ = ["DeviceStepTable", "HostStepTable", "check_step_tensors"]


def check_step_tensors(**tensors: torch.Tensor) -> None:
    """Every tensor float32, contiguous, same shape and device as the first; the message names the culprit."""
    (first_name, first), *rest = tensors.items()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise InvalidArgumentError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise InvalidArgumentError(f"{name} must be float32, got {t.dtype}")
        if not t.is_contiguous():
            raise InvalidArgumentError(
                f"{name} must be contiguous (call .contiguous()), got strides {t.stride()}"
            )
        if t.dim() < 1:
            raise InvalidArgumentError(f"{name} must be [N, ...] with a batch dimension, got a 0-d tensor")
    for name, t in rest:
        if t.device != first.device:
            raise InvalidArgumentError(f"{name} is on {t.device} but {first_name} is on {first.device}")
        if t.shape != first.shape:
            raise InvalidArgumentError(
                f"{name} has shape {tuple(t.shape)} but {first_name} has shape {tuple(first.shape)}"
            )


class DeviceStepTable:
    """The [steps, 5] coefficient table and an int32 step counter on a CUDA device, for CUDA-graph sampling.

    ``step(x, m, out)`` launches the device-counter kernel on torch's current stream: it reads row
    ``counter`` of the table, uses ``counter`` as the step index of the noise, then decrements the counter.
    Capture one ``step`` (with the model call) in a ``torch.cuda.CUDAGraph``, ``set_counter(steps - 1)``, and
    replay the graph ``steps`` times: the loop runs i = steps-1 .. 0 without re-capturing, and without the stale
    by-value coefficients a captured kernel argument would have. A counter outside the table makes the kernel
    write NaN (caught by the loop's finiteness check), never an out-of-bounds read.
    """

    def __init__(
        self,
        table: np.ndarray,
        clip: float,
        seed: int,
        sample_offset: int,
        device: torch.device | str,
    ) -> None:
        dev = torch.device(device)
        if dev.type != "cuda":
            raise InvalidArgumentError(f"DeviceStepTable needs a CUDA device, got {dev}")
        self._ext = extension.cuda_extension()
        if self._ext is None:
            raise MissingDependencyError(
                "DeviceStepTable needs the CUDA extension ddpm._C_cuda and a visible GPU "
                "(build with nvcc installed: pip install -e .)"
            )
        t = np.asarray(table, dtype=np.float64)[:, [0, 1, 3, 4, 5]]  # TEMPORARY: drop c until the kernel has it
        if t.ndim != 2 or t.shape[1] != 5 or t.shape[0] < 1:
            raise InvalidArgumentError(f"table must be [steps, 5] (a, b, p, q, sigma), got shape {t.shape}")
        if not np.all(np.isfinite(t)):
            raise InvalidArgumentError("table must be finite")
        self.clip = float(clip)
        if not self.clip > 0:
            raise InvalidArgumentError(f"clip must be > 0 (math.inf for no clipping), got {clip}")
        self.seed = check_seed(seed)
        self.sample_offset = check_counter_args(0, step=0, stream=0, sample_offset=sample_offset)[2]
        self.device = dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
        self.table = torch.as_tensor(t.astype(np.float32), device=self.device).contiguous()
        self.counter = torch.full((1,), t.shape[0] - 1, dtype=torch.int32, device=self.device)

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
        try:
            i = operator.index(i)
        except TypeError:
            raise InvalidArgumentError(f"step counter must be an integer, got {i!r}") from None
        if not 0 <= i < self.steps:
            raise InvalidArgumentError(f"step counter must be in 0..{self.steps - 1}, got {i}")
        self.counter.fill_(i)

    def step(self, x: torch.Tensor, m: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out = the fused step of row [counter] on (x, m); then counter -= 1. Returns out (may be x)."""
        check_step_tensors(x=x, m=m, out=out)
        if x.device != self.device:
            raise InvalidArgumentError(f"x is on {x.device} but the table is on {self.device}")
        n = x.shape[0]
        check_counter_args(n, step=0, stream=0, sample_offset=self.sample_offset)
        d = x.numel() // n if n else 1
        try:
            self._ext.fused_step_table(
                x.data_ptr(),
                m.data_ptr(),
                out.data_ptr(),
                n,
                d,
                self.table.data_ptr(),
                self.steps,
                self.counter.data_ptr(),
                self.clip,
                self.seed,
                self.sample_offset,
                self.device.index,
                torch.cuda.current_stream(self.device).cuda_stream,
            )
        except ValueError as e:
            raise InvalidArgumentError(f"DeviceStepTable.step: {e}") from None
        return out


class HostStepTable:
    """The CPU twin of :class:`DeviceStepTable`: table and step counter held by ddpm._C.

    ``step(x, m, out)`` runs row [counter] (step index = counter) and decrements the counter, checking its
    tensors like :func:`fused_step_raw`. ``bind(x, m, out)`` checks them once and returns a callable that does the
    same with no per-call checks (about 0.2 us of Python overhead instead of a few us): the sampling loop's fast
    path when the model writes into a fixed ``m`` buffer. The bound tensors are kept alive by the callable; do
    not resize them while it is in use.
    """

    def __init__(self, table: np.ndarray, clip: float, seed: int, sample_offset: int = 0) -> None:
        ext = extension.cpu_extension()
        if ext is None:
            raise MissingDependencyError(
                "HostStepTable needs the compiled CPU extension ddpm._C (pip install -e .)"
            )
        t = np.ascontiguousarray(np.asarray(table, dtype=np.float64)[:, [0, 1, 3, 4, 5]].astype(np.float32))
        if t.ndim != 2 or t.shape[1] != 5 or t.shape[0] < 1:
            raise InvalidArgumentError(f"table must be [steps, 5] (a, b, p, q, sigma), got shape {t.shape}")
        clip = float(clip)
        if not clip > 0:
            raise InvalidArgumentError(f"clip must be > 0 (math.inf for no clipping), got {clip}")
        seed = check_seed(seed)
        sample_offset = check_counter_args(0, step=0, stream=0, sample_offset=sample_offset)[2]
        try:
            self._table = ext.StepTable(t.ctypes.data, t.shape[0], clip, seed, sample_offset)
        except ValueError as e:
            raise InvalidArgumentError(f"HostStepTable: {e}") from None
        self.sample_offset = sample_offset

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
        return cls(
            schedule.coefficients(prediction, sampler, variance, eta), check_clip(clip), seed, sample_offset
        )

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

    def _checked(self, x: torch.Tensor, m: torch.Tensor, out: torch.Tensor) -> tuple[int, int]:
        check_step_tensors(x=x, m=m, out=out)
        if x.device.type != "cpu":
            raise InvalidArgumentError(f"HostStepTable works on CPU tensors, got x on {x.device}")
        n = x.shape[0]
        check_counter_args(n, step=0, stream=0, sample_offset=self.sample_offset)
        d = x.numel() // n if n else 1
        if d == 0:
            raise InvalidArgumentError(f"x has no elements per sample: shape {tuple(x.shape)}")
        return n, d

    def step(self, x: torch.Tensor, m: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out = the fused step of row [counter] on (x, m); then counter -= 1. Returns out (may be x)."""
        n, d = self._checked(x, m, out)
        try:
            self._table.step(x.data_ptr(), m.data_ptr(), out.data_ptr(), n, d)
        except ValueError as e:
            raise InvalidArgumentError(f"HostStepTable.step: {e}") from None
        return out

    def bind(self, x: torch.Tensor, m: torch.Tensor, out: torch.Tensor):
        """A callable ``run() -> out`` doing :meth:`step` on these tensors, checked once, here."""
        n, d = self._checked(x, m, out)
        try:
            return self._table.bind(x, m, out, x.data_ptr(), m.data_ptr(), out.data_ptr(), n, d)
        except ValueError as e:
            raise InvalidArgumentError(f"HostStepTable.bind: {e}") from None
