"""The fused step in plain torch: what runs where the compiled module does not (a source install without a
compiler, or a CPU without the module), and the dynamic-thresholding pass on CUDA. Same arithmetic and checks as
the bindings (csrc/checks.h), noise from the NumPy reference generator.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .diffusion import DynamicThreshold
from .errors import InvalidArgumentError
from .noise import normal_reference
from .schedule import NUM_COEFS, NUM_COEFS_LEARNED

__all__ = ["fused_step_torch", "thresholds_torch", "check_guidance", "overlap"]


def fused_step_torch(
    x, m, coeffs, clip, seed, step, sample_offset, out, history, variance, uncond, guidance, thresholds
) -> torch.Tensor:
    """The pure torch path: ddpm.step's arithmetic (plus c h and the optional operands) with the NumPy reference
    noise; it checks what the binding would have checked."""
    try:
        row = [float(v) for v in coeffs]
    except (TypeError, ValueError):
        row = []
    if len(row) not in (NUM_COEFS, NUM_COEFS_LEARNED):
        raise InvalidArgumentError(
            f"coeffs must be 6 floats (a, b, c, p, q, sigma) or 8 (plus lv0, lv1), got {coeffs!r}"
        )
    for name, v in zip("a b c p q sigma lv0 lv1".split(), row, strict=False):
        if not math.isfinite(v):
            raise InvalidArgumentError(f"coefficient {name} is not finite: {v}")
    a, b, c, p, q, sigma = row[:6]
    if not float(clip) > 0:
        raise InvalidArgumentError(f"clip must be > 0 (math.inf for no clipping), got {clip}")
    reads = [("uncond", uncond), ("variance", variance), ("thresholds", thresholds)]
    for name, t in reads:
        for target, label in ((out, "out"), (history, "history")):
            if t is not None and target is not None and overlap(t, target):
                raise InvalidArgumentError(
                    f"{name} must not overlap {label} (it is read while {label} is written)"
                )
    if history is not None and any(overlap(history, t) for t in (x, m, out)):
        raise InvalidArgumentError("history must not overlap x, m or out (history needs its own buffer)")
    if c != 0.0 and history is None:
        raise InvalidArgumentError(f"coefficient c = {c} != 0 needs a history buffer (the previous x0_hat)")
    if (len(row) == NUM_COEFS_LEARNED) != (variance is not None):
        raise InvalidArgumentError(
            "an 8-wide coefficient row (learned-range variance) and the variance operand go together; got a "
            f"{len(row)}-wide row and variance {'given' if variance is not None else 'None'}"
        )
    check_guidance(guidance, uncond)
    if thresholds is not None and not math.isinf(clip):
        raise InvalidArgumentError(
            f"thresholds replace the clip bound: pass clip = +inf with thresholds, got {clip}"
        )
    mg = m if uncond is None else uncond + guidance * (m - uncond)
    x0_hat = p * x + q * mg
    if thresholds is not None:
        s = thresholds.reshape(-1, *([1] * (x.dim() - 1)))
        x0_hat = x0_hat.clamp(-s, s) / s
    elif math.isfinite(clip):
        x0_hat = x0_hat.clamp(-clip, clip)
    res = a * x + b * x0_hat
    if c != 0.0:
        res = res + c * history
    if sigma != 0.0:
        z = torch.from_numpy(normal_reference(seed, tuple(x.shape), step=step, sample_offset=sample_offset))
        z = z.to(x.device)
        res = res + (torch.exp(row[6] + row[7] * variance) if variance is not None else sigma) * z
    if history is not None:
        history.copy_(x0_hat)
    return out.copy_(res)


def check_guidance(guidance: Any, uncond: torch.Tensor | None) -> float:
    """The torch paths' copy of the bindings' guidance check (checks.h)."""
    try:
        g = float(guidance)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"guidance must be a float, got {guidance!r}") from None
    if not math.isfinite(g) or not math.isfinite(float(np.float32(g))):
        raise InvalidArgumentError(f"guidance must be a finite float32 number, got {g}")
    if uncond is None and g != 1.0:
        raise InvalidArgumentError(f"guidance = {g} != 1 needs uncond (the unconditional model output)")
    return g


def _span(t: torch.Tensor) -> tuple[int, int]:
    """(first byte, bytes spanned) of a tensor whose samples may be strided."""
    if t.numel() == 0:
        return t.data_ptr(), 0
    n, d = t.shape[0], t.numel() // t.shape[0]
    stride = d if t.is_contiguous() or n == 1 else t.stride(0)
    return t.data_ptr(), ((n - 1) * stride + d) * t.element_size()


def overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    (pa, na), (pb, nb) = _span(a), _span(b)
    return pa < pb + nb and pb < pa + na


def thresholds_torch(x, m, p, q, threshold: DynamicThreshold, uncond, guidance) -> torch.Tensor:
    """dynamic_thresholds in torch ops: torch.quantile's rank (float32) and lerp, from the top k = d - floor(rank)
    values of each sample (k is small for the usual ratio ~ 0.995), with no host synchronisation."""
    mg = m if uncond is None else uncond + guidance * (m - uncond)
    a = (p * x + q * mg).abs().reshape(x.shape[0], -1)
    d = a.shape[1]
    rank = np.float32(threshold.ratio) * np.float32(d - 1)
    lo = min(int(rank), d - 1)
    hi = min(math.ceil(rank), d - 1)
    top = torch.topk(a, d - lo, dim=1, sorted=True).values  # descending: top[:, -1] is sorted[lo]
    v_lo = top[:, -1]
    v_hi = top[:, -2] if hi > lo else v_lo
    s = torch.lerp(v_lo, v_hi, float(rank - np.float32(lo)))
    s = torch.where(torch.isnan(a).any(dim=1), torch.full_like(s, math.nan), s)  # as torch.quantile
    return s.clamp(min=1.0, max=threshold.max_value)
