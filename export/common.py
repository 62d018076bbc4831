"""What every export stage shares: the report, the log callback, and writing an engine with its sidecar.

An ONNX file is one file and goes through ``ddpm.io.atomic_path``; an engine is two (``unet.trt`` and
``unet.trt.json``) that must be checked together under their real names, hence :func:`staged_pair`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddpm.artifacts import sidecar_path
from ddpm.io import check_writable

from .parity import ParityResult

__all__ = ["Log", "ExportReport", "staged_pair", "write_synced"]

Log = Callable[[str], None]


@dataclass
class ExportReport:
    """What ``export`` wrote: the file, its kind and precision, its metadata and every parity figure."""

    out: Path
    kind: str
    precision: str
    meta: dict[str, Any]
    parity: list[ParityResult] = field(default_factory=list)
    seconds: float = 0.0


@contextlib.contextmanager
def staged_pair(out: Path) -> Iterator[Path]:
    """Yield ``<tmpdir>/<out.name>`` in a private folder beside ``out``; on success move it and its sidecar into
    place (engine first, then sidecar), on error delete both.

    ``ddpm.io.atomic_path`` stages one file under a temporary name; an engine must be checked together with
    its sidecar under its real file name (the runtime finds the sidecar by name), hence a staging folder. The
    folder is on the same filesystem, so each move is an atomic rename; the sidecar records the engine's size
    and sha256, so a crash between the two renames is detected when the engine is read.
    """
    check_writable(out, what="--out")
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent or "."))
    try:
        staged = tmpdir / out.name
        yield staged
        os.replace(staged, out)
        os.replace(sidecar_path(staged), sidecar_path(out))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def write_synced(path: Path, data: bytes) -> None:
    """Write and fsync: the staged files are renamed into place next, and must be on disk first."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
