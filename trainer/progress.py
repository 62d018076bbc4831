"""A rich progress bar for training: step / total, loss, it/s, ETA (on stderr, so stdout stays clean)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["TrainProgress"]


class TrainProgress:
    """Context manager: prints ``description`` once, then a bar; ``update(step, loss)`` moves it to ``step``.
    Does nothing when disabled."""

    def __init__(self, description: str, *, total: int, start: int = 0, enabled: bool = True) -> None:
        self.enabled = enabled
        if not enabled:
            return
        self._console = Console(stderr=True)
        self._header = description
        # Short columns: the bar must fit an 80-column log (CI, pipes), where rich cannot ask the terminal.
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
            self._console.print(self._header, highlight=False)
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._progress.stop()

    def update(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        self._progress.update(self._task, completed=step, loss=f"{loss:.4f}")
        speed = self._progress.tasks[0].speed  # rich's moving-window estimate of steps per second
        if speed:
            self._progress.update(self._task, rate=f"{speed:.1f}")
