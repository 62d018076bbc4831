"""Dataset files, read as raw bytes (IDX, CIFAR-10 binary) or decoded by Pillow — never unpickled — within a memory
budget: MNIST's IDX images and labels, CIFAR-10's binary batches, a folder of PNG/JPEG images (and its class
sub-folders). ``ddpm.trainer.data`` builds the datasets from these; a missing or malformed file raises
ArtifactError naming the path and the layout that was expected.
"""

from __future__ import annotations

import gzip
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

from ddpm.errors import ArtifactError, InvalidArgumentError
from ddpm.validate import MAX_CLASSES

__all__ = [
    "IMAGE_EXT",
    "MAX_IMAGE_PIXELS",
    "MAX_DATASET_BYTES",
    "FOLDER_MAX_DEFAULT_SIZE",
    "read_maybe_gz",
    "mnist_images",
    "mnist_labels",
    "cifar10_images",
    "cifar10_labels",
    "image_files",
    "folder_images",
    "folder_labels",
    "check_bytes",
]

IMAGE_EXT = (".png", ".jpg", ".jpeg")
# A source image's pixels (8192^2 / 64M: far above any training image) and a dataset's uint8 bytes in memory.
MAX_IMAGE_PIXELS = 1 << 26
MAX_DATASET_BYTES = 8 << 30
FOLDER_MAX_DEFAULT_SIZE = 64  # a folder of photos trains at 64x64 unless --image-size says otherwise


