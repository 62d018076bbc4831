"""Where ``ddpm run``'s finished batches go: streamed into the npz, the first few kept for the PNG.

Memory is bounded by one batch plus the PNG preview, never by ``--num-samples``:
- the npz is written batch by batch (``ddpm.io.npz_stream``): uint8 [M, H, W, C] images or float32 [M, D];
- the PNG keeps the first ``min(256, 2^26 / values per sample)`` images, or that many values' worth of points
  (256 MB float32 at most; a 64-image grid of 8x8 digits keeps all 64).
The free disk space is checked against the npz's size before the first batch.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm.images import to_uint8_nhwc
from ddpm.io import check_free_space, npz_stream

__all__ = ["SampleSink", "PNG_MAX_IMAGES", "PNG_MAX_VALUES", "class_extras"]

PNG_MAX_IMAGES = 256  # a grid of more is unreadable anyway
PNG_MAX_VALUES = 1 << 26  # float32 values kept for the picture: 256 MB


def class_extras(plan: Any, first: int, n: int) -> dict[str, np.ndarray] | None:
    """The npz's ``classes`` array (int64 [n]: the class each of samples first .. first + n - 1 was drawn for, what
    ``ddpm eval --per-class`` reads), for a class-conditional plan; None otherwise."""
    rows = plan.class_rows(first, n)
    return None if rows is None else {"classes": rows.numpy()}


class SampleSink:
    """``sink(offset, x)`` takes batch x [n, *shape] (CPU float32); ``open`` runs once the shape is known."""

    def __init__(self, stack: contextlib.ExitStack, npz: Path | None, num_samples: int, png: bool) -> None:
        self.stack, self.npz, self.num_samples, self.png = stack, npz, num_samples, png
        self.kept: list[torch.Tensor] = []
        self.keep = 0
        self.stream: Any = None

    def open(
        self, sample_shape: tuple[int, ...], precision: str = "fp32", extras: dict[str, Any] | None = None
    ) -> None:
        """Check the disk and start the npz (inside the caller's ExitStack: an error removes the temp file).
        ``extras``: small arrays stored beside arr_0 (a shard's ``shard_meta`` record)."""
        values = math.prod(sample_shape)
        image = len(sample_shape) == 3
        if self.png:
            self.keep = min(self.num_samples, max(1, PNG_MAX_VALUES // values))
            self.keep = min(self.keep, PNG_MAX_IMAGES) if image else self.keep
        if self.npz is None:
            return
        if image:
            c, h, w = sample_shape
            shape, dtype = (self.num_samples, h, w, c), np.uint8
        else:
            shape, dtype = (self.num_samples, *sample_shape), np.float32
        check_free_space(self.npz, math.prod(shape) * np.dtype(dtype).itemsize + (1 << 16), what="--npz")
        # a reduced network precision is recorded beside arr_0 (readers of arr_0 are unaffected)
        extras = {**({"precision": np.array(precision)} if precision != "fp32" else {}), **(extras or {})}
        self.stream = self.stack.enter_context(
            npz_stream(self.npz, shape, dtype, what="--npz", extras=extras)
        )

    def __call__(self, offset: int, x: torch.Tensor) -> None:
        if offset < self.keep:
            self.kept.append(x[: self.keep - offset].clone())
        if self.stream is not None:
            arr = to_uint8_nhwc(x) if x.dim() == 4 else x.detach().float().numpy()
            self.stream.write(np.ascontiguousarray(arr))

    def preview(self) -> torch.Tensor:
        """The samples kept for the PNG: the first ``keep`` of the run."""
        return torch.cat(self.kept) if self.kept else torch.empty(0)
