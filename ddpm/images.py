"""Pictures of samples: uint8 NHWC conversion, image grids and 2-D scatter plots, written atomically; and
reading an image file (PNG, JPEG, ...) into a model's sample shape.

Used by the trainer (sample grids during training), by ``ddpm run`` (the final samples) and by the image-in
commands (``ddpm diffuse / denoise / interpolate``: :func:`load_image`, :func:`save_image_table`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InvalidArgumentError
from .io import atomic_path

__all__ = ["to_uint8_nhwc", "make_grid", "save_samples_png", "load_image", "save_image_table"]

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


# PIL modes that convert to L / RGB without guessing a value range (16/32-bit and float modes would need one).
_MODES = {"1": "L", "L": "L", "LA": "L", "P": "RGB", "PA": "RGB", "RGB": "RGB", "RGBA": "RGB", "CMYK": "RGB"}
_MODE_FOR_CHANNELS = {1: "L", 3: "RGB"}


def load_image(path: str | os.PathLike, sample_shape: Any = None) -> tuple[Any, str | None]:
    """Read an image file into a float32 tensor [1, C, H, W] in [-1, 1] (u8 -> u / 127.5 - 1).

    Args:
        path: any file PIL reads (PNG, JPEG, BMP, ...), 8 bits per channel.
        sample_shape: the model's (C, H, W) with C = 1 or 3: the image is converted to L / RGB and resized to
            H x W (area average when shrinking, bicubic when enlarging); None keeps its size, and its mode as
            L or RGB (an alpha channel is dropped, a palette expanded).
    Returns:
        (image, note): note is None when nothing was changed, else one line such as
        ``"resized 28x28 RGB -> 8x8 L"`` for the caller to show: an image is never changed silently.
    """
    import torch
    from PIL import Image, UnidentifiedImageError

    want = _check_image_shape(sample_shape)
    try:
        with Image.open(path) as f:
            f.load()
            img = f.copy()
    except UnidentifiedImageError:
        raise InvalidArgumentError(f"{path}: not an image file PIL can read (PNG, JPEG, BMP, ...)") from None
    except Image.DecompressionBombError as e:
        raise InvalidArgumentError(f"{path}: image too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data; missing files included
        raise InvalidArgumentError(f"{path}: cannot read the image ({e})") from None
    if img.mode not in _MODES:
        raise InvalidArgumentError(
            f"{path}: image mode {img.mode} is not supported (8-bit L, LA, P, RGB, RGBA or CMYK images only)"
        )
    mode = _MODES[img.mode] if want is None else _MODE_FOR_CHANNELS[want[0]]
    size = img.size if want is None else (want[2], want[1])  # PIL sizes are (W, H)
    before = f"{img.size[0]}x{img.size[1]} {img.mode}"
    out = img.convert(mode) if img.mode != mode else img
    if out.size != size:
        shrink = size[0] <= out.size[0] and size[1] <= out.size[1]
        out = out.resize(size, Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC)
    after = f"{size[0]}x{size[1]} {mode}"
    note = None
    if before != after:
        note = f"{'resized' if size != img.size else 'converted'} {before} -> {after}"
    a = np.asarray(out, dtype=np.float32).reshape(size[1], size[0], -1)
    x = torch.from_numpy(a.transpose(2, 0, 1).copy())[None] / 127.5 - 1.0
    return x, note


def _check_image_shape(sample_shape: Any) -> tuple[int, int, int] | None:
    if sample_shape is None:
        return None
    shape = tuple(int(s) for s in sample_shape)
    if len(shape) != 3 or shape[0] not in _MODE_FOR_CHANNELS or min(shape) < 1:
        raise InvalidArgumentError(
            f"images need a sample shape [C, H, W] with C = 1 or 3 channels, got {list(shape)}"
        )
    return shape  # type: ignore[return-value]


def save_image_table(
    cells: Any,
    path: str | os.PathLike,
    *,
    col_labels: list[str] | None = None,
    row_labels: list[str] | None = None,
    title: str | None = None,
) -> Path:
    """Write a labelled table of images as a PNG, atomically: cells [R, K, C, H, W] in [-1, 1] (C = 1 or 3),
    row r, column k; labels under the columns and left of the rows (e.g. timesteps and SNR)."""
    a = _as_numpy(cells)
    if a.ndim != 5 or a.shape[2] not in (1, 3) or a.shape[0] < 1 or a.shape[1] < 1:
        raise InvalidArgumentError(f"cells must be [R, K, C, H, W] with C = 1 or 3, got {tuple(a.shape)}")
    rows, cols = a.shape[:2]
    u = to_uint8_nhwc(a.reshape(rows * cols, *a.shape[2:]))
    scale = max(1, math.ceil(_MIN_TILE / max(u.shape[1], u.shape[2])))
    u = u.repeat(scale, axis=1).repeat(scale, axis=2)
    pad, (h, w) = 2, u.shape[1:3]
    grid = make_grid(u, cols, pad)
    fig, ax = new_figure((grid.shape[1] / 60 + (1.4 if row_labels else 0.4), grid.shape[0] / 60 + 0.9))
    ax.imshow(grid[..., 0] if grid.shape[2] == 1 else grid, cmap="gray", vmin=0, vmax=255)
    ax.set_xticks([pad + k * (w + pad) + w / 2 for k in range(cols)], col_labels or [""] * cols, fontsize=7)
    ax.set_yticks([pad + r * (h + pad) + h / 2 for r in range(rows)], row_labels or [""] * rows, fontsize=7)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    if title:
        ax.set_title(title, fontsize=8)
    return save_figure(fig, path, what="image")
