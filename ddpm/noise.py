"""Counter-based Gaussian noise: Philox4x32-10 (Salmon et al., SC'11; Random123) + Box-Muller (docs/design.md, "Noise").

No RNG state anywhere: the noise of element j of global sample s at step i of stream k under seed S is a pure
function of (S, s, j, i, k):

    key     = (S mod 2^32, S div 2^32)
    counter = (j div 4, s, i, k)               k = 0: per-step noise z, k = 1: the initial x_T
    w       = Philox4x32-10(counter, key)      four uint32 words
    u       = (w + 0.5) 2^-32                  in (0, 1), never 0 or 1
    (z0, z1) = sqrt(-2 ln u0) (cos 2 pi u1, sin 2 pi u1),  (z2, z3) likewise from (u2, u3)
    element j takes z_{j mod 4}

so sample k is the same image in a batch of 1 or 256, on CPU or GPU. :func:`normal_reference` is the NumPy
oracle; :func:`normal` runs the compiled kernels (C++ on CPU tensors, CUDA on CUDA tensors).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np
import torch

from . import extension
from .errors import InvalidArgumentError

__all__ = [
    "STREAM_STEP",
    "STREAM_INITIAL",
    "philox4x32",
    "normal_reference",
    "box_muller_reference",
    "normal",
    "initial_noise",
    "check_seed",
]

STREAM_STEP = 0  # counter word 3 of the per-step noise z
STREAM_INITIAL = 1  # counter word 3 of x_T

# Random123 philox.h: round multipliers and Weyl key increments of Philox4x32.
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)
_LOW32 = np.uint64(0xFFFFFFFF)
_U32 = 1 << 32


def philox4x32(
    counter: np.ndarray | Sequence[int], key: np.ndarray | Sequence[int], rounds: int = 10
) -> np.ndarray:
    """Philox4x32 (10 rounds by default) in NumPy: counter [..., 4], key [..., 2] (uint32, broadcast) -> [..., 4].

    The reference the C++/CUDA Philox is checked against; vectorised over the leading dimensions.
    """
    c = np.asarray(counter, dtype=np.uint32)
    k = np.asarray(key, dtype=np.uint32)
    if c.shape[-1:] != (4,) or k.shape[-1:] != (2,):
        raise InvalidArgumentError(f"counter must be [..., 4] and key [..., 2], got {c.shape} and {k.shape}")
    c0, c1, c2, c3 = (c[..., i].astype(np.uint64) for i in range(4))
    k0, k1 = k[..., 0].copy(), k[..., 1].copy()
    with np.errstate(over="ignore"):  # uint32 key increments wrap mod 2^32 by design
        for r in range(rounds):
            if r > 0:
                k0 = k0 + _W0
                k1 = k1 + _W1
            p0, p1 = _M0 * c0, _M1 * c2  # exact: 32 x 32 -> 64 bits
            c0, c1, c2, c3 = (
                (p1 >> np.uint64(32)) ^ c1 ^ k0.astype(np.uint64),
                p1 & _LOW32,
                (p0 >> np.uint64(32)) ^ c3 ^ k1.astype(np.uint64),
                p0 & _LOW32,
            )
    return np.stack(np.broadcast_arrays(c0, c1, c2, c3), axis=-1).astype(np.uint32)


def check_seed(seed: int) -> int:
    """A seed is an integer in [0, 2^64): its two 32-bit halves are the Philox key."""
    try:
        s = operator.index(seed)
    except TypeError:
        raise InvalidArgumentError(f"seed must be an integer in [0, 2^64), got {seed!r}") from None
    if not 0 <= s < 1 << 64:
        raise InvalidArgumentError(f"seed must be an integer in [0, 2^64), got {s}")
    return s


def _check_u32(value: int, name: str, upper: int = _U32) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        raise InvalidArgumentError(f"{name} must be an integer in [0, {upper}), got {value!r}") from None
    if not 0 <= v < upper:
        raise InvalidArgumentError(f"{name} must be an integer in [0, {upper}), got {v}")
    return v


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise InvalidArgumentError(
            f"shape must be a sequence of integers (N, *sample_shape), got {shape!r}"
        ) from None
    if len(shape) < 1 or any(s < 0 for s in shape):
        raise InvalidArgumentError(f"shape must be (N, *sample_shape) with sizes >= 0, got {shape}")
    return shape


def check_counter_args(n: int, *, step: int, stream: int, sample_offset: int) -> tuple[int, int, int]:
    """step, stream, sample_offset as 32-bit counter words; sample_offset + n - 1 must still fit."""
    step = _check_u32(step, "step")
    stream = _check_u32(stream, "stream")
    offset = _check_u32(sample_offset, "sample_offset")
    if offset + n > _U32:
        raise InvalidArgumentError(
            f"sample_offset + N must be <= 2^32 (global sample indices are 32-bit), got {offset} + {n}"
        )
    return step, stream, offset


def normal_reference(
    seed: int, shape: Sequence[int], *, step: int = 0, stream: int = STREAM_STEP, sample_offset: int = 0
) -> np.ndarray:
    """N(0, 1) draws [N, *sample_shape] as float32, computed in NumPy: the oracle for the compiled kernels.

    Box-Muller is evaluated in float64 and rounded once to float32, so each value is the float32 nearest the
    exact formula (to within float64's 1e-16); the kernels' own float32 arithmetic is then what the tests measure.
    """
    seed = check_seed(seed)
    shape = _check_shape(shape)
    n, d = shape[0], math.prod(shape[1:])
    step, stream, offset = check_counter_args(n, step=step, stream=stream, sample_offset=sample_offset)
    groups = (d + 3) // 4
    ctr = np.empty((n, groups, 4), dtype=np.uint32)
    ctr[..., 0] = np.arange(groups, dtype=np.uint32)[None, :]
    ctr[..., 1] = (offset + np.arange(n, dtype=np.uint64)).astype(np.uint32)[:, None]
    ctr[..., 2] = step
    ctr[..., 3] = stream
    w = philox4x32(ctr, np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint32))
    z = box_muller_reference(w)
    return z.reshape(n, 4 * groups)[:, :d].astype(np.float32).reshape(shape)


def _cos_sin_2pi_u(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin)(2 pi u), u = (w + 0.5) 2^-32, accurate relative to the result even near multiples of pi/2.

    Computing 2 pi u in float64 first would not be: near u = 1/2 the result sin(2 pi u) ~ 1e-9 inherits the
    1e-16 absolute rounding of 2 pi u, a 1e-7 relative error. So the quarter turns are taken off exactly in
    integers: 2 pi u = k pi/2 + theta, |theta| <= pi/4, theta = 2 pi (w - k 2^30 + 0.5) 2^-32.
    """
    w = w.astype(np.int64)
    k = ((w + (1 << 29)) >> 30) & 3
    d = w - (k << 30)
    d = np.where(d >= 1 << 31, d - (1 << 32), d)  # w near 2^32 belongs to quarter 0 of the next turn
    theta = (d.astype(np.float64) + 0.5) * (2.0 * np.pi * 2.0**-32)
    ct, st = np.cos(theta), np.sin(theta)
    cos = np.choose(k, [ct, -st, -ct, st])
    sin = np.choose(k, [st, ct, -st, -ct])
    return cos, sin


def box_muller_reference(w: np.ndarray) -> np.ndarray:
    """Philox words [..., 4] (uint32) -> the four normals [..., 4] in float64 (docs/design.md, "Noise")."""
    u = (w.astype(np.float64) + 0.5) * 2.0**-32  # exact: w + 0.5 needs 33 bits
    r_a = np.sqrt(-2.0 * np.log(u[..., 0]))
    r_b = np.sqrt(-2.0 * np.log(u[..., 2]))
    cos_a, sin_a = _cos_sin_2pi_u(w[..., 1])
    cos_b, sin_b = _cos_sin_2pi_u(w[..., 3])
    return np.stack([r_a * cos_a, r_a * sin_a, r_b * cos_b, r_b * sin_b], axis=-1)


def normal(
    seed: int,
    shape: Sequence[int],
    *,
    step: int = 0,
    stream: int = STREAM_STEP,
    sample_offset: int = 0,
    device: torch.device | str = "cpu",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same draws as :func:`normal_reference`, as a float32 tensor [N, *sample_shape] on ``device``.

    CPU tensors use the C++ kernel (ddpm._C), CUDA tensors the CUDA kernel (ddpm._C_cuda); without the compiled
    module the NumPy reference is used (with a one-time warning). ``out``, when given, is filled and returned
    (its device wins over ``device``); it must be a contiguous float32 tensor of ``shape``.
    """
    seed = check_seed(seed)
    shape = _check_shape(shape)
    n, d = shape[0], math.prod(shape[1:])
    step, stream, offset = check_counter_args(n, step=step, stream=stream, sample_offset=sample_offset)
    if out is None:
        try:
            out = torch.empty(shape, dtype=torch.float32, device=device)
        except (RuntimeError, AssertionError, ValueError) as e:  # e.g. "cuda" on a torch without CUDA
            raise InvalidArgumentError(f"cannot create the noise on device {device!r}: {e}") from None
    elif not isinstance(out, torch.Tensor):
        raise InvalidArgumentError(f"out must be a torch.Tensor, got {type(out).__name__}")
    elif out.dtype != torch.float32 or tuple(out.shape) != shape or not out.is_contiguous():
        raise InvalidArgumentError(
            f"out must be a contiguous float32 tensor of shape {shape}, got {out.dtype} {tuple(out.shape)}"
            f"{'' if out.is_contiguous() else ' (not contiguous)'}"
        )
    if out.numel() == 0:
        return out
    dev = out.device
    if dev.type == "cuda":
        ext = extension.cuda_extension()
        if ext is not None:
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            stream_handle = torch.cuda.current_stream(dev).cuda_stream
            ext.normal(out.data_ptr(), n, d, seed, step, stream, offset, index, stream_handle)
            return out
        why = "ddpm._C_cuda is not built or sees no GPU"
    elif dev.type == "cpu":
        ext = extension.cpu_extension()
        if ext is not None:
            ext.normal(out.data_ptr(), n, d, seed, step, stream, offset)
            return out
        why = "ddpm._C is not built"
    else:
        why = f"no kernel for device type {dev.type!r}"
    extension.warn_once(
        f"normal:{dev.type}",
        f"ddpm.noise.normal: {why}; using the (slow) NumPy reference generator. "
        "Reinstall with `pip install -e .` and a C++ compiler (and nvcc for CUDA) to build the kernels.",
    )
    ref = normal_reference(seed, shape, step=step, stream=stream, sample_offset=offset)
    out.copy_(torch.from_numpy(ref))
    return out


def initial_noise(
    seed: int, shape: Sequence[int], *, sample_offset: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """x_T ~ N(0, I) [N, *sample_shape] for global samples sample_offset .. sample_offset + N - 1 (stream 1)."""
    return normal(seed, shape, step=0, stream=STREAM_INITIAL, sample_offset=sample_offset, device=device)
