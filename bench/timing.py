"""Timing done right: warm-up excluded, the device synchronised before the clock is read, repeats summarised
by median, p10 and p90, results consumed so no work is timed that never ran, and the CPU this process got while
it was timed recorded beside the times (a busy machine makes fast code look slow: bench/trust.py)."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ddpm.errors import SamplingError

__all__ = ["Timing", "CpuUse", "CpuMeter", "time_fn", "sync", "peak_memory_reset", "peak_memory_bytes"]


@dataclass(frozen=True)
class CpuUse:
    """What this process got from the CPU over ``wall_s`` seconds.

    cpu_s: process CPU time (every thread). run_s / wait_s: summed over this process's threads, the time each
    spent on a CPU and the time it was runnable but waiting for one (the kernel's per-thread scheduler
    statistics, /proc/self/task/*/schedstat; None where the kernel does not keep them).
    """

    wall_s: float
    cpu_s: float
    run_s: float | None = None
    wait_s: float | None = None

    @property
    def share(self) -> float | None:
        """Of the CPU time this process's threads asked for (running or runnable), the fraction they got.

        Judged per thread by the scheduler, so a stage that keeps one thread busy and one that keeps all of them
        busy both read ~1 when served and drop under a CPU hog; CPU time / (wall x threads) would read 0.5 for a
        single-threaded stage on a quiet 2-core machine. Without scheduler statistics: CPU time per wall second,
        capped at 1 (the calling thread works through every timed call), which understates contention for
        multi-threaded stages but still drops under a hog.
        """
        if self.run_s is not None and self.wait_s is not None and self.run_s + self.wait_s > 0:
            return self.run_s / (self.run_s + self.wait_s)
        return min(1.0, self.cpu_s / self.wall_s) if self.wall_s > 0 else None


def _schedstat() -> dict[str, tuple[int, int]] | None:
    """{thread id: (ns on a CPU, ns runnable but waiting)} of this process, or None where unavailable."""
    out: dict[str, tuple[int, int]] = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                run, wait = f.read().split()[:2]
        except (OSError, ValueError):
            continue  # the thread ended meanwhile, or the kernel has no schedstat
        out[tid] = (int(run), int(wait))
    return out or None


class CpuMeter:
    """Started at construction; ``read()`` gives the CpuUse since then (threads started meanwhile count from 0,
    threads ended meanwhile are lost: the bench's pools live as long as their backends)."""

    def __init__(self) -> None:
        self._sched = _schedstat()
        self._cpu = time.process_time()
        self._wall = time.perf_counter()

    def read(self) -> CpuUse:
        wall, cpu, sched = time.perf_counter() - self._wall, time.process_time() - self._cpu, _schedstat()
        if self._sched is None or sched is None:
            return CpuUse(wall, cpu)
        run = sum(r - self._sched.get(tid, (0, 0))[0] for tid, (r, _) in sched.items())
        wait = sum(w - self._sched.get(tid, (0, 0))[1] for tid, (_, w) in sched.items())
        return CpuUse(wall, cpu, max(0, run) / 1e9, max(0, wait) / 1e9)


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``repeats`` timed calls (after ``warmup`` untimed ones), and the CPU this process
    got over the timed calls."""

    median: float
    p90: float
    mean: float
    repeats: int
    p10: float | None = None
    cpu: CpuUse | None = None

    def scaled(self, factor: float) -> Timing:
        """Times x factor (a loop timed over k of its steps, scaled to all of them); the CPU figures stay."""
        p10 = None if self.p10 is None else self.p10 * factor
        return replace(
            self, median=self.median * factor, p90=self.p90 * factor, mean=self.mean * factor, p10=p10
        )

    def as_dict(self) -> dict:
        d = {
            "median_s": self.median,
            "p10_s": self.median if self.p10 is None else self.p10,
            "p90_s": self.p90,
            "mean_s": self.mean,
            "repeats": self.repeats,
        }
        if self.cpu is not None:
            d["cpu"] = {
                "share": self.cpu.share,
                "cpu_s": self.cpu.cpu_s,
                "wall_s": self.cpu.wall_s,
                "cpu_per_wall": self.cpu.cpu_s / self.cpu.wall_s if self.cpu.wall_s > 0 else None,
                "run_s": self.cpu.run_s,
                "wait_s": self.cpu.wait_s,
            }
        return d


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
    what: str = "the timed function",
) -> Timing:
    """Time ``fn(k)`` (k = call counter, for rotating inputs) per call.

    Each timed call is bracketed by device synchronisation. Repeats continue until both ``repeats`` calls and
    ``min_time`` seconds are reached, but stop after ``max_time`` seconds (at least 3 calls). The last result must be
    a finite tensor (or None): a NaN would mean the work was garbage, not fast (SamplingError naming ``what``).
    """
    out = None
    for k in range(warmup):
        out = fn(k)
    sync(device)
    times: list[float] = []
    meter = CpuMeter()
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
    cpu = meter.read()
    if isinstance(out, torch.Tensor) and not bool(torch.isfinite(out).all()):
        raise SamplingError(
            f"{what} produced NaN/Inf, so its time means nothing; the model or its export is broken"
        )
    median, mean = statistics.median(times), statistics.fmean(times)
    return Timing(median, _percentile(times, 0.9), mean, len(times), _percentile(times, 0.1), cpu)


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
