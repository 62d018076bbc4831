"""Datasets: tiny IDX / CIFAR-binary / image folders built in a temp dir, the bundled digits, the swiss roll,
and one-line ArtifactErrors naming the path and the expected layout."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.errors import ArtifactError, InvalidArgumentError
from ddpm.trainer.data import load_dataset, swissroll


def _idx_bytes(images: np.ndarray) -> bytes:
    n, h, w = images.shape
    return struct.pack(">iiii", 0x0803, n, h, w) + images.astype(np.uint8).tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path, rng, gz):
    imgs = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    raw = _idx_bytes(imgs)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    (tmp_path / name).write_bytes(gzip.compress(raw) if gz else raw)
    ds = load_dataset(f"mnist:{tmp_path}")
    assert ds.sample_shape == [1, 28, 28] and len(ds) == 5
    x = ds.batch(torch.arange(5))
    # uint8 u -> u / 127.5 - 1 exactly (float32 division of small integers: error <= 1 ulp)
    ref = torch.from_numpy(imgs[:, None].astype(np.float32)) / 127.5 - 1
    assert torch.allclose(x, ref, rtol=0, atol=1e-6)


def test_mnist_errors(tmp_path):
    with pytest.raises(ArtifactError, match=r"mnist: no train-images-idx3-ubyte \(or \.gz\).* in '"):
        load_dataset(f"mnist:{tmp_path}")
    (tmp_path / "train-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 0x0803, 10, 28, 28) + b"\0" * 100)
    with pytest.raises(ArtifactError, match=r"IDX header says 10 images of 28x28 = 7856 bytes, file has 116"):
        load_dataset(f"mnist:{tmp_path}")
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\0\0\x08\x01" + b"\0" * 20)
    with pytest.raises(ArtifactError, match="not an IDX image file"):
        load_dataset(f"mnist:{tmp_path}")
    with pytest.raises(ArtifactError, match=r"mnist: folder '.*nowhere' does not exist"):
        load_dataset(f"mnist:{tmp_path / 'nowhere'}")


def test_cifar10_binary(tmp_path, rng):
    recs = []
    pix = rng.integers(0, 256, size=(7, 3, 32, 32), dtype=np.uint8)
    for k in range(7):
        recs.append(bytes([k % 10]) + pix[k].tobytes())  # label, then R, G, B planes
    (tmp_path / "data_batch_1.bin").write_bytes(b"".join(recs[:4]))
    (tmp_path / "data_batch_2.bin").write_bytes(b"".join(recs[4:]))
    ds = load_dataset(f"cifar10:{tmp_path}")
    assert ds.sample_shape == [3, 32, 32] and len(ds) == 7 and not ds.flip
    assert torch.equal(ds.data, torch.from_numpy(pix))
    small = load_dataset(f"cifar10:{tmp_path}", image_size=16, flip=False)
    assert small.sample_shape == [3, 16, 16] and small.data.dtype == torch.uint8


def test_cifar10_errors(tmp_path):
    with pytest.raises(ArtifactError, match=r"cifar10: no data_batch_1\.bin \.\. data_batch_5\.bin"):
        load_dataset(f"cifar10:{tmp_path}")
    (tmp_path / "data_batch_1.bin").write_bytes(b"\0" * 3000)
    with pytest.raises(ArtifactError, match=r"data_batch_1\.bin: size 3000 is not a multiple of 3073"):
        load_dataset(f"cifar10:{tmp_path}")


def test_folder_resize_and_centre_crop(tmp_path):
    # A 40x20 (w x h) image: left half black, right half white, with a red 10x20 band in the middle.
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, 20:] = 255
    a[:, 15:25] = (255, 0, 0)
    Image.fromarray(a).save(tmp_path / "wide.png")
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.full((30, 30, 3), 200, np.uint8)).save(tmp_path / "sub" / "grey.JPG")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = load_dataset(f"folder:{tmp_path}", image_size=8)
    assert ds.sample_shape == [3, 8, 8] and len(ds) == 2
    grey = ds.data[0]  # sorted paths: sub/grey.JPG before wide.png
    assert (grey.int() - 200).abs().max() <= 2  # JPEG of a flat colour
    wide = ds.data[1].permute(1, 2, 0).numpy().astype(int)
    # Centre square of the 40x20 image is columns 10..30, resized to 8: red band at columns 2..5, black left
    # edge, white right edge (bicubic ringing stays within a few levels away from the edges).
    assert np.abs(wide[:, 3:5] - [255, 0, 0]).max() <= 40
    assert wide[:, 0].max() <= 40 and wide[:, 7].min() >= 215


def test_folder_errors(tmp_path):
    with pytest.raises(ArtifactError, match=r"folder: no PNG/JPEG images .* found under '"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ArtifactError, match=r"broken\.png: cannot decode image"):
        load_dataset(f"folder:{tmp_path}")


def test_digits_are_the_real_sklearn_digits():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    assert ds.sample_shape == [1, 8, 8] and len(ds) == 1797 and not ds.flip
    x = ds.batch(torch.arange(len(ds)))
    assert torch.equal(x[:, 0], torch.from_numpy(load_digits().images / 8.0 - 1.0).float())
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0


def test_swissroll_is_seeded_and_standardised():
    a, b = swissroll(5000, seed=3), swissroll(5000, seed=3)
    assert np.array_equal(a, b) and not np.array_equal(a, swissroll(5000, seed=4))
    assert np.abs(a.mean(0)).max() < 1e-5 and np.abs(a.std(0) - 1).max() < 1e-5
    ds = load_dataset("swissroll")
    assert ds.sample_shape == [2] and len(ds) == 5000
    assert torch.equal(ds.batch(torch.arange(5)), torch.from_numpy(swissroll(5000, seed=0)[:5]))


def test_flip_mirrors_about_half_the_batch():
    ds = load_dataset("digits", flip=True)
    idx = torch.arange(200)
    torch.manual_seed(0)
    x = ds.batch(idx)
    plain = ds.data[idx]
    flipped = (x == plain.flip(-1)).flatten(1).all(1) & ~(x == plain).flatten(1).all(1)
    kept = (x == plain).flatten(1).all(1)
    assert bool((flipped | kept).all()) and 60 < int(flipped.sum()) < 140


@pytest.mark.parametrize(
    "spec, kwargs, exc, match",
    [
        (
            "imagenet",
            {},
            InvalidArgumentError,
            r"unknown dataset 'imagenet'; allowed: swissroll, digits, mnist:DIR",
        ),
        ("mnist", {}, InvalidArgumentError, r"dataset 'mnist' needs a folder: --data mnist:DIR"),
        ("digits:/x", {}, InvalidArgumentError, r"takes no folder"),
        ("swissroll", {"image_size": 8}, InvalidArgumentError, r"--image-size does not apply to swissroll"),
        ("digits", {"image_size": 0}, InvalidArgumentError, r"--image-size must be a positive integer"),
    ],
)
def test_bad_specs(spec, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        load_dataset(spec, **kwargs)