def _memory_budget() -> int:
    """Bytes a data file may inflate to: MAX_DATASET_BYTES, or half the memory available now if that is less."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return MAX_DATASET_BYTES
    return min(MAX_DATASET_BYTES, avail // 2)


def read_maybe_gz(path: Path, header: int = 0, size_of=None) -> bytearray:
    """The file's bytes, gunzipped when it is gzip, never inflating past what memory allows (a few-MB gzip bomb
    declaring millions of images is refused before it is decompressed). ``header`` bytes are read first and
    ``size_of(header_bytes)`` gives the total the file declares: it is checked against the budget before the
    rest is read; without it the stream is read up to the budget and refused past it."""
    budget = _memory_budget()
    try:
        with open(path, "rb") as raw:
            gz = raw.read(2) == b"\x1f\x8b"
        opener = gzip.open if gz else open
        with opener(path, "rb") as f:
            head = f.read(header)
            want = size_of(head) if size_of is not None and len(head) == header else None
            if want is not None and want > budget:
                raise ArtifactError(
                    f"{path}: its header declares {want / 1e9:.3g} GB of data"
                    + (" (gzip: it would inflate to that)" if gz else "")
                    + f"; at most {budget / 1e9:.3g} GB fits in memory here (MAX_DATASET_BYTES or half of what is free)"
                )
            if want is None:
                rest = f.read(budget + 1)  # one byte past the budget tells "too large" apart from "fits"
                if len(rest) > budget:
                    raise ArtifactError(
                        f"{path}: inflates to more than {budget / 1e9:.3g} GB; at most that fits in memory here"
                    )
                return bytearray(head + rest)
            # the declared size, read in place: the caller's arrays view this buffer, no second copy is made
            buf = bytearray(max(want, len(head)))
            buf[: len(head)] = head
            filled = len(head) + _read_into(f, memoryview(buf)[len(head) :])
            if filled == len(buf) and f.read(1):
                raise ArtifactError(f"{path}: holds more than the {want} bytes its header declares")
            return buf[:filled] if filled < len(buf) else buf
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ArtifactError(f"{path}: cannot read ({e})") from None


def _read_into(f, view: memoryview) -> int:
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            break
        done += n
    return done


def _idx_images_size(head: bytes) -> int | None:
    # IDX images: magic 0x00000803, then N, rows, cols (big-endian int32): the file is 16 + N rows cols bytes
    if int.from_bytes(head[:4], "big") != 0x0803:
        return None
    n, rows, cols = (int.from_bytes(head[4 * i : 4 * i + 4], "big") for i in (1, 2, 3))
    return 16 + n * rows * cols


def _idx_labels_size(head: bytes) -> int | None:
    return 8 + int.from_bytes(head[4:8], "big") if int.from_bytes(head[:4], "big") == 0x0801 else None


def mnist_images(folder: Path) -> torch.Tensor:
    layout = "train-images-idx3-ubyte (or .gz), the IDX file from the MNIST distribution"
    if not folder.is_dir():
        raise ArtifactError(f"mnist: folder {str(folder)!r} does not exist (expected it to hold {layout})")
    names = ["train-images-idx3-ubyte", "train-images.idx3-ubyte"]
    found = [folder / (n + gz) for n in names for gz in ("", ".gz") if (folder / (n + gz)).is_file()]
    if not found:
        raise ArtifactError(f"mnist: no {layout} in {str(folder)!r}")
    path = found[0]
    raw = read_maybe_gz(path, 16, _idx_images_size)
    # IDX: big-endian int32 magic 0x00000803 (unsigned byte, 3 dims), then N, rows, cols, then N*rows*cols bytes.
    if len(raw) < 16 or int.from_bytes(raw[:4], "big") != 0x0803:
        raise ArtifactError(f"{path}: not an IDX image file (expected magic 0x00000803 for {layout})")
    n, rows, cols = (int.from_bytes(raw[4 * i : 4 * i + 4], "big") for i in (1, 2, 3))
    if n < 1 or rows < 1 or cols < 1 or len(raw) != 16 + n * rows * cols:
        raise ArtifactError(
            f"{path}: IDX header says {n} images of {rows}x{cols} = {16 + n * rows * cols} bytes, file has {len(raw)}"
        )
    data = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, 1, rows, cols)
    return torch.from_numpy(
        data
    )  # a view of the buffer the file was read into: one copy of the data in memory


def cifar10_images(folder: Path) -> torch.Tensor:
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
        raw = read_maybe_gz(f)
        if not raw or len(raw) % 3073:
            raise ArtifactError(
                f"{f}: size {len(raw)} is not a multiple of 3073 bytes (1 label + 3x32x32 pixels)"
            )
        # Each record: one label byte, then the red, green and blue 32x32 planes, row-major.
        parts.append(np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3073)[:, 1:].reshape(-1, 3, 32, 32))
    return torch.from_numpy(np.concatenate(parts))


def image_files(folder: Path) -> list[Path]:
    """Every PNG/JPEG file under ``folder`` (sub-folders too), sorted: the order of a folder dataset's images,
    and of their labels (:func:`folder_labels`)."""
    if not folder.is_dir():
        raise ArtifactError(f"folder: {str(folder)!r} does not exist (expected a folder of PNG/JPEG images)")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXT and p.is_file())
    if not files:
        raise ArtifactError(f"folder: no PNG/JPEG images (*.png, *.jpg, *.jpeg) found under {str(folder)!r}")
    return files


def folder_labels(folder: Path) -> tuple[np.ndarray, list[str]]:
    """(labels int64 [N] in :func:`image_files` order, class names) of a folder holding one sub-folder per
    class: the names are the sorted sub-folder names, an image's label the index of the sub-folder it lies in
    (at any depth below it). InvalidArgumentError saying why for any other layout."""
    files = image_files(folder)
    parts = [f.relative_to(folder).parts for f in files]
    top = [p[0] for p in parts]
    loose = [p[0] for p in parts if len(p) == 1]
    if loose:
        raise InvalidArgumentError(
            f"folder:{folder}: {len(loose)} image(s) lie directly in the folder (e.g. {loose[0][:60]!r}); class "
            "labels come from sub-folders: put every image in the sub-folder named after its class"
        )
    names = sorted(set(top))
    if not 2 <= len(names) <= MAX_CLASSES:
        raise InvalidArgumentError(
            f"folder:{folder}: {len(names)} class sub-folder(s); class labels need 2..{MAX_CLASSES} of them"
        )
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[part] for part in top], dtype=np.int64), names


def folder_images(folder: Path, size: int | None) -> torch.Tensor:
    files = image_files(folder)
    from PIL import Image, UnidentifiedImageError

    if size is None:  # the images' own size: one header read each, nothing decoded yet
        size = min(FOLDER_MAX_DEFAULT_SIZE, min(min(_image_size(f)) for f in files))
    check_bytes(f"folder:{folder}", len(files), 3 * size * size)
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


def check_bytes(what: str, n: int, per_image: int) -> None:
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


def mnist_labels(folder: Path) -> np.ndarray | None:
    names = ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte")
    found = [folder / (n + gz) for n in names for gz in ("", ".gz") if (folder / (n + gz)).is_file()]
    if not found:
        return None
    raw = read_maybe_gz(found[0], 8, _idx_labels_size)
    # IDX labels: magic 0x00000801 (unsigned byte, 1 dim), then N, then N bytes.
    if len(raw) < 8 or int.from_bytes(raw[:4], "big") != 0x0801:
        raise ArtifactError(f"{found[0]}: not an IDX label file (expected magic 0x00000801)")
    return np.frombuffer(raw, dtype=np.uint8, offset=8).astype(np.int64)


def cifar10_labels(folder: Path) -> np.ndarray:
    # The same files, in the same order, as data.py's loader: the label is each record's first byte.
    files = sorted(folder.glob("data_batch_*.bin")) or sorted(
        folder.glob("cifar-10-batches-bin/data_batch_*.bin")
    )
    parts = [np.frombuffer(read_maybe_gz(f), dtype=np.uint8).reshape(-1, 3073)[:, 0] for f in files]
    return np.concatenate(parts).astype(np.int64)
