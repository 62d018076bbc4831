"""ddpm._C_cuda: the CUDA kernels - the fused reverse step (also from a device coefficient table) and Philox normals.

Buffers, the device index and the cudaStream_t cross as plain integers; ddpm.kernels checks the tensors, this
module checks every number it is handed and raises ValueError naming it. Launches are asynchronous and checked.
"""

from collections.abc import Sequence
from typing import SupportsFloat, SupportsIndex

class DeviceTable:
    """A [rows, 6] or [rows, 8] float32 coefficient table + an int32 step counter in device memory (buffers the
    caller keeps)."""

    def __init__(
        self, host_table: int, rows: int, table: int, counter: int, device: int, cols: int = 6
    ) -> None:
        """Check the host rows (finite), upload them to ``table`` and set ``*counter = rows - 1`` (synchronous)."""
    @property
    def rows(self) -> int:
        """Number of rows (sampling steps)."""
    @property
    def cols(self) -> int:
        """Columns per row: 6, or 8 with a learned-range variance."""

def fused_step(
    x: int,
    m: int,
    out: int,
    n: int,
    d: int,
    coeffs: Sequence[SupportsFloat] | DeviceTable,
    clip: float,
    seed: SupportsIndex,
    step: SupportsIndex | None,
    sample_offset: SupportsIndex,
    history: int,
    device: int,
    stream: int,
    *,
    m_stride: int = 0,
    variance: int = 0,
    variance_stride: int = 0,
    uncond: int = 0,
    uncond_stride: int = 0,
    guidance: float = 1.0,
    thresholds: int = 0,
) -> None:
    """As ddpm._C.fused_step on device buffers, launched on ``stream``. coeffs: the row by value with Philox step
    index ``step``; or a DeviceTable with step=None: row i = *counter, step index i, then *counter -= 1 on the
    device, so one captured CUDA graph replays every step (a counter outside the table writes NaN). The optional
    operands as in ddpm._C.fused_step (thresholds come from torch ops on CUDA: ddpm.step_tables.dynamic_thresholds)."""

def normal(
    out: int,
    n: int,
    d: int,
    seed: int,
    step: int,
    stream_id: int,
    sample_offset: int,
    device: int,
    stream: int,
) -> None:
    """Fill the [n, d] float32 device buffer with the N(0, 1) draws of (seed, step, stream_id)."""

def device_count() -> int:
    """Visible CUDA devices (0 without a driver)."""

def device_properties(device: int) -> dict[str, str]:
    """{"name", "compute_capability"} of a device."""

def build_info() -> dict[str, str]:
    """{"cuda_compiler"}: how this module was built."""
