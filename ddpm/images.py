"""Pictures of samples: uint8 NHWC conversion, image grids and 2-D scatter plots, written atomically.

Used by the trainer (sample grids during training) and by ``ddpm run`` (the final samples).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InvalidArgumentError
from .io import atomic_path

__all__ = ["to_uint8_nhwc", "make_grid", "save_samples_png"]

# Tiles smaller than this are enlarged (nearest neighbour) so an 8x8 digit is visible in the PNG.
_MIN_TILE = 32


def _as_numpy(x: Any) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.detach().to("cpu", torch.float32).numpy()
    except ImportError:  # pragma: no cover - torch is a dependency; numpy input works without it
        pass
    return np.asarray(x, dtype=np.float32)


def to_uint8_nhwc(x: Any) -> np.ndarray:
    """Images in [-1, 1], [N, C, H, W] (Tensor or array) -> uint8 [N, H, W, C] (values clipped first).

    Maps -1 -> 0 and 1 -> 255 with round-half-to-even: u = round((clip(x, -1, 1) + 1) * 127.5).
    """
    a = _as_numpy(x)
    if a.ndim != 4:
        raise InvalidArgumentError(f"images must be [N, C, H, W], got shape {tuple(a.shape)}")
    if not np.all(np.isfinite(a)):
        raise InvalidArgumentError("images contain NaN or Inf values")
    u = np.rint((np.clip(a, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return np.ascontiguousarray(u.transpose(0, 2, 3, 1))


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [rows*(H+pad)+pad, nrow*(W+pad)+pad, C] picture, row-major tiles
    on a mid-grey background; ``nrow`` = tiles per row (default ceil(sqrt(N)))."""
    n, h, w, c = images.shape
    if nrow is None:
        nrow = max(1, math.ceil(math.sqrt(n)))
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise InvalidArgumentError(f"nrow must be a positive integer, got {nrow!r}")
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), 128, dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, ncol)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y : y + h, x : x + w] = images[k]
    return grid


def save_samples_png(
    x: Any, path: str | os.PathLike, *, nrow: int | None = None, title: str | None = None
) -> Path:
    """Write samples as a PNG, atomically.

    x: images [N, C, H, W] in [-1, 1] with C = 1 or 3 -> a grid (``nrow`` tiles per row); or 2-D points
    [N, 2] -> a scatter plot. Returns the path written.
    """
    a = _as_numpy(x)
    if a.ndim == 2 and a.shape[1] == 2:
        return _save_scatter(a, Path(path), title)
    if a.ndim != 4 or a.shape[1] not in (1, 3):
        raise InvalidArgumentError(
            f"samples must be images [N, C, H, W] with C = 1 or 3, or 2-D points [N, 2]; got shape {tuple(a.shape)}"
        )
    if a.shape[0] == 0:
        raise InvalidArgumentError("no samples to draw (N = 0)")
    u = to_uint8_nhwc(a)
    scale = max(1, math.ceil(_MIN_TILE / max(u.shape[1], u.shape[2])))
    if scale > 1:
        u = u.repeat(scale, axis=1).repeat(scale, axis=2)
    grid = make_grid(u, nrow)
    from PIL import Image

    img = Image.fromarray(
        grid[..., 0] if grid.shape[2] == 1 else grid, mode="L" if grid.shape[2] == 1 else "RGB"
    )
    with atomic_path(path, what="image") as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def new_figure(figsize: tuple[float, float], dpi: int = 100) -> tuple[Any, Any]:
    """(figure, axes) on an Agg canvas: matplotlib's object-oriented API, so plotting from library code never
    touches pyplot's global state or the user's chosen backend, and needs no display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def save_figure(fig: Any, path: str | os.PathLike, *, what: str = "plot") -> Path:
    """Lay out ``fig`` and write it as PNG, atomically."""
    fig.tight_layout()
    with atomic_path(path, what=what) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def _save_scatter(points: np.ndarray, path: Path, title: str | None) -> Path:
    if not np.all(np.isfinite(points)):
        raise InvalidArgumentError("points contain NaN or Inf values")
    fig, ax = new_figure((4, 4))
    ax.scatter(points[:, 0], points[:, 1], s=1.5, alpha=0.6, c=np.linspace(0, 1, len(points)), cmap="viridis")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(title or f"{len(points)} samples")
    return save_figure(fig, path, what="image")
