"""The coefficient tables with a step counter, the fastest way to run a loop of fused steps.

* :class:`HostStepTable` - the [steps, 6 or 8] table and a step counter held by ddpm._C; ``bind(x, m, out)``
  checks the buffers once and returns a callable that runs one step per call (the fastest CPU loop).
* :class:`DeviceStepTable` - CUDA: the table and an int32 counter in device memory; the kernel reads row
  [counter] and decrements it, so one captured CUDA graph replays every step.

Both launch through :mod:`ddpm.step_launch` (its checks and operands: docs/design.md, "Operands of the step");
public names are re-exported by :mod:`ddpm.kernels`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import numpy as np
import torch

from . import extension
from .diffusion import DynamicThreshold, check_clip_or_threshold
from .errors import InvalidArgumentError, MissingDependencyError
from .schedule import COEF_P, COEF_Q, Prediction, Sampler, Schedule, Variance
from .step_launch import (
    _F32,
    check_step_tensors,
    dynamic_thresholds,
    host_table,
    launch,
    launch_checked,
    operand_kwargs,
    table32,
)

__all__ = ["DeviceStepTable", "HostStepTable"]

# ---------------------------------------------------------------------------------------- tables with a counter


def _split_clip(clip: float | DynamicThreshold) -> tuple[float, DynamicThreshold | None]:
    """(the kernel's clip bound, the dynamic threshold or None): a DynamicThreshold runs with clip = inf."""
    return (math.inf, clip) if isinstance(clip, DynamicThreshold) else (clip, None)


class HostStepTable:
    """A coefficient table and a step counter held by ddpm._C: the CPU twin of :class:`DeviceStepTable`.

    ``step(x, m, out)`` runs row [counter] (step index = counter) and decrements the counter. ``bind(x, m, out)``
    checks the tensors once and returns a callable that does the same with nothing left to check or convert
    (the sampling loop's fast path when the model writes into a fixed ``m`` buffer). The bound tensors are kept
    alive by the callable; do not resize them while it is in use. The table may be 8 wide (learned-range variance:
    pass ``variance``); ``clip`` may be a :class:`DynamicThreshold`, whose per-sample thresholds each call then
    computes from the counter's row before the step.
    """

    def __init__(
        self, table: np.ndarray, clip: float | DynamicThreshold, seed: int, sample_offset: int = 0
    ) -> None:
        ext = extension.cpu_extension()
        if ext is None:
            raise MissingDependencyError(
                "HostStepTable needs the compiled CPU extension ddpm._C (pip install -e .)"
            )
        self._rows = table32(table)
        self._table = host_table(ext, self._rows)
        self._ext, self.clip, self.seed, self.sample_offset = ext, clip, seed, sample_offset
        self._bound, self._dynamic = _split_clip(clip)

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
        clip: float | DynamicThreshold | None = None,
    ) -> HostStepTable:
        """The table of ``schedule.coefficients(prediction, sampler, variance, eta)``."""
        table = schedule.coefficients(prediction, sampler, variance, eta)
        return cls(table, check_clip_or_threshold(clip), seed, sample_offset)

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
        self,
        x: torch.Tensor,
        m: torch.Tensor,
        out: torch.Tensor,
        history: torch.Tensor | None = None,
        variance: torch.Tensor | None = None,
        uncond: torch.Tensor | None = None,
        guidance: float = 1.0,
        thresholds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """out = the fused step of row [counter] on (x, m); then counter -= 1. Returns out (may be x). The
        optional operands go by keyword (not keyword-only: see ddpm.kernels.fused_step_raw)."""
        if isinstance(x, torch.Tensor) and not x.is_cpu:
            raise InvalidArgumentError(f"HostStepTable works on CPU tensors, got x on {x.device}")
        if self._dynamic is not None and thresholds is None and 0 <= (i := self.counter) < self.steps:
            row = self._rows[i]
            thresholds = dynamic_thresholds(
                x, m, float(row[COEF_P]), float(row[COEF_Q]), self._dynamic, uncond=uncond, guidance=guidance
            )
        args = (x, m, self._table, None, self._bound, self.seed, None, self.sample_offset, out, history)
        if variance is None and uncond is None and thresholds is None and guidance == 1.0:
            return launch(*args)
        return launch_checked(
            *args, variance=variance, uncond=uncond, guidance=guidance, thresholds=thresholds
        )

    def bind(
        self,
        x: torch.Tensor,
        m: torch.Tensor,
        out: torch.Tensor,
        history: torch.Tensor | None = None,
        *,
        variance: torch.Tensor | None = None,
        uncond: torch.Tensor | None = None,
        guidance: float = 1.0,
    ) -> Callable[[], torch.Tensor]:
        """A callable ``run() -> out`` doing :meth:`step` on these tensors, checked once, here."""
        check_step_tensors(x=x, out=out, history=history)
        if not x.is_cpu:
            raise InvalidArgumentError(f"HostStepTable works on CPU tensors, got x on {x.device}")
        thresholds = None if self._dynamic is None else torch.empty(x.shape[0], dtype=_F32)
        kw = operand_kwargs(x, m, variance, uncond, guidance, thresholds)
        n = x.shape[0]
        d = x.numel() // n if n else 1
        h = 0 if history is None else history.data_ptr()
        try:
            bound = self._ext.BoundStep(
                x.data_ptr(), m.data_ptr(), out.data_ptr(), n, d, self._table, self._bound, self.seed, None,
                self.sample_offset, h, returns=out, keep_alive=(x, m, out, history, variance, uncond, thresholds),
                **kw,
            )  # fmt: skip
        except (ValueError, TypeError) as e:
            raise InvalidArgumentError(f"HostStepTable.bind: {e}") from None
        if self._dynamic is None or n == 0:
            return bound
        # The thresholds of the counter's row, then the bound step (which reads them); the GIL is held between.
        dyn, rows, table, ext = self._dynamic, self._rows, self._table, self._ext
        t_args = (x.data_ptr(), m.data_ptr(), thresholds.data_ptr(), n, d)
        t_kw = {k: v for k, v in kw.items() if k in ("m_stride", "uncond", "uncond_stride", "guidance")}

        def run() -> torch.Tensor:
            i = table.counter
            if 0 <= i < len(rows):  # else the step raises the counter's IndexError
                ext.dynamic_thresholds(
                    *t_args, float(rows[i, COEF_P]), float(rows[i, COEF_Q]), dyn.ratio, dyn.max_value, **t_kw
                )
            return bound()

        return run


