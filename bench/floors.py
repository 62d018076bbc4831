"""Floors that measurements are compared against: memory bandwidth for the update, matmul rate for the model.

The fused update reads x and the model output and writes x_prev: 12 bytes per float32 element, so its floor is
12 * numel / (measured copy bandwidth). A network's floor is its FLOPs / (measured dense matmul rate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .timing import time_fn

__all__ = [
    "DeviceRates",
    "measure_rates",
    "measure_copy_bandwidth",
    "count_flops",
    "UPDATE_BYTES_PER_ELEMENT",
]

UPDATE_BYTES_PER_ELEMENT = 12


@dataclass(frozen=True)
class DeviceRates:
    copy_bandwidth: float  # bytes/s, counting the read and the write of a large tensor copy
    matmul_flops: float  # FLOP/s of a dense float32 matmul

    def update_floor(self, numel: int) -> float:
        """Seconds a bandwidth-bound x_prev = f(x, m) cannot beat."""
        return UPDATE_BYTES_PER_ELEMENT * numel / self.copy_bandwidth

    def model_floor(self, flops: float) -> float:
        return flops / self.matmul_flops


def measure_copy_bandwidth(device: torch.device | str = "cpu", mib: int | None = None) -> float:
    """Bytes/s of a tensor copy much larger than the last-level cache, counting the read and the write."""
    dev = torch.device(device)
    n = (mib or (1024 if dev.type == "cuda" else 256)) * 1024 * 1024 // 4
    bufs = [torch.ones(n, device=dev), torch.empty(n, device=dev)]
    t = time_fn(lambda _k: bufs[1].copy_(bufs[0]), device=dev, warmup=2, repeats=7)
    return 2 * n * 4 / t.median


def measure_rates(
    device: torch.device | str = "cpu", *, copy_mib: int | None = None, mm_n: int | None = None
) -> DeviceRates:
    """Measure copy bandwidth (tensor much larger than the last-level cache) and float32 matmul throughput."""
    dev = torch.device(device)
    gpu = dev.type == "cuda"
    bandwidth = measure_copy_bandwidth(dev, copy_mib)
    mm_n = mm_n or (8192 if gpu else 1024)
    a = torch.randn(mm_n, mm_n, device=dev)
    b = torch.randn(mm_n, mm_n, device=dev)
    c = torch.empty(mm_n, mm_n, device=dev)
    t = time_fn(lambda _k: torch.mm(a, b, out=c), device=dev, warmup=2, repeats=7)
    return DeviceRates(copy_bandwidth=bandwidth, matmul_flops=2 * mm_n**3 / t.median)


def count_flops(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> int:
    """FLOPs of one forward pass (matmul, conv, attention), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t)
    return int(counter.get_total_flops())
