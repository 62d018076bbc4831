"""Training data: ``swissroll``, ``digits``, ``mnist:DIR``, ``cifar10:DIR``, ``folder:DIR``, and their class labels.

Everything is loaded into memory once (these are small datasets) as a ``Dataset``: file images are kept as
uint8 [N, C, H, W] and scaled to [-1, 1] per batch; digits and vectors are kept as float32 in model space. Files
are parsed as raw bytes (IDX, CIFAR-10 binary) or decoded by Pillow — never unpickled (trainer/datafiles.py). A
missing or malformed dataset raises ArtifactError naming the path and the layout that was expected.

Labels (:func:`load_class_labels`, for ``ddpm train --cond class``): digits, mnist (the IDX label file beside the
images), cifar10, and a folder with one sub-folder per class (names: the sorted sub-folder names), always in
:func:`load_dataset`'s order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ddpm.errors import ArtifactError, InvalidArgumentError
from ddpm.validate import MAX_IMAGE_SIZE

from .datafiles import (
    FOLDER_MAX_DEFAULT_SIZE,
    MAX_DATASET_BYTES,
    MAX_IMAGE_PIXELS,
    check_bytes,
    cifar10_images,
    cifar10_labels,
    folder_images,
    folder_labels,
    mnist_images,
    mnist_labels,
)

__all__ = ["Dataset", "DATASET_KINDS", "load_dataset", "load_labels", "swissroll", "dataset_kind"]
__all__ += ["ClassLabels", "load_class_labels", "CIFAR10_NAMES", "MAX_IMAGE_PIXELS", "MAX_DATASET_BYTES"]
__all__ += ["FOLDER_MAX_DEFAULT_SIZE"]

DATASET_KINDS = ("swissroll", "digits", "mnist", "cifar10", "folder")
_NEEDS_DIR = ("mnist", "cifar10", "folder")
_ALLOWED = "swissroll, digits, mnist:DIR, cifar10:DIR, folder:DIR"
# CIFAR-10's batches.meta.txt, in label order
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass
class Dataset:
    """An in-memory dataset.

    Attributes:
        name: the spec it was loaded from (stored in checkpoint metadata), e.g. ``digits`` or ``mnist:/data``.
        data: [N, *sample_shape]; uint8 images (0..255, scaled per batch) or float32 already in model space.
        flip: random horizontal flips in :meth:`batch` (images only).
        labels: int64 [N] class labels, for class-conditional training (None: unlabelled use).
    """

    name: str
    data: torch.Tensor
    flip: bool = False
    labels: torch.Tensor | None = None

    @property
    def sample_shape(self) -> list[int]:
        return list(self.data.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.data.dim() == 4

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def to(self, device: torch.device | str) -> Dataset:
        labels = None if self.labels is None else self.labels.to(device)
        return Dataset(self.name, self.data.to(device), self.flip, labels)

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
        data = mnist_images(Path(folder))
    elif kind == "cifar10":
        data = cifar10_images(Path(folder))
    else:
        data = folder_images(Path(folder), image_size)
    if image_size is not None and data.shape[-1] != image_size:
        check_bytes(spec, len(data), data.shape[1] * image_size * image_size)
        data = _resize(data, image_size)
    return Dataset(spec, data, flip)


@dataclass(frozen=True)
class ClassLabels:
    """Class labels of a dataset: ``labels`` int64 [N] in :func:`load_dataset`'s order, each in 0..K-1, and
    the K class ``names`` (label i is ``names[i]``)."""

    labels: np.ndarray
    names: list[str]

    @property
    def count(self) -> int:
        return len(self.names)


def load_class_labels(spec: str) -> ClassLabels:
    """The class labels of a labelled dataset (see the module docstring); InvalidArgumentError (one line) saying
    why when it has none, ArtifactError for a malformed label file."""
    kind = dataset_kind(spec)
    folder = Path(spec.split(":", 1)[1]) if ":" in spec else None
    if kind == "folder" and folder is not None:
        labels, names = folder_labels(folder)
        return ClassLabels(labels, names)
    labels = load_labels(spec)
    if labels is None:
        why = {
            "swissroll": "swissroll holds unlabelled 2-D points",
            "mnist": f"{spec} has no train-labels-idx1-ubyte (or .gz) beside its images",
        }.get(kind, f"{spec} has no labels")
        raise InvalidArgumentError(f"class labels are needed (--cond class), but {why}")
    names = list(CIFAR10_NAMES) if kind == "cifar10" else [str(i) for i in range(10)]
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise ArtifactError(f"{spec}: label {int(labels.max())} is outside the {len(names)} classes 0..9")
    return ClassLabels(labels, names)


def load_labels(spec: str) -> np.ndarray | None:
    """Class labels (int64 [N]) of a labelled dataset, in :func:`load_dataset`'s order: digits, mnist (when the
    IDX label file is beside the images), cifar10, a folder with one sub-folder per class; None for data
    without labels."""
    kind = dataset_kind(spec)
    folder = Path(spec.split(":", 1)[1]) if ":" in spec else None
    if kind == "digits":
        from sklearn.datasets import load_digits

        return load_digits().target.astype(np.int64)
    if kind == "mnist" and folder is not None:
        return mnist_labels(folder)
    if kind == "cifar10" and folder is not None:
        return cifar10_labels(folder)
    if kind == "folder" and folder is not None:
        try:
            return folder_labels(folder)[0]
        except (ArtifactError, InvalidArgumentError):  # no images, or not one sub-folder per class
            return None
    return None


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


# ---- shared by every image set ----


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
