"""The launcher the fused-step front shares: tensor checks, the bindings' call, the torch fallback, and the
dynamic-thresholding pass.

One binding per device: ``ddpm._C.fused_step`` (CPU) and ``ddpm._C_cuda.fused_step`` (CUDA). :func:`launch` is the
one Python layer in front of them and checks tensors only (dtype, shape, device, contiguity, the sample strides of
the row-read operands); the bindings check every number they are handed (pointers, overlap, sizes, strides,
coefficients, clip, guidance, seed, Philox words) and name it, and their ValueError becomes
:class:`InvalidArgumentError` here. Without a compiled module a pure torch path (NumPy reference noise) runs
instead, with a one-time warning.

Optional operands (docs/design.md, "Operands of the step"): ``variance`` (the learned-range variance output; the
row is then 8 wide), ``uncond`` with ``guidance`` (classifier-free guidance) and ``thresholds`` (per-sample bounds
of dynamic thresholding, from :func:`dynamic_thresholds`). m, uncond and variance may be row-contiguous views such
as ``out[:, :C]`` of a [N, 2C, H, W] model output; x, out and history are contiguous. The tables with a step
counter that use this launcher live in :mod:`ddpm.step_tables`; public names are re-exported by
:mod:`ddpm.kernels`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import extension
from .diffusion import DynamicThreshold
from .errors import InvalidArgumentError, MissingDependencyError
from .schedule import NUM_COEFS, NUM_COEFS_LEARNED
from .step_torch import check_guidance, fused_step_torch, thresholds_torch

__all__ = [
    "check_step_tensors",
    "dynamic_thresholds",
    "launch",
    "launch_checked",
    "host_table",
    "table32",
]

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


def sample_stride(name: str, t: Any, x: torch.Tensor) -> int:
    """The per-sample stride (elements) of an operand read row by row (m, uncond, variance): float32, x's shape and
    device, each sample's elements contiguous, samples at least d apart (``out[:, :C]`` of a [N, 2C, ...] tensor
    is such a view). x must have passed :func:`check_step_tensors`."""
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != _F32:
        raise InvalidArgumentError(f"{name} must be float32, got {t.dtype}")
    if t.device != x.device:
        raise InvalidArgumentError(f"{name} is on {t.device} but x is on {x.device}")
    if t.shape != x.shape:
        raise InvalidArgumentError(f"{name} has shape {tuple(t.shape)} but x has shape {tuple(x.shape)}")
    n = t.shape[0]
    d = t.numel() // n if n else 1
    if t.is_contiguous() or n == 0:
        return d
    if t[0].is_contiguous() and (n == 1 or t.stride(0) >= d):
        return d if n == 1 else t.stride(0)
    raise InvalidArgumentError(
        f"{name} must have contiguous samples ({name}[k] contiguous and stride(0) >= its {d} elements, as "
        f"out[:, :C] of a [N, 2C, ...] model output), got strides {t.stride()}"
    )


def _check_thresholds(t: Any, x: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(f"thresholds must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != _F32 or t.shape != (x.shape[0],) or not t.is_contiguous():
        raise InvalidArgumentError(
            f"thresholds must be a contiguous float32 [N] = [{x.shape[0]}] tensor, got {t.dtype} "
            f"shape {tuple(t.shape)}"
        )
    if t.device != x.device:
        raise InvalidArgumentError(f"thresholds is on {t.device} but x is on {x.device}")


def operand_kwargs(
    x: torch.Tensor,
    m: torch.Tensor,
    variance: torch.Tensor | None = None,
    uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
    thresholds: torch.Tensor | None = None,
    variance_name: str = "variance",
) -> dict[str, Any]:
    """The bindings' keyword arguments for m's stride and the optional operands, tensors checked (x already)."""
    d = x.numel() // x.shape[0] if x.shape[0] else 1
    kw: dict[str, Any] = {}
    m_stride = sample_stride("m", m, x)
    if m_stride != d:
        kw["m_stride"] = m_stride
    if variance is not None:
        kw["variance_stride"] = sample_stride(variance_name, variance, x)
        kw["variance"] = variance.data_ptr()
    if uncond is not None:
        kw["uncond_stride"] = sample_stride("uncond", uncond, x)
        kw["uncond"] = uncond.data_ptr()
    if guidance != 1.0 or uncond is not None:
        kw["guidance"] = guidance  # its value is the binding's to check
    if thresholds is not None:
        _check_thresholds(thresholds, x)
        kw["thresholds"] = thresholds.data_ptr()
    return kw


def _cpu_stride(t: Any, shape: torch.Size, inner: tuple[int, ...], d: int) -> int | None:
    """The sample stride of a CPU float32 operand whose samples are laid out as x's (the cheap test), else None."""
    if t.dtype is not _F32 or not t.is_cpu or t.shape != shape:
        return None
    st = t.stride()
    if st[1:] != inner:
        return None
    return d if shape[0] == 1 else st[0] if st[0] >= d else None


