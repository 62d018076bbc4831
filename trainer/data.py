"""Training data: ``swissroll``, ``digits``, ``mnist:DIR``, ``cifar10:DIR``, ``folder:DIR``.

Everything is loaded into memory once (these are small datasets) as a ``Dataset``: file images are kept as
uint8 [N, C, H, W] and scaled to [-1, 1] per batch; digits and vectors are kept as float32 in model space. Files are parsed as raw bytes
(IDX, CIFAR-10 binary) or decoded by Pillow — never unpickled. A missing or malformed dataset raises
ArtifactError naming the path and the layout that was expected.
"""

from __future__ import annotations

import gzip
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ddpm.errors import ArtifactError, InvalidArgumentError
from ddpm.validate import MAX_IMAGE_SIZE

__all__ = ["Dataset", "DATASET_KINDS", "load_dataset", "swissroll", "dataset_kind"]

DATASET_KINDS = ("swissroll", "digits", "mnist", "cifar10", "folder")
_NEEDS_DIR = ("mnist", "cifar10", "folder")
_ALLOWED = "swissroll, digits, mnist:DIR, cifar10:DIR, folder:DIR"
_IMAGE_EXT = (".png", ".jpg", ".jpeg")
# A source image's pixels (8192^2 / 64M: far above any training image) and a dataset's uint8 bytes in memory.
MAX_IMAGE_PIXELS = 1 << 26
MAX_DATASET_BYTES = 8 << 30
FOLDER_MAX_DEFAULT_SIZE = 64  # a folder of photos trains at 64x64 unless --image-size says otherwise


