"""Atomic file output: write to a temporary file in the target folder, then rename into place."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import InvalidArgumentError

__all__ = ["atomic_path", "check_writable", "write_bytes_atomic", "write_text_atomic"]


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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, what: str = "output") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on error delete it.

    An interrupted or failed write never leaves a half-written file under the real name.
    """
    final = check_writable(path, what=what)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent or ".")
    os.close(fd)
    # mkstemp creates 0600 files; give the output the permissions a plain open() would (0666 & ~umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
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
