"""``ddpm merge``: join the shard npz files of ``ddpm run --shard K/N`` into the one npz a single run writes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["register", "merge_command"]


def merge_command(shards: list[Path], npz: Path) -> None:
    """The body of ``ddpm merge``: check the shards against each other, concatenate them in shard order."""
    from .shard import merge_shards  # numpy at import: kept out of `ddpm --help`

    rec = merge_shards(shards, npz)
    n = rec["shard"][1]
    typer.echo(f"wrote {npz}: {rec['num_samples']} samples from {n} shard{'s' if n > 1 else ''}")


def register(app: typer.Typer) -> None:
    """Add ``ddpm merge`` to the CLI."""

    @app.command("merge")
    def merge_cmd(
        shards: Annotated[
            list[Path], typer.Argument(help="shard npz files (any order), from ddpm run --shard")
        ],
        npz: Annotated[
            Path, typer.Option(help="the merged npz (arr_0 as a single ddpm run --npz writes it)")
        ],
    ) -> None:
        """Merge shards K/N of one run; refuses gaps, overlaps, and shards of other engines or settings."""
        merge_command(shards, npz)
