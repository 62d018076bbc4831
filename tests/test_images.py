"""runtime.images: uint8 conversion, PNG grids and scatter plots, written atomically."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.errors import InvalidArgumentError
from ddpm.images import make_grid, save_samples_png, to_uint8_nhwc


def test_to_uint8_matches_reference(rng):
    x = rng.normal(0, 0.8, size=(5, 3, 4, 6)).astype(np.float32)  # some values beyond [-1, 1]
    got = to_uint8_nhwc(torch.from_numpy(x))
    ref = np.rint((np.clip(x.astype(np.float64), -1, 1) + 1) * 127.5).transpose(0, 2, 3, 1)
    assert got.dtype == np.uint8 and got.shape == (5, 4, 6, 3)
    # float32 vs float64 arithmetic can only flip a value sitting on a .5 rounding boundary: off by <= 1.
    assert np.abs(got.astype(int) - ref).max() <= 1
    assert to_uint8_nhwc(
        np.array([-1.0, 0.0, 1.0, 5.0], np.float32).reshape(1, 1, 1, 4)
    ).ravel().tolist() == [
        0,
        128,
        255,
        255,
    ]


def test_grid_png_holds_the_tiles(tmp_path, rng):
    x = rng.uniform(-1, 1, size=(5, 1, 8, 8)).astype(np.float32)
    path = save_samples_png(torch.from_numpy(x), tmp_path / "g.png", nrow=3)
    img = np.asarray(Image.open(path))
    scale = 4  # 8-pixel tiles are enlarged to 32
    assert img.shape == (2 * (32 + 2) + 2, 3 * (32 + 2) + 2)
    u = to_uint8_nhwc(x)
    tile4 = img[2 + 34 : 2 + 34 + 32, 2 + 34 : 2 + 34 + 32]  # sample 4: row 1, column 1
    assert np.array_equal(tile4, u[4, :, :, 0].repeat(scale, 0).repeat(scale, 1))
    assert not list(tmp_path.glob(".*.tmp"))


def test_rgb_grid_and_scatter(tmp_path, rng):
    rgb = save_samples_png(rng.uniform(-1, 1, (4, 3, 32, 32)), tmp_path / "c.png")
    assert Image.open(rgb).mode == "RGB" and Image.open(rgb).size == (2 * 34 + 2, 2 * 34 + 2)
    pts = save_samples_png(torch.randn(300, 2), tmp_path / "s.png")
    assert pts.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_make_grid_row_major():
    tiles = np.arange(3, dtype=np.uint8).reshape(3, 1, 1, 1) + 10
    g = make_grid(tiles, nrow=2, pad=1)
    assert (
        g.shape == (5, 5, 1)
        and g[1, 1, 0] == 10
        and g[1, 3, 0] == 11
        and g[3, 1, 0] == 12
        and g[3, 3, 0] == 128
    )


@pytest.mark.parametrize(
    "x, match",
    [
        (np.zeros((2, 2, 4, 4)), r"C = 1 or 3"),
        (np.zeros((5, 3)), r"2-D points \[N, 2\]"),
        (np.full((1, 1, 2, 2), np.nan), "NaN or Inf"),
    ],
)
def test_bad_samples_rejected(tmp_path, x, match):
    with pytest.raises(InvalidArgumentError, match=match):
        save_samples_png(x, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder(tmp_path):
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        save_samples_png(np.zeros((1, 1, 2, 2)), tmp_path / "missing" / "x.png")
