"""Timing done right: warm-up excluded, the device synchronised before the clock is read, repeats summarised
by median and p90, and results consumed so no work is timed that never ran."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Timing", "time_fn", "sync", "peak_memory_reset", "peak_memory_bytes"]


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``repeats`` timed calls (after ``warmup`` untimed ones)."""

    median: float
    p90: float
    mean: float
    repeats: int

    def as_dict(self) -> dict:
        return {"median_s": self.median, "p90_s": self.p90, "mean_s": self.mean, "repeats": self.repeats}


def sync(device: torch.device | str) -> None:
    """Wait for queued device work (a CPU-GPU sync point: only outside the timed region's inner loop)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return s[k]


def time_fn(
    fn: Callable[[int], object],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 3,
    repeats: int = 20,
    min_time: float = 0.0,
    max_time: float = 30.0,
) -> Timing:
    """Time ``fn(k)`` (k = call counter, for rotating inputs) per call.

    Each timed call is bracketed by device synchronisation. Repeats continue until both ``repeats`` calls and
    ``min_time`` seconds are reached, but stop after ``max_time`` seconds (at least 3 calls). The last result must be
    a finite tensor (or None): a NaN would mean the work was garbage, not fast.
    """
    out = None
    for k in range(warmup):
        out = fn(k)
    sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    k = warmup
    while True:
        t0 = time.perf_counter()
        out = fn(k)
        sync(device)
        times.append(time.perf_counter() - t0)
        k += 1
        elapsed = time.perf_counter() - start_all
        if len(times) >= 3 and elapsed > max_time:
            break
        if len(times) >= repeats and elapsed >= min_time:
            break
    if isinstance(out, torch.Tensor) and not bool(torch.isfinite(out).all()):
        raise RuntimeError("timed function produced non-finite output; refusing to report its time")
    return Timing(statistics.median(times), _percentile(times, 0.9), statistics.fmean(times), len(times))


def peak_memory_reset(device: torch.device | str) -> None:
    """Reset the peak-memory counter: CUDA allocator stats on GPU, the kernel's VmHWM on Linux CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident set size (VmHWM) of this process
    except OSError:
        pass


def peak_memory_bytes(device: torch.device | str) -> int | None:
    """Peak device memory (GPU) or peak RSS (CPU, Linux) since the last reset; None where unknown."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
