"""Training progress on stderr (stdout stays clean): a rich bar on a terminal; plain log lines at a steady
interval otherwise (nohup, CI, pipes), where a bar would print nothing for the whole run.

Each plain line carries the step, the loss, the speed over the last interval and the ETA, e.g.
``step 120/300 (40%)  loss 0.0841  3.95 it/s  elapsed 0m31s  ETA 0m46s``. The interval is 10 s
(``DDPM_PROGRESS_INTERVAL`` seconds overrides it); the training loop reports at least every 2 s.
"""

from __future__ import annotations

import os
import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["TrainProgress", "progress_interval", "hms"]

DEFAULT_INTERVAL = 10.0


def progress_interval() -> float:
    """Seconds between plain progress lines: ``DDPM_PROGRESS_INTERVAL`` if set (> 0), else 10."""
    raw = os.environ.get("DDPM_PROGRESS_INTERVAL", "")
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_INTERVAL
    return value if value > 0 else DEFAULT_INTERVAL


def hms(seconds: float) -> str:
    """2m05s under an hour, 1:02:05 above (progress lines and the run's estimate)."""
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class TrainProgress:
    """Context manager: prints ``description`` once, then a bar (terminal) or plain lines (otherwise);
    ``update(step, loss)`` moves it to ``step``; ``log(text)`` prints a line without breaking the bar.
    Does nothing when disabled. ``terminal`` None asks stderr."""

    def __init__(
        self,
        description: str,
        *,
        total: int,
        start: int = 0,
        enabled: bool = True,
        terminal: bool | None = None,
        interval: float | None = None,
    ) -> None:
        self.enabled = enabled
        if not enabled:
            return
        self._console = Console(stderr=True, highlight=False)
        self._header = description
        self.total, self.start = total, start
        self.plain = not (self._console.is_terminal if terminal is None else terminal)
        self.interval = progress_interval() if interval is None else interval
        self._t0 = self._last_t = time.monotonic()
        self._last_step = start
        if self.plain:
            return
        # Short columns: the bar must fit an 80-column terminal.
        self._progress = Progress(
            TextColumn("train"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} it/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self._console,
        )
        self._task = self._progress.add_task("train", total=total, completed=start, loss="-", rate="-")

    def __enter__(self) -> TrainProgress:
        if self.enabled:
            self.log(self._header)
            self._t0 = self._last_t = time.monotonic()
            if not self.plain:
                self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled and not self.plain:
            self._progress.stop()

    def log(self, text: str) -> None:
        if not self.enabled:
            return
        if self.plain:
            print(text, file=sys.stderr, flush=True)
        else:
            self._console.print(text, highlight=False, markup=False)

    def update(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        if not self.plain:
            self._progress.update(self._task, completed=step, loss=f"{loss:.4f}")
            speed = self._progress.tasks[0].speed  # rich's moving-window estimate of steps per second
            if speed:
                self._progress.update(self._task, rate=f"{speed:.1f}")
            return
        now = time.monotonic()
        if now - self._last_t < self.interval and step < self.total:
            return
        rate = (step - self._last_step) / max(now - self._last_t, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        self.log(
            f"step {step}/{self.total} ({100 * step // max(self.total, 1)}%)  loss {loss:.4f}  {rate:.3g} it/s  "
            f"elapsed {hms(now - self._t0)}  ETA {hms(eta) if eta != float('inf') else '?'}"
        )
        self._last_t, self._last_step = now, step
