"""Loading the optional compiled modules ddpm._C (CPU) and ddpm._C_cuda (CUDA), and the one-time fallback warning.

Both are optional: without them every kernel has a pure torch/NumPy path (slow, same numbers to float32
rounding). torch is imported first on purpose: ddpm._C links ``libgomp.so.1`` by soname, so when torch's copy is
already loaded the two share ONE OpenMP runtime and thread pool instead of two pools spinning against each other.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType

import torch  # noqa: F401  - must be loaded before ddpm._C (shared OpenMP runtime, see above)

__all__ = ["cpu_extension", "cuda_extension", "load_extension", "warn_once", "FallbackWarning"]


class FallbackWarning(RuntimeWarning):
    """A compiled kernel is unavailable and a slower pure-Python/torch path is used instead."""


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Warn once per process per ``key`` (a sampling loop would otherwise warn every step)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, FallbackWarning, stacklevel=3)


@functools.cache
def load_extension(name: str) -> tuple[ModuleType | None, str]:
    """``(ddpm.<name>, "")`` for ``_C`` / ``_C_cuda``, or ``(None, why)`` when it was not built or does not load."""
    try:
        return importlib.import_module(f"ddpm.{name}"), ""
    except ImportError as e:
        return None, str(e)


def cpu_extension() -> ModuleType | None:
    """ddpm._C, or None when the package was installed without building it."""
    return load_extension("_C")[0]


def cuda_extension() -> ModuleType | None:
    """ddpm._C_cuda when it was built AND its CUDA runtime sees a device, else None."""
    mod = load_extension("_C_cuda")[0]
    return mod if mod is not None and mod.device_count() > 0 else None