def cpu_operand_kwargs(x, m, out, history, variance, uncond, guidance, thresholds) -> dict[str, Any] | None:
    """:func:`operand_kwargs` for CPU tensors in the usual layouts, checked in one cheap pass (~1 us instead of
    ~4: no torch.device objects, no per-sample views); None when anything is unusual, and the full checks then
    name it."""
    try:
        shape = x.shape
        if not (
            shape
            and x.dtype is _F32
            and x.is_cpu
            and x.is_contiguous()
            and (out is x or same_cpu_layout(out, shape))
            and (history is None or same_cpu_layout(history, shape))
        ):
            return None
        n = shape[0]
        d = x.numel() // n if n else 1
        inner = x.stride()[1:]
        kw: dict[str, Any] = {}
        if (stride := _cpu_stride(m, shape, inner, d)) is None:
            return None
        if stride != d:
            kw["m_stride"] = stride
        if variance is not None:
            if (stride := _cpu_stride(variance, shape, inner, d)) is None:
                return None
            kw["variance"], kw["variance_stride"] = variance.data_ptr(), stride
        if uncond is not None:
            if (stride := _cpu_stride(uncond, shape, inner, d)) is None:
                return None
            kw["uncond"], kw["uncond_stride"] = uncond.data_ptr(), stride
        if guidance != 1.0 or uncond is not None:
            kw["guidance"] = guidance
        if thresholds is not None:
            if not (thresholds.dtype is _F32 and thresholds.is_cpu and thresholds.is_contiguous()):
                return None
            if thresholds.shape != (n,):
                return None
            kw["thresholds"] = thresholds.data_ptr()
        return kw
    except AttributeError:
        return None


def table32(table: np.ndarray) -> np.ndarray:
    """A [steps, 6] (or [steps, 8], learned-range variance) coefficient table as C-contiguous float32 (its values
    are the binding's to check)."""
    t = np.ascontiguousarray(np.asarray(table, dtype=np.float64).astype(np.float32))
    if t.ndim != 2 or t.shape[1] not in (NUM_COEFS, NUM_COEFS_LEARNED) or t.shape[0] < 1:
        raise InvalidArgumentError(
            f"table must be [steps, 6] (a, b, c, p, q, sigma) or [steps, 8] (plus lv0, lv1), got shape {t.shape}"
        )
    t.setflags(write=False)
    return t


def host_table(ext: Any, t32: np.ndarray) -> Any:
    try:
        return ext.StepTable(t32.ctypes.data, t32.shape[0], t32.shape[1])
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
    """Check the tensors, then call the device's binding (the step without optional operands; those go through
    :func:`launch_checked`). ``coeffs``: a float32 row, a ``_C.StepTable`` (row ``step``, or with step=None its
    counter's) or a ``_C_cuda.DeviceTable``; ``rows``: the table's rows by value, for the devices and paths that
    cannot read a ``_C.StepTable``."""
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


