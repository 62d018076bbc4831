"""Atomic file output: write to a temporary file in the target folder, then rename into place.

Temporary files are named ``.NAME.PID.XXXXXXXX.tmp`` (PID: the writing process). A process killed mid-write
(SIGKILL, power loss) leaves one behind; the next write into that folder removes every such file whose PID is
no live process, and every pid-less ``.NAME.XXXXXXXX.tmp`` (the older naming) last modified before this
process started. A live writer's file is never touched.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

from .errors import InvalidArgumentError

__all__ = [
    "NpzStream",
    "atomic_path",
    "check_free_space",
    "check_writable",
    "npz_stream",
    "remove_stale_temps",
    "write_bytes_atomic",
    "write_text_atomic",
]

_STARTED = time.time()
# mkstemp's random part is 8 characters of [a-z0-9_].
_TEMP = re.compile(r"^\..+?\.(?:(\d+)\.)?[a-z0-9_]{8}\.tmp$")


def check_writable(path: str | os.PathLike, *, what: str = "output") -> Path:
    """Fail early, with one clear message, when ``path`` cannot be written (folder missing or read-only)."""
    p = Path(path)
    if p.is_dir():
        raise InvalidArgumentError(f"{what} path {str(p)!r} is a directory; give a file name")
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise InvalidArgumentError(f"{what} folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidArgumentError(f"{what} folder {str(folder)!r} is not writable")
    return p


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process / not a pid at all
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files our writers left in ``folder`` when killed (the rule in the module docstring)."""
    removed = []
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for e in entries:
            m = _TEMP.match(e.name)
            if m is None or not e.is_file(follow_symlinks=False):
                continue
            pid = m.group(1)
            with contextlib.suppress(OSError):
                stale = not _pid_alive(int(pid)) if pid else e.stat().st_mtime < _STARTED
                if stale:
                    os.unlink(e.path)
                    removed.append(Path(e.path))
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, what: str = "output") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on error delete it.

    An interrupted or failed write never leaves a half-written file under the real name.
    """
    final = check_writable(path, what=what)
    remove_stale_temps(final.parent or ".")
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 files, and some writers (safetensors) recreate the file: set the permissions a
        # plain open() would give (0666 & ~umask) once the content is there, just before the rename.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def check_free_space(path: str | os.PathLike, need: int, *, what: str = "output") -> None:
    """InvalidArgumentError when the folder of ``path`` has less than ``need`` bytes free (checked before a
    long run, so it does not fail at its end)."""
    folder = Path(path).parent if str(Path(path).parent) else Path(".")
    if not folder.is_dir():  # the writer's own check names that problem
        return
    free = shutil.disk_usage(folder).free
    if need > free:
        raise InvalidArgumentError(
            f"{what} {str(path)!r} needs ~{need / 1e9:.3g} GB but {str(folder)!r} has {free / 1e9:.3g} GB free"
        )


class NpzStream:
    """Appends batches to the ``arr_0`` member of an npz whose shape and dtype are fixed up front."""

    def __init__(self, member, shape: tuple[int, ...], dtype) -> None:
        self._f, self.shape, self.dtype, self.rows = member, tuple(shape), dtype, 0

    def write(self, batch) -> None:
        """Append ``batch`` [n, *shape[1:]] of the stream's dtype."""
        if tuple(batch.shape[1:]) != self.shape[1:] or batch.dtype != self.dtype:
            raise InvalidArgumentError(
                f"npz batch must be {self.dtype} [n, {', '.join(map(str, self.shape[1:]))}], "
                f"got {batch.dtype} {list(batch.shape)}"
            )
        if self.rows + batch.shape[0] > self.shape[0]:
            raise InvalidArgumentError(f"npz holds {self.shape[0]} rows; got {self.rows + batch.shape[0]}")
        self._f.write(memoryview(batch.reshape(-1)).cast("B") if batch.size else b"")
        self.rows += batch.shape[0]


@contextlib.contextmanager
def npz_stream(
    path: str | os.PathLike,
    shape: tuple[int, ...],
    dtype,
    *,
    what: str = "output",
    extras: dict | None = None,
) -> Iterator[NpzStream]:
    """An npz with one array ``arr_0`` of ``shape``/``dtype``, written batch by batch (atomically, like
    ``np.savez``'s layout: an uncompressed zip whose ``arr_0.npy`` is the .npy header then the raw rows).

    Memory is one batch, whatever ``shape[0]`` is. All ``shape[0]`` rows must be written before the block ends.
    ``extras``: small arrays stored beside ``arr_0`` under their own names.
    """
    import numpy as np  # numpy stays out of `ddpm --help`, which imports this module through the CLIs

    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    with atomic_path(path, what=what) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, value in (extras or {}).items():
                with zf.open(f"{name}.npy", "w") as f:
                    np.lib.format.write_array(f, np.asarray(value), allow_pickle=False)
            with zf.open("arr_0.npy", "w", force_zip64=math.prod(shape) * dtype.itemsize > 1 << 31) as f:
                np.lib.format.write_array_header_1_0(f, header)
                stream = NpzStream(f, tuple(shape), dtype)
                yield stream
                if stream.rows != shape[0]:
                    raise InvalidArgumentError(f"npz stream got {stream.rows} of {shape[0]} rows")
