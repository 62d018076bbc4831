"""`ddpm schedule`: print (and plot) a noise schedule."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ddpm.errors import InvalidArgumentError
from ddpm.io import check_writable
from ddpm.schedule import Schedule
from ddpm.validate import MAX_TIMESTEPS

from .schedule_report import plot_schedule, schedule_table


def register(app: typer.Typer) -> None:
    @app.command("schedule")
    def schedule_cmd(
        kind: Annotated[str, typer.Option(help="linear | cosine")] = "linear",
        timesteps: Annotated[int, typer.Option(help="T, the number of diffusion steps")] = 1000,
        steps: Annotated[
            int | None, typer.Option(help="respace to N steps (improved-diffusion semantics)")
        ] = None,
        rows: Annotated[int, typer.Option(help="rows of the printed table")] = 11,
        plot: Annotated[
            Path | None, typer.Option(help="draw sqrt(alphabar) and sqrt(1-alphabar) against t")
        ] = None,
    ) -> None:
        """Print a schedule's table (t, beta, alphabar, SNR) and optionally plot it."""
        # Checked before anything is computed: every schedule array is O(T).
        if not 1 <= timesteps <= MAX_TIMESTEPS:
            raise InvalidArgumentError(
                f"--timesteps: timesteps T must be an integer >= 1 and <= {MAX_TIMESTEPS}, got {timesteps}"
            )
        if rows < 2:
            raise InvalidArgumentError(f"--rows must be >= 2, got {rows}")
        if plot is not None and plot.suffix.lower() != ".png":
            raise InvalidArgumentError(
                f"--plot {str(plot)!r} must be a .png file (the plot is written as PNG)"
            )
        sched = Schedule.create(kind, timesteps)
        if steps is not None:
            sched = sched.respace(steps)
        if plot is not None:
            check_writable(plot, what="--plot")
        typer.echo(schedule_table(sched, rows=rows))
        if plot is not None:
            plot_schedule(sched, plot)
            typer.echo(f"wrote {plot}")
