"""``ddpm.noise``: the counter-based Philox4x32-10 + Box-Muller noise (re-exported from ddpm.runtime.noise)."""

from __future__ import annotations

from ddpm.runtime.noise import (
    STREAM_INITIAL,
    STREAM_STEP,
    box_muller_reference,
    check_seed,
    initial_noise,
    normal,
    normal_reference,
    philox4x32,
)

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