class DeviceStepTable:
    """The coefficient table and an int32 step counter in CUDA device memory, for CUDA-graph sampling.

    ``step(x, m, out)`` launches the kernel on torch's current stream: it reads row ``counter`` of the table, uses
    ``counter`` as the step index of the noise, then decrements the counter on the device. Capture one ``step``
    (with the model call) in a ``torch.cuda.CUDAGraph``, ``set_counter(steps - 1)``, and replay the graph ``steps``
    times: the loop runs i = steps-1 .. 0 without re-capturing, and without the stale by-value coefficients a
    captured kernel argument would have. A counter outside the table makes the kernel write NaN (caught by the
    loop's finiteness check), never an out-of-bounds read. The table may be 8 wide (pass ``variance``); with a
    :class:`DynamicThreshold` as ``clip``, ``step`` first computes the thresholds with torch ops that read p and q
    of the counter's row on the device (capturable: no host synchronisation).
    """

    def __init__(
        self,
        table: np.ndarray,
        clip: float | DynamicThreshold,
        seed: int,
        sample_offset: int,
        device: torch.device | str,
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
                t32.shape[1],
            )
        except ValueError as e:
            raise InvalidArgumentError(f"DeviceStepTable: {e}") from None
        self.clip, self.seed, self.sample_offset = clip, seed, sample_offset
        self._bound, self._dynamic = _split_clip(clip)

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
        clip: float | DynamicThreshold | None = None,
        device: torch.device | str = "cuda",
    ) -> DeviceStepTable:
        """The table of ``schedule.coefficients(prediction, sampler, variance, eta)``."""
        table = schedule.coefficients(prediction, sampler, variance, eta)
        return cls(table, check_clip_or_threshold(clip), seed, sample_offset, device)

    @property
    def steps(self) -> int:
        return int(self.table.shape[0])

    def set_counter(self, i: int) -> None:
        """Set the device step counter to i (an async write on the current stream; do it outside capture)."""
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self.steps:
            raise InvalidArgumentError(f"step counter must be an integer in 0..{self.steps - 1}, got {i!r}")
        self.counter.fill_(int(i))

    def step(
        self,
        x: torch.Tensor,
        m: torch.Tensor,
        out: torch.Tensor,
        history: torch.Tensor | None = None,
        variance: torch.Tensor | None = None,
        uncond: torch.Tensor | None = None,
        guidance: float = 1.0,
        thresholds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """out = the fused step of row [counter] on (x, m); then counter -= 1. Returns out (may be x). The
        optional operands go by keyword (not keyword-only: see ddpm.kernels.fused_step_raw)."""
        if isinstance(x, torch.Tensor) and x.device != self.device:
            raise InvalidArgumentError(f"x is on {x.device} but the table is on {self.device}")
        if self._dynamic is not None and thresholds is None:
            row = self.table.index_select(0, self.counter.clamp(0, self.steps - 1).long())[0]
            thresholds = dynamic_thresholds(
                x, m, row[COEF_P], row[COEF_Q], self._dynamic, uncond=uncond, guidance=guidance
            )
        return launch_checked(
            x, m, self._table, None, self._bound, self.seed, None, self.sample_offset, out, history,
            variance=variance, uncond=uncond, guidance=guidance, thresholds=thresholds,
        )  # fmt: skip