def launch_checked(
    x,
    m,
    coeffs,
    rows,
    clip,
    seed,
    step,
    sample_offset,
    out,
    history,
    *,
    variance: torch.Tensor | None = None,
    uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
    thresholds: torch.Tensor | None = None,
    variance_name: str = "variance",
) -> torch.Tensor:
    """launch with the full tensor checks and the optional operands, for CUDA tensors, the pure torch path and
    error messages."""
    kw = None
    if extension.cpu_extension() is not None:
        kw = cpu_operand_kwargs(x, m, out, history, variance, uncond, guidance, thresholds)
    if kw is None:
        check_step_tensors(x=x, out=out, history=history)
        kw = operand_kwargs(x, m, variance, uncond, guidance, thresholds, variance_name)
    if x.numel() == 0:
        return out
    n = x.shape[0]
    ptrs = (x.data_ptr(), m.data_ptr(), out.data_ptr(), n, x.numel() // n)
    h = 0 if history is None else history.data_ptr()
    row = coeffs if rows is None else _row(rows, step)
    try:
        if x.is_cpu and (ext := extension.cpu_extension()) is not None:
            ext.fused_step(*ptrs, row if coeffs is None else coeffs, clip, seed, step, sample_offset, h, **kw)
            return out
        if x.is_cuda and (ext := extension.cuda_extension()) is not None:
            dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
            stream = torch.cuda.current_stream(x.device).cuda_stream
            ext.fused_step(*ptrs, row, clip, seed, step, sample_offset, h, dev, stream, **kw)
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
    return fused_step_torch(
        x, m, row, clip, seed, step, sample_offset, out, history, variance, uncond, guidance, thresholds
    )


def _row(rows: Sequence[tuple[float, ...]], i: Any) -> tuple[float, ...]:
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < len(rows):
        raise InvalidArgumentError(f"step index i must be an integer in 0..{len(rows) - 1}, got {i!r}")
    return rows[int(i)]


# ---------------------------------------------------------------------------------------- dynamic thresholds


def dynamic_thresholds(
    x: torch.Tensor,
    m: torch.Tensor,
    p: float | torch.Tensor,
    q: float | torch.Tensor,
    threshold: DynamicThreshold,
    *,
    uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
) -> torch.Tensor:
    """The first pass of a dynamically thresholded step: s [N] float32, s_n = clamp(quantile(|x0_hat_n|, ratio),
    1, max_value) with x0_hat = p x + q m_g (m_g = u + guidance (m - u) when ``uncond`` is given) and
    torch.quantile's linear interpolation. Feed it to the step as ``thresholds`` (with clip = inf).

    CPU: ddpm._C (nth_element per sample). CUDA and the no-module path: torch ops (top-k of |x0_hat|), which also
    take p and q as 0-d device tensors (a CUDA graph reads them from the device table at its counter).
    """
    if not isinstance(threshold, DynamicThreshold):
        raise InvalidArgumentError(f"threshold must be a DynamicThreshold, got {type(threshold).__name__}")
    ext = extension.cpu_extension() if isinstance(x, torch.Tensor) and x.is_cpu else None
    kw = None if ext is None else cpu_operand_kwargs(x, m, x, None, None, uncond, guidance, None)
    if kw is None:
        check_step_tensors(x=x)
        kw = operand_kwargs(x, m, uncond=uncond, guidance=guidance)
    n = x.shape[0]
    out = torch.empty(n, dtype=_F32, device=x.device)
    if x.numel() == 0:
        return out
    if ext is not None and not isinstance(p, torch.Tensor) and not isinstance(q, torch.Tensor):
        try:
            ext.dynamic_thresholds(
                x.data_ptr(), m.data_ptr(), out.data_ptr(), n, x.numel() // n, float(p), float(q),
                threshold.ratio, threshold.max_value, **kw,
            )  # fmt: skip
        except (ValueError, TypeError) as e:
            raise InvalidArgumentError(f"dynamic_thresholds: {e}") from None
        return out
    check_guidance(guidance, uncond)
    return out.copy_(thresholds_torch(x, m, p, q, threshold, uncond, guidance))
