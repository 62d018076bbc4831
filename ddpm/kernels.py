"""The fused reverse step: x_prev = a x + b clip(p x + q m, -c, c) + sigma z, with z drawn in-kernel (DESIGN.md).

Three entry points, from friendliest to fastest:

* :func:`fused_step` - same meaning and arguments as :func:`ddpm.step`, but the noise is generated in the kernel:
  z = ``ddpm.noise.normal(seed, x.shape, step=i, sample_offset=sample_offset)``.
* :func:`fused_step_raw` - what a sampling loop calls every step: the float32 coefficient row is passed in, so
  the per-step Python cost is a handful of checks and one call into C++.
* :class:`DeviceStepTable` - for CUDA graphs: the coefficient table and a step counter live on the GPU, so one
  captured graph replays every step. :class:`HostStepTable` is its CPU twin: ``bind(x, m, out)`` checks the
  buffers once and returns a callable that runs one step per call with nothing left to check or convert.

Dispatch: CUDA tensors -> ddpm._C_cuda, CPU tensors -> ddpm._C, and a pure torch path (NumPy reference noise)
when the compiled module is missing, with a one-time warning. Inference only: the kernels write through raw
pointers and are invisible to autograd.
"""

from __future__ import annotations

import math

import torch

from . import extension
from .errors import InvalidArgumentError
from .noise import check_counter_args, check_seed, normal_reference
from .schedule import Prediction, Sampler, Schedule, Variance
from .diffusion import check_clip, step_coefficients
from .step_tables import DeviceStepTable, HostStepTable, check_step_tensors

__all__ = ["fused_step", "fused_step_raw", "DeviceStepTable", "HostStepTable"]

Coeffs = tuple[float, float, float, float, float, float]


def _fused_step_torch(x, m, coeffs: Coeffs, clip: float, seed: int, step_index: int, sample_offset: int, out):
    """The pure torch path: ddpm.step's arithmetic with the NumPy reference noise."""
    a, b, _c, p, q, sigma = coeffs
    x0_hat = p * x + q * m
    if math.isfinite(clip):
        x0_hat = x0_hat.clamp(-clip, clip)
    res = a * x + b * x0_hat
    if sigma != 0.0:
        z = normal_reference(seed, tuple(x.shape), step=step_index, sample_offset=sample_offset)
        res = res + sigma * torch.from_numpy(z).to(x.device)
    return out.copy_(res)


_F32 = torch.float32
_U32 = 1 << 32
_U64 = 1 << 64


