"""TensorBoard scalars and sample grids for ``ddpm train --log-dir DIR`` (needs the ``tensorboard`` package).

Logged: ``train/loss`` (every step, the global-batch loss), ``train/lr``, ``train/grad_norm`` (before clipping)
and ``samples`` (the preview grid at every save, images in [0, 1]). Only rank 0 writes under torchrun.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ddpm.errors import MissingDependencyError

__all__ = ["TensorBoardLog", "require_tensorboard"]


def require_tensorboard() -> None:
    """Fail before any work when --log-dir is given and tensorboard cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (the import is the check)
    except ImportError as e:
        raise MissingDependencyError(
            f"--log-dir writes TensorBoard event files and needs the tensorboard package ({e}); "
            "install it: pip install tensorboard"
        ) from None


class TensorBoardLog:
    """A SummaryWriter when ``log_dir`` is set, else nothing; every method is a no-op when off."""

    def __init__(self, log_dir: str | os.PathLike | None) -> None:
        self.writer = None
        if log_dir is None:
            return
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, first_step: int, **series: list[float]) -> None:
        """``series[name][j]`` is the value at step ``first_step + j``."""
        if self.writer is None:
            return
        for name, values in series.items():
            for j, v in enumerate(values):
                self.writer.add_scalar(f"train/{name}", v, first_step + j)

    def images(self, step: int, x: torch.Tensor, nrow: int | None = None) -> None:
        """A preview batch [N, C, H, W] in [-1, 1] as one grid of ``nrow`` columns (default about square; a
        conditional preview's: one row per class). Vectors are skipped: they are a scatter."""
        if self.writer is None or x.dim() != 4:
            return
        n = x.shape[0]
        cols = nrow or max(1, int(n**0.5))
        rows = -(-n // cols)
        pad = torch.full((rows * cols - n, *x.shape[1:]), -1.0)
        grid = torch.cat([x.detach().float().cpu().clamp(-1, 1), pad]).add(1).div(2)
        c, h, w = grid.shape[1:]
        grid = grid.view(rows, cols, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)
        self.writer.add_image("samples", grid, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