@dataclass
class Dataset:
    """An in-memory dataset.

    Attributes:
        name: the spec it was loaded from (stored in checkpoint metadata), e.g. ``digits`` or ``mnist:/data``.
        data: [N, *sample_shape]; uint8 images (0..255, scaled per batch) or float32 already in model space.
        flip: random horizontal flips in :meth:`batch` (images only).
    """

    name: str
    data: torch.Tensor
    flip: bool = False

    @property
    def sample_shape(self) -> list[int]:
        return list(self.data.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.data.dim() == 4

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def to(self, device: torch.device | str) -> Dataset:
        return Dataset(self.name, self.data.to(device), self.flip)

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """float32 [B, *sample_shape] in model space ([-1, 1] for images) for the indices ``idx`` [B].
        Flips draw from torch's global RNG (the training loop seeds it per step)."""
        x = self.data[idx.to(self.data.device)]
        if x.dtype == torch.uint8:
            x = x.to(torch.float32) / 127.5 - 1.0
        if self.flip:
            mask = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(mask[:, None, None, None], x.flip(-1), x)
        return x


def dataset_kind(spec: str) -> str:
    """``mnist:/data`` -> ``mnist``; raises InvalidArgumentError for an unknown kind."""
    kind = spec.split(":", 1)[0]
    if kind not in DATASET_KINDS:
        raise InvalidArgumentError(f"unknown dataset {spec!r}; allowed: {_ALLOWED}")
    return kind


def load_dataset(spec: str, *, image_size: int | None = None, flip: bool = False) -> Dataset:
    """Load a dataset by spec. ``image_size`` resizes images (centre-crop for ``folder``); None keeps the
    native size (``folder``: the smallest side among its images, at most FOLDER_MAX_DEFAULT_SIZE)."""
    kind = dataset_kind(spec)
    folder = spec.split(":", 1)[1] if ":" in spec else ""
    if kind in _NEEDS_DIR and not folder:
        raise InvalidArgumentError(f"dataset {kind!r} needs a folder: --data {kind}:DIR")
    if kind not in _NEEDS_DIR and folder:
        raise InvalidArgumentError(f"dataset {kind!r} takes no folder (got {spec!r}); allowed: {_ALLOWED}")
    if image_size is not None and (
        isinstance(image_size, bool)
        or not isinstance(image_size, int)
        or not 1 <= image_size <= MAX_IMAGE_SIZE
    ):
        raise InvalidArgumentError(
            f"--image-size must be a positive integer <= {MAX_IMAGE_SIZE}, got {image_size!r}"
        )
    if kind == "swissroll":
        if image_size is not None:
            raise InvalidArgumentError("--image-size does not apply to swissroll (2-D points)")
        if flip:
            raise InvalidArgumentError("--flip does not apply to swissroll (2-D points)")
        return Dataset(spec, torch.from_numpy(swissroll(5000, seed=0)))
    if kind == "digits":
        data = _digits()
    elif kind == "mnist":
        data = _mnist(Path(folder))
    elif kind == "cifar10":
        data = _cifar10(Path(folder))
    else:
        data = _folder(Path(folder), image_size)
    if image_size is not None and data.shape[-1] != image_size:
        _check_bytes(spec, len(data), data.shape[1] * image_size * image_size)
        data = _resize(data, image_size)
    return Dataset(spec, data, flip)


# ---- generated and bundled data ----


def swissroll(n: int, *, seed: int) -> np.ndarray:
    """Seed 003's 2-D swiss roll: angle u = 3pi/2 (1 + 2 U), point (u cos u, u sin u) + N(0, 0.1^2) noise,
    standardised per coordinate (zero mean, unit std). float32 [n, 2]; same seed -> same points."""
    g = np.random.default_rng(seed)
    u = 1.5 * np.pi * (1.0 + 2.0 * g.random(n))
    pts = np.stack([u * np.cos(u), u * np.sin(u)], axis=1) + 0.1 * g.standard_normal((n, 2))
    pts = (pts - pts.mean(axis=0)) / pts.std(axis=0)
    return pts.astype(np.float32)


def _digits() -> torch.Tensor:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, integer values 0..16) as float32
    [N, 1, 8, 8] in [-1, 1]: x / 8 - 1, exact (no detour through 0..255)."""
    from sklearn.datasets import load_digits

    images = load_digits().images  # [1797, 8, 8] float64
    return torch.from_numpy((images / 8.0 - 1.0).astype(np.float32))[:, None]


# ---- files ----


def _read_maybe_gz(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ArtifactError(f"{path}: cannot read ({e})") from None


def _mnist(folder: Path) -> torch.Tensor:
    layout = "train-images-idx3-ubyte (or .gz), the IDX file from the MNIST distribution"
    if not folder.is_dir():
        raise ArtifactError(f"mnist: folder {str(folder)!r} does not exist (expected it to hold {layout})")
    names = ["train-images-idx3-ubyte", "train-images.idx3-ubyte"]
    found = [folder / (n + gz) for n in names for gz in ("", ".gz") if (folder / (n + gz)).is_file()]
    if not found:
        raise ArtifactError(f"mnist: no {layout} in {str(folder)!r}")
    path = found[0]
    raw = _read_maybe_gz(path)
    # IDX: big-endian int32 magic 0x00000803 (unsigned byte, 3 dims), then N, rows, cols, then N*rows*cols bytes.
    if len(raw) < 16 or int.from_bytes(raw[:4], "big") != 0x0803:
        raise ArtifactError(f"{path}: not an IDX image file (expected magic 0x00000803 for {layout})")
    n, rows, cols = (int.from_bytes(raw[4 * i : 4 * i + 4], "big") for i in (1, 2, 3))
    if n < 1 or rows < 1 or cols < 1 or len(raw) != 16 + n * rows * cols:
        raise ArtifactError(
            f"{path}: IDX header says {n} images of {rows}x{cols} = {16 + n * rows * cols} bytes, file has {len(raw)}"
        )
    data = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, 1, rows, cols)
    return torch.from_numpy(data.copy())


def _cifar10(folder: Path) -> torch.Tensor:
    layout = "data_batch_1.bin .. data_batch_5.bin (the CIFAR-10 *binary* version, 3073-byte records)"
    if not folder.is_dir():
        raise ArtifactError(f"cifar10: folder {str(folder)!r} does not exist (expected {layout})")
    files = sorted(folder.glob("data_batch_*.bin")) or sorted(
        folder.glob("cifar-10-batches-bin/data_batch_*.bin")
    )
    if not files:
        raise ArtifactError(f"cifar10: no {layout} in {str(folder)!r}")
    parts = []
    for f in files:
        raw = _read_maybe_gz(f)
        if not raw or len(raw) % 3073:
            raise ArtifactError(
                f"{f}: size {len(raw)} is not a multiple of 3073 bytes (1 label + 3x32x32 pixels)"
            )
        # Each record: one label byte, then the red, green and blue 32x32 planes, row-major.
        parts.append(np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3073)[:, 1:].reshape(-1, 3, 32, 32))
    return torch.from_numpy(np.concatenate(parts))


def _folder(folder: Path, size: int | None) -> torch.Tensor:
    if not folder.is_dir():
        raise ArtifactError(f"folder: {str(folder)!r} does not exist (expected a folder of PNG/JPEG images)")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_EXT and p.is_file())
    if not files:
        raise ArtifactError(f"folder: no PNG/JPEG images (*.png, *.jpg, *.jpeg) found under {str(folder)!r}")
    from PIL import Image, UnidentifiedImageError

    if size is None:  # the images' own size: one header read each, nothing decoded yet
        size = min(FOLDER_MAX_DEFAULT_SIZE, min(min(_image_size(f)) for f in files))
    _check_bytes(f"folder:{folder}", len(files), 3 * size * size)
    out = np.empty((len(files), 3, size, size), dtype=np.uint8)
    for k, f in enumerate(files):
        try:
            # PIL's own bomb guard only warns below 2x its limit; ours refuses from the header, before decoding.
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(f) as im:
                    w, h = im.size
                    if w * h > MAX_IMAGE_PIXELS:
                        raise ArtifactError(
                            f"{f}: image is {w}x{h} pixels; at most {MAX_IMAGE_PIXELS} are decoded "
                            "(a decompression bomb, or resize it first)"
                        )
                    out[k] = _centre_crop(im.convert("RGB"), size).transpose(2, 0, 1)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ArtifactError(f"{f}: refused: {e}") from None
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise ArtifactError(f"{f}: cannot decode image ({e})") from None
    return torch.from_numpy(out)


def _image_size(f: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused when decoded, below
            with Image.open(f) as im:
                return im.size
    except (Image.DecompressionBombError, OSError, UnidentifiedImageError, ValueError) as e:
        raise ArtifactError(f"{f}: cannot decode image ({e})") from None


def _check_bytes(what: str, n: int, per_image: int) -> None:
    if n * per_image > MAX_DATASET_BYTES:
        raise InvalidArgumentError(
            f"{what}: {n} images of {per_image} bytes is {n * per_image / 1e9:.3g} GB in memory; at most "
            f"{MAX_DATASET_BYTES / 1e9:.3g} GB (use a smaller --image-size or fewer images)"
        )


def _centre_crop(im, size: int) -> np.ndarray:
    """Resize so the shorter side is ``size`` (bicubic, antialiased), then crop the centre square."""
    from PIL import Image

    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _resize(data: torch.Tensor, size: int) -> torch.Tensor:
    """Square images [N, C, H, W] (uint8 or float32) -> [N, C, size, size], same dtype (bilinear,
    antialiased when shrinking); chunked so a 50k-image set never needs a full float32 copy."""
    out = []
    # about 256 MB of float32 per chunk, whatever the image size
    for chunk in data.split(max(1, min(4096, (1 << 26) // (data.shape[1] * size * size)))):
        x = F.interpolate(
            chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        out.append(x.round().clamp(0, 255).to(torch.uint8) if data.dtype == torch.uint8 else x)
    return torch.cat(out)