def fused_step_raw(
    x: torch.Tensor,
    m: torch.Tensor,
    coeffs: Coeffs,
    clip: float,
    seed: int,
    step_index: int,
    sample_offset: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """One fused reverse step into ``out`` (which may be ``x`` or ``m``); returns ``out``.

    Args:
        x: x_t [N, ...] float32, contiguous. m: the model output, same shape, dtype and device.
        coeffs: (a, b, p, q, sigma), the float32-cast row of the schedule's coefficient table for this step.
        clip: the x0_hat bound c (math.inf: no clipping).
        seed: the run's seed in [0, 2^64). step_index: the schedule index i (Philox counter word 2).
        sample_offset: global index of sample 0 of this batch (Philox counter word 1 = sample_offset + n).
        out: float32 [N, ...] like x.
    """
    # Fast path: the checks a sampling loop passes every step, written to cost ~1 us; anything unusual falls
    # through to the full checks, which name the offending argument.
    try:
        shape = x.shape
        ok = (
            x.dtype is _F32
            and m.dtype is _F32
            and out.dtype is _F32
            and x.is_contiguous()
            and m.is_contiguous()
            and out.is_contiguous()
            and m.shape == shape
            and out.shape == shape
            and len(shape) > 0
            and type(seed) is int
            and 0 <= seed < _U64
            and type(step_index) is int
            and 0 <= step_index < _U32
            and type(sample_offset) is int
            and 0 <= sample_offset
            and sample_offset + shape[0] <= _U32
            and clip > 0
        )
        on_cpu = ok and x.is_cpu and m.is_cpu and out.is_cpu
    except (AttributeError, TypeError):
        ok = on_cpu = False
    if not ok or not (on_cpu or (x.device == m.device == out.device)):
        check_step_tensors(x=x, m=m, out=out)
        seed = check_seed(seed)
        step_index, _, sample_offset = check_counter_args(
            shape[0], step=step_index, stream=0, sample_offset=sample_offset
        )
        clip = float(clip)
        if not clip > 0:
            raise InvalidArgumentError(f"clip must be > 0 (math.inf for no clipping), got {clip}")
        shape, on_cpu = x.shape, x.device.type == "cpu"
    try:
        a, b, c, p, q, sigma = coeffs
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"coeffs must be 6 floats (a, b, c, p, q, sigma), got {coeffs!r}") from None
    if c != 0.0:  # TEMPORARY until the kernel carries the history operand
        raise InvalidArgumentError("history coefficient c != 0 is not supported yet")
    numel = x.numel()
    if numel == 0:
        return out
    n = shape[0]
    # the argument list both extensions share; CUDA adds the device and the stream to launch on
    args = (
        x.data_ptr(),
        m.data_ptr(),
        out.data_ptr(),
        n,
        numel // n,
        a,
        b,
        p,
        q,
        sigma,
        clip,
        seed,
        step_index,
        sample_offset,
    )
    try:
        if on_cpu:
            ext = extension.cpu_extension()
            if ext is not None:
                ext.fused_step(*args)
                return out
        elif x.is_cuda:
            ext = extension.cuda_extension()
            if ext is not None:
                dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
                ext.fused_step(*args, dev, torch.cuda.current_stream(x.device).cuda_stream)
                return out
    except ValueError as e:  # the C++ side's own argument checks (std::invalid_argument)
        raise InvalidArgumentError(f"fused_step: {e}") from None
    except TypeError as e:  # pybind11 could not convert an argument (e.g. a coefficient that is not a number)
        raise InvalidArgumentError(f"fused_step: bad argument types: coeffs must be 5 floats ({e})") from None
    extension.warn_once(
        f"fused_step:{x.device.type}",
        f"ddpm.fused_step: no compiled kernel for {x.device.type} tensors (ddpm._C / ddpm._C_cuda not built or no "
        "GPU visible); using the (slow) pure torch path. Reinstall with `pip install -e .` to build the kernels.",
    )
    coeffs = (float(a), float(b), 0.0, float(p), float(q), float(sigma))
    return _fused_step_torch(x, m, coeffs, float(clip), seed, step_index, sample_offset, out)


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
    clip: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One reverse step x_i -> x_{i-1}, as :func:`ddpm.step` fed ``noise = ddpm.noise.normal(seed, x.shape,
    step=i, sample_offset=sample_offset)``, computed in one fused kernel pass.

    Args:
        schedule: the (possibly respaced) schedule; ``i`` indexes it, 0 = the cleanest step.
        x: x_t [N, ...] float32. model_output: the network's output at (x, schedule.timesteps[i]), like x.
        seed: the run's seed; sample_offset: the global index of x[0] (sample k's noise does not depend on the
            batch it is drawn in).
        clip: clip x0_hat to [-clip, clip]; None for no clipping.
        out: where to write x_{i-1} (``out=x`` updates in place); a new tensor when None.
    Returns:
        x_{i-1}, float32, like x.
    """
    coeffs = step_coefficients(
        schedule, i, prediction=prediction, sampler=sampler, variance=variance, eta=eta
    )
    c = check_clip(clip)
    if out is None:
        if not isinstance(x, torch.Tensor):
            raise InvalidArgumentError(f"x must be a torch.Tensor, got {type(x).__name__}")
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return fused_step_raw(x, model_output, coeffs, c, seed, i, sample_offset, out)
