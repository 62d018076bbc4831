"""Checks every backend applies to its inputs, so a wrong call fails with a message, not deep in a runtime."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ddpm.errors import InvalidArgumentError


def check_call(x: torch.Tensor, t: torch.Tensor, sample_shape: Sequence[int], device: torch.device) -> None:
    """x [N, *sample_shape] float32 contiguous and t [N] int64, both on ``device``."""
    if tuple(x.shape[1:]) != tuple(sample_shape) or x.dim() < 2:
        raise InvalidArgumentError(
            f"x must have shape [N, {', '.join(map(str, sample_shape))}], got {list(x.shape)}"
        )
    if x.dtype != torch.float32:
        raise InvalidArgumentError(f"x must be float32, got {x.dtype}")
    if t.dim() != 1 or t.shape[0] != x.shape[0] or t.dtype != torch.int64:
        raise InvalidArgumentError(f"t must be int64 of shape [{x.shape[0]}], got {t.dtype} {list(t.shape)}")
    if not (same_device(x.device, device) and same_device(t.device, device)):
        raise InvalidArgumentError(
            f"x and t must be on the backend's device {device}, got {x.device} and {t.device}"
        )


def same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:0 are the same device when 0 is the current one."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    cur = torch.cuda.current_device()
    return (a.index if a.index is not None else cur) == (b.index if b.index is not None else cur)
