"""ddpm._C: the CPU kernels (C++17, OpenMP, SIMD) - the fused reverse step and Philox4x32-10 normals.

Buffers cross as data pointers (``tensor.data_ptr()``) and sizes; ddpm.kernels / ddpm.noise check the tensors, this
module checks every number it is handed and raises ValueError naming it.
"""

from collections.abc import Sequence
from typing import Any, SupportsFloat, SupportsIndex

class StepTable:
    """A [rows, 6] (a, b, c, p, q, sigma) or [rows, 8] (plus lv0, lv1: learned-range variance) float32 coefficient
    table, copied in and checked, plus a step counter."""

    def __init__(self, table: int, rows: int, cols: int = 6) -> None:
        """Copy ``rows`` rows of ``cols`` (6 or 8) from the float32 buffer at ``table``; every entry must be
        finite; counter = rows - 1."""
    @property
    def rows(self) -> int:
        """Number of rows (sampling steps)."""
    @property
    def cols(self) -> int:
        """Columns per row: 6, or 8 with a learned-range variance."""
    @property
    def counter(self) -> int:
        """The row (and step index) a counter-driven call reads next."""
    def set_counter(self, i: int) -> None:
        """Set the counter to i in 0..rows-1."""

class BoundStep:
    """fused_step's arguments, checked once and kept; each call runs the step again (step=None: the next row)."""

    def __init__(
        self,
        x: int,
        m: int,
        out: int,
        n: int,
        d: int,
        coeffs: Sequence[SupportsFloat] | StepTable,
        clip: float,
        seed: SupportsIndex,
        step: SupportsIndex | None,
        sample_offset: SupportsIndex,
        history: int = 0,
        *,
        returns: Any = None,
        keep_alive: Any = None,
        m_stride: int = 0,
        variance: int = 0,
        variance_stride: int = 0,
        uncond: int = 0,
        uncond_stride: int = 0,
        guidance: float = 1.0,
        thresholds: int = 0,
    ) -> None:
        """Check as fused_step does; hold ``keep_alive`` (the tensors behind the pointers) and the table. The
        thresholds buffer is read at every call (its owner refreshes it before)."""
    def __call__(self) -> Any:
        """Run the step; returns ``returns``."""

def fused_step(
    x: int,
    m: int,
    out: int,
    n: int,
    d: int,
    coeffs: Sequence[SupportsFloat] | StepTable,
    clip: float,
    seed: SupportsIndex,
    step: SupportsIndex | None,
    sample_offset: SupportsIndex,
    history: int = 0,
    /,
    *,
    m_stride: int = 0,
    variance: int = 0,
    variance_stride: int = 0,
    uncond: int = 0,
    uncond_stride: int = 0,
    guidance: float = 1.0,
    thresholds: int = 0,
) -> None:
    """out = a x + b x0 + c h + sigma z, x0 = clip(p x + q m, -clip, clip), on [n, d] float32 buffers; z = the Philox
    normals of (seed, step, stream 0) for global samples sample_offset + row. coeffs: the row by value (6 floats, or
    8 with lv0, lv1) with Philox step index ``step``; or a StepTable: row ``step``, or with step=None the counter's
    row, then counter -= 1. history: 0 or an [n, d] buffer h (c h added, never read when c == 0; then h <- x0).
    out may be x or m (m contiguous). Optional operands (addresses, 0 = absent; strides in elements between
    samples, 0 = d, else >= d): uncond u: m -> u + guidance (m - u); thresholds [n]: x0 = clamp(p x + q m, -s, s) / s
    (clip must be +inf); variance v (needs an 8-wide row): sigma -> exp(lv0 + lv1 v) where sigma != 0."""

def dynamic_thresholds(
    x: int,
    m: int,
    out: int,
    n: int,
    d: int,
    p: float,
    q: float,
    ratio: float,
    max_value: float,
    *,
    m_stride: int = 0,
    uncond: int = 0,
    uncond_stride: int = 0,
    guidance: float = 1.0,
) -> None:
    """out[k] = clamp(quantile(|p x_k + q m_k|, ratio), 1, max_value) for each sample k (torch.quantile's linear
    interpolation; m guided as u + guidance (m - u) when uncond is given); out is an [n] float32 buffer. A sample
    holding a NaN gets NaN."""

def normal(out: int, n: int, d: int, seed: int, step: int, stream: int, sample_offset: int) -> None:
    """Fill the [n, d] float32 buffer at ``out`` with the N(0, 1) draws of (seed, step, stream)."""

def philox4x32_10(counter: Sequence[int], key: Sequence[int]) -> list[int]:
    """One Philox4x32-10 block: 4 uint32 counter words, 2 key words -> 4 uint32 words."""

def philox_words(c0: int, count: int, sample: int, step: int, stream: int, seed: int) -> list[int]:
    """Test hook: the Philox words [count * 4] of counters (c0 + i, sample, step, stream), by the SIMD variant in use."""

def box_muller(words: int, out: int, groups: int) -> None:
    """Test hook: the normals of given Philox words ([groups, 4] uint32 -> [groups, 4] float32 buffers)."""

def parallel_threshold() -> int:
    """Elements (noise-weighted) below which a call runs on one thread."""

def set_parallel_threshold(elements: int) -> None:
    """Set the single-thread threshold (>= 1)."""

def simd_target() -> str:
    """The instruction set the kernels dispatch to: "avx512", "avx2" or "baseline"."""

def simd_targets() -> list[str]:
    """The instruction sets this CPU can run."""

def set_simd_target(name: str) -> None:
    """Force a kernel variant (tests run each); "" restores the automatic choice."""

def build_info() -> dict[str, Any]:
    """How this module was built: compiler, OpenMP on/off, OpenMP thread count, SIMD variant in use."""
