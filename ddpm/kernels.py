"""The fused reverse step, one front over one binding per device (docs/design.md, "The step").

    x0_hat = clip(p x + q m, -c, c);   x_prev = a x + b x0_hat + c_h h + sigma z;   then h <- x0_hat

with (a, b, c_h, p, q, sigma) a row of ``Schedule.coefficients`` (columns ``COEF_A .. COEF_SIGMA``), z drawn
in-kernel from Philox (``ddpm.noise.normal(seed, x.shape, step=i, sample_offset=...)``), and h the previous
step's x0_hat (DPM-Solver++(2M); c_h = 0 for DDPM and DDIM, and then h is only written, never read).

Three optional operands, in the same pass (docs/design.md, "Operands of the step"): a learned-range variance
output v (8-wide rows: sigma_e = exp(lv0 + lv1 v)), classifier-free guidance (uncond u and scale S: m -> u + S
(m - u)) and dynamic thresholding (per-sample bounds s: x0_hat -> clamp(x0_hat, -s, s) / s, computed by a first
pass, :func:`ddpm.step_launch.dynamic_thresholds`). m, u and v may be views such as ``out[:, :C]`` whose samples
are contiguous but ``stride(0)`` apart.

* :func:`fused_step` (public as ``ddpm.fused_step``): same arguments as :func:`ddpm.step`; each schedule's
  float32 table is built once (:func:`kernel_table`) and the kernel reads row i from it.
* :func:`fused_step_raw`: the float32 row passed in, for loops that hold their own rows.
* :class:`HostStepTable` / :class:`DeviceStepTable`: the table and a step counter held by the kernel module (on
  CUDA in device memory, so one captured CUDA graph replays every step); ``HostStepTable.bind`` checks its
  tensors once and returns a zero-argument callable, the fastest CPU loop.

Checks live in one layer each: the shared launcher (:func:`ddpm.step_launch.launch`) checks tensors (dtype,
shape, device, contiguity); ``ddpm._C`` and ``ddpm._C_cuda`` check every number they are handed (pointers,
overlap, sizes, coefficients, clip, seed, Philox words) and name it. Without a compiled module a pure torch path
(NumPy reference noise) runs instead, with a one-time warning. Inference only: the kernels write through raw
pointers and are invisible to autograd.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import extension
from .diffusion import DynamicThreshold, check_clip_or_threshold
from .errors import InvalidArgumentError
from .schedule import COEF_P, COEF_Q, NUM_COEFS_LEARNED, Prediction, Sampler, Schedule, Variance
from .step_launch import (
    _F32,
    _row,
    check_step_tensors,
    dynamic_thresholds,
    host_table,
    launch,
    launch_checked,
    same_cpu_layout,
    table32,
)
from .step_tables import DeviceStepTable, HostStepTable

__all__ = [
    "fused_step",
    "fused_step_raw",
    "kernel_table",
    "KernelTable",
    "DeviceStepTable",
    "HostStepTable",
    "check_step_tensors",
    "dynamic_thresholds",
]

_INF = math.inf

# ---------------------------------------------------------------------------------------- cached tables


@dataclass(frozen=True, eq=False)
class KernelTable:
    """A schedule's coefficient table as the kernels read it, built once per (schedule, prediction, sampler,
    variance, eta) by :func:`kernel_table`.

    Attributes:
        table32: [steps, 6] float32 (a, b, c, p, q, sigma), read-only; [steps, 8] (plus lv0, lv1) for a
            learned-range variance.
        rows: the same rows as tuples of Python floats (by-value calls: CUDA, the torch path).
        host: ``ddpm._C.StepTable`` over table32, or None without the CPU module.
        cpu_step: that module's ``fused_step`` (held here so the public call's fast path looks nothing up).
    """

    table32: np.ndarray
    rows: tuple[tuple[float, ...], ...]
    host: Any
    cpu_step: Any = None


# (id(schedule), prediction, sampler, variance, eta) -> KernelTable, keyed on the arguments as given so that a hit
# costs one dict lookup. A finalizer drops a schedule's entries when it dies, before its id can be reused.
_TABLES: dict[tuple, KernelTable] = {}


# The last lookup's arguments and result; the schedule by weak reference, so that memo keeps nothing alive.
_LAST: list[Any] = [lambda: None, None, None, None, None, None]


def _forget(schedule_id: int) -> None:
    for key in [k for k in _TABLES if k[0] == schedule_id]:
        del _TABLES[key]


def kernel_table(
    schedule: Schedule,
    prediction: Prediction | str = "eps",
    sampler: Sampler | str = "ddpm",
    variance: Variance | str = "fixed_small",
    eta: float = 0.0,
) -> KernelTable:
    """The cached float32 table of ``schedule.coefficients(prediction, sampler, variance, eta)``."""
    key = (id(schedule), prediction, sampler, variance, eta)
    try:
        return _TABLES[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable argument: let coefficients() name it
        key = None
    t32 = table32(schedule.coefficients(prediction, sampler, variance, eta))
    ext = extension.cpu_extension()
    entry = KernelTable(
        t32,
        tuple(tuple(float(v) for v in row) for row in t32),
        None if ext is None else host_table(ext, t32),
        None if ext is None else ext.fused_step,
    )
    if key is not None:
        if not any(k[0] == key[0] for k in _TABLES):
            weakref.finalize(schedule, _forget, key[0])
        _TABLES[key] = entry
    return entry


# ---------------------------------------------------------------------------------------- public steps


def fused_step_raw(
    x: torch.Tensor,
    m: torch.Tensor,
    coeffs: Sequence[float],
    clip: float,
    seed: int,
    step_index: int,
    sample_offset: int,
    out: torch.Tensor,
    history: torch.Tensor | None = None,
    variance: torch.Tensor | None = None,
    uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
    thresholds: torch.Tensor | None = None,
) -> torch.Tensor:
    """One fused reverse step into ``out`` (which may be ``x``, or ``m`` when m is contiguous); returns ``out``.

    Pass the optional operands (``variance`` onwards) by keyword. They are not keyword-only on purpose: CPython
    (3.11+) specialises calls only to functions without keyword-only parameters, and a ``*`` here would cost
    ~0.07 us on every call of the loop's hot path (3% of a 1x1x28x28 step).

    Args:
        x: x_t [N, ...] float32, contiguous. m: the model output, same shape, dtype and device; each sample's
            elements contiguous, samples ``m.stride(0) >= d`` apart (e.g. ``output[:, :C]``).
        coeffs: (a, b, c, p, q, sigma), the float32-cast row of the schedule's coefficient table for this step;
            or the 8-wide row (plus lv0, lv1) of a learned-range variance, which needs ``variance``.
        clip: the x0_hat bound (math.inf: no clipping; must be inf with ``thresholds``).
        seed: the run's seed in [0, 2^64). step_index: the schedule index i (Philox counter word 2).
        sample_offset: global index of sample 0 of this batch (Philox counter word 1 = sample_offset + n).
        out: float32 [N, ...] like x, contiguous.
        history: None, or h [N, ...] like x (its own buffer): c h is added, then h <- x0_hat.
        variance: v like m (e.g. ``output[:, C:]``): sigma -> exp(lv0 + lv1 v) where sigma != 0.
        uncond: u like m, the unconditional output; guidance: the scale S (finite): m -> u + S (m - u).
        thresholds: [N] float32, per-sample bounds s (from :func:`dynamic_thresholds`): x0_hat ->
            clamp(x0_hat, -s, s) / s.
    """
    if variance is None and uncond is None and thresholds is None and guidance == 1.0:
        return launch(x, m, coeffs, None, clip, seed, step_index, sample_offset, out, history)
    return launch_checked(
        x, m, coeffs, None, clip, seed, step_index, sample_offset, out, history,
        variance=variance, uncond=uncond, guidance=guidance, thresholds=thresholds,
    )  # fmt: skip


def fused_step(
    schedule: Schedule,
    i: int,
    x: torch.Tensor,
    model_output: torch.Tensor,
    *,
    seed: int,
    sample_offset: int = 0,
    prediction: Prediction | str = "eps",
    sampler: Sampler | str = "ddpm",
    variance: Variance | str = "fixed_small",
    eta: float = 0.0,
    clip: float | DynamicThreshold | None = None,
    out: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
    variance_output: torch.Tensor | None = None,
    uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
) -> torch.Tensor:
    """One reverse step x_i -> x_{i-1}, as :func:`ddpm.step` fed ``noise = ddpm.noise.normal(seed, x.shape,
    step=i, sample_offset=sample_offset)`` (and, with guidance, the guided output u + S (m - u)), computed in one
    fused kernel pass.

    Args:
        schedule: the (possibly respaced) schedule; ``i`` indexes it, 0 = the cleanest step.
        x: x_t [N, ...] float32. model_output: the network's output at (x, schedule.timesteps[i]), like x (may
            be a view with contiguous samples, such as ``output[:, :C]``).
        seed: the run's seed; sample_offset: the global index of x[0] (sample k's noise does not depend on the
            batch it is drawn in).
        clip: clip x0_hat to [-clip, clip]; None for no clipping; or a :class:`ddpm.diffusion.DynamicThreshold`
            (its per-sample thresholds are computed here, in a first pass).
        out: where to write x_{i-1} (``out=x`` updates in place); a new tensor when None.
        history: the previous step's x0_hat [N, ...] (multistep samplers), overwritten with this step's.
        variance_output: v like model_output (e.g. ``output[:, C:]``) for ``variance="learned_range"``: required
            with sampler ddpm, ignored by the samplers that use the mean only (ddim, dpm++).
        uncond: the unconditional output u (classifier-free guidance), like model_output; guidance: its scale S.
    Returns:
        x_{i-1}, float32, like x.
    """
    last = _LAST
    if (
        schedule is last[0]()
        and prediction is last[1]
        and sampler is last[2]
        and variance is last[3]
        and eta is last[4]
    ):  # a loop calls with the same objects every step: skip hashing the key
        table = last[5]
    else:
        try:
            table = _TABLES[id(schedule), prediction, sampler, variance, eta]
        except (KeyError, TypeError):
            table = kernel_table(schedule, prediction, sampler, variance, eta)
        _LAST[:] = (weakref.ref(schedule), prediction, sampler, variance, eta, table)
    m = model_output
    if clip is None:
        c = _INF
    elif type(clip) is float and 0.0 < clip < _INF:
        c = clip
    else:
        c = check_clip_or_threshold(clip)
        if type(c) is DynamicThreshold:
            return _fused_step_operands(
                table,
                i,
                x,
                m,
                seed,
                sample_offset,
                variance,
                c,
                out,
                history,
                variance_output,
                uncond,
                guidance,
            )
    if variance_output is not None or uncond is not None or guidance != 1.0:
        return _fused_step_operands(
            table, i, x, m, seed, sample_offset, variance, c, out, history, variance_output, uncond, guidance
        )
    # The CPU fast path, inlined: at 1x1x28x28 the kernel takes ~1 us and every Python call or torch attribute
    # (40-130 ns each) shows in the total. These are the checks memory safety needs (float32, CPU, contiguous,
    # same shape); anything unusual takes the path below, whose checks name the offending tensor.
    step_fn = table.cpu_step
    if step_fn is not None and out is not None:
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
                and (out is x or same_cpu_layout(out, shape))
                and (history is None or same_cpu_layout(history, shape))
            )
        except AttributeError:
            ok = False
        if ok:
            numel = x.numel()
            if numel:
                xp = x.data_ptr()
                n = shape[0]
                try:
                    step_fn(
                        xp, m.data_ptr(), xp if out is x else out.data_ptr(), n, numel // n, table.host, c, seed,
                        i, sample_offset, 0 if history is None else history.data_ptr(),
                    )  # fmt: skip
                except ValueError as e:  # the binding's own checks (seed, step, offset, overlap), by name
                    raise InvalidArgumentError(f"fused_step: {_public_message(table, e)}") from None
            return out
    if out is None:
        if not isinstance(x, torch.Tensor):
            raise InvalidArgumentError(f"x must be a torch.Tensor, got {type(x).__name__}")
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if table.table32.shape[1] == NUM_COEFS_LEARNED:
        raise InvalidArgumentError(f"fused_step: {_NEEDS_VARIANCE}")
    host = table.host
    if host is None:  # no CPU module: every device takes the row by value
        return launch_checked(x, model_output, None, table.rows, c, seed, i, sample_offset, out, history)
    return launch(x, model_output, host, table.rows, c, seed, i, sample_offset, out, history)


_NEEDS_VARIANCE = (
    "variance='learned_range' with sampler ddpm needs variance_output: the model's variance output v (the "
    "second half of its channels), like model_output"
)


def _public_message(table: KernelTable, e: ValueError) -> str:
    """The binding's message, in the public call's terms where they differ."""
    learned = table.table32.shape[1] == NUM_COEFS_LEARNED
    return _NEEDS_VARIANCE if learned and "needs the variance operand" in str(e) else str(e)


def _fused_step_operands(
    table: KernelTable,
    i: int,
    x: torch.Tensor,
    m: torch.Tensor,
    seed: int,
    sample_offset: int,
    variance: Variance | str,
    clip: float | DynamicThreshold,
    out: torch.Tensor | None,
    history: torch.Tensor | None,
    variance_output: torch.Tensor | None,
    uncond: torch.Tensor | None,
    guidance: float,
) -> torch.Tensor:
    """fused_step with any of its optional operands: the checked launch, after the thresholds' first pass."""
    row = _row(table.rows, i)
    learned = len(row) == NUM_COEFS_LEARNED
    if variance_output is not None and not learned:
        if Variance.parse(variance) is not Variance.LEARNED_RANGE:
            raise InvalidArgumentError(
                f"variance_output is read only with variance='learned_range', got variance='{variance}'"
            )
        variance_output = (
            None  # ddim and the dpm++ samplers use the mean only (ddpm.schedule.coefficient_table)
        )
    if learned and variance_output is None:
        raise InvalidArgumentError(f"fused_step: {_NEEDS_VARIANCE}")
    if out is None:
        if not isinstance(x, torch.Tensor):
            raise InvalidArgumentError(f"x must be a torch.Tensor, got {type(x).__name__}")
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    thresholds = None
    if isinstance(clip, DynamicThreshold):
        thresholds = dynamic_thresholds(
            x, m, row[COEF_P], row[COEF_Q], clip, uncond=uncond, guidance=guidance
        )
        clip = _INF
    host = table.host if isinstance(x, torch.Tensor) and x.is_cpu else None
    return launch_checked(
        x, m, host, None if host is not None else table.rows, clip, seed, i, sample_offset, out, history,
        variance=variance_output, uncond=uncond, guidance=guidance, thresholds=thresholds,
        variance_name="variance_output",
    )  # fmt: skip
