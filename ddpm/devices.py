"""Where work runs: the one device resolver, CPU thread count, GPU facts, and the one TensorRT import.

The runtime (backends), the exporter (parity, engine builds) and the benchmarks all ask the same questions —
"which device does ``auto`` mean", "which GPU is this", "is TensorRT here" — so the answers live in the core,
once. torch and tensorrt are imported inside the functions: ``ddpm --help`` must not load either.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from .errors import InvalidArgumentError, MissingDependencyError

if TYPE_CHECKING:
    import torch

__all__ = [
    "TENSORRT_INSTALL_HINT",
    "MIN_TENSORRT_MAJOR",
    "resolve_device",
    "same_device",
    "default_cpu_threads",
    "gpu_facts",
    "find_tensorrt",
    "import_tensorrt",
    "tensorrt_logger",
]

# The one install hint for TensorRT. It names the package itself, which installs the same way from a source
# checkout and from a wheel ("ddpm[trt]" resolves only where ddpm comes from an index); a checkout can also use
# its own extra. The checkout is recognised by its pyproject.toml beside the package (editable installs).
_CHECKOUT = Path(__file__).resolve().parents[1]
TENSORRT_INSTALL_HINT = (
    'install it on a machine with an NVIDIA GPU and driver: pip install "tensorrt>=10" '
    + (
        f'(or, in this source checkout {_CHECKOUT}: pip install -e ".[trt]")'
        if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "csrc").is_dir()
        else "(what the ddpm[trt] extra installs)"
    )
)
# TensorRT 10 is the first with named IO tensors everywhere (set_tensor_address + execute_async_v3), the only
# API the backend and the builder use (docs/design.md, "Environment facts").
MIN_TENSORRT_MAJOR = 10


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda when torch sees a GPU, else cpu; ``cpu``; ``cuda`` / ``cuda:N`` (checked to exist)."""
    import torch

    spec = str(device) if isinstance(device, torch.device) else str(device).strip().lower()
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec != "cuda" and not spec.startswith("cuda:"):
        raise InvalidArgumentError(f"unknown device {device!r}; allowed: auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise InvalidArgumentError(
            f"device {spec!r} requested but torch sees no CUDA GPU (torch.cuda.is_available() is False, "
            f"torch {torch.__version__}); use --device cpu or --device auto"
        )
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise InvalidArgumentError(f"bad device {spec!r}; allowed: auto, cpu, cuda, cuda:N") from None
    index = 0 if dev.index is None else dev.index
    count = torch.cuda.device_count()
    if index >= count:
        raise InvalidArgumentError(f"device {spec!r}: only {count} CUDA device(s) visible (0..{count - 1})")
    return torch.device("cuda", index)


def same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:0 are the same device when 0 is the current one."""
    import torch

    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    cur = torch.cuda.current_device()
    return (a.index if a.index is not None else cur) == (b.index if b.index is not None else cur)


def default_cpu_threads() -> int:
    """Threads for CPU inference: the cores this process may run on (cgroup/affinity aware, unlike cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def gpu_facts(device: int | torch.device = 0) -> tuple[str, str]:
    """(GPU name, compute capability ``"major.minor"``): what an engine is built for and checked against."""
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


def find_tensorrt() -> tuple[ModuleType | None, str]:
    """``(tensorrt, "")``, or ``(None, why)`` when it is not importable; MissingDependencyError when too old."""
    try:
        import tensorrt
    except ImportError as e:
        return None, str(e)
    version = str(getattr(tensorrt, "__version__", "0"))
    major = int(version.split(".")[0] or 0)
    if major < MIN_TENSORRT_MAJOR:
        raise MissingDependencyError(
            f"TensorRT {version} is too old for ddpm (needs >= {MIN_TENSORRT_MAJOR}); {TENSORRT_INSTALL_HINT}"
        )
    return tensorrt, ""


def import_tensorrt(purpose: str = "the tensorrt backend") -> ModuleType:
    """The ``tensorrt`` module, or MissingDependencyError saying that ``purpose`` needs it, with the hint."""
    trt, why = find_tensorrt()
    if trt is None:
        raise MissingDependencyError(f"{purpose} needs the tensorrt package ({why}); {TENSORRT_INSTALL_HINT}")
    return trt


def tensorrt_logger(trt: ModuleType) -> object:
    """A TensorRT logger that keeps its errors (``.errors``, for our one-line message) instead of printing them;
    under ``DDPM_DEBUG=1`` it prints warnings and errors to stderr as TensorRT's own logger would.

    TensorRT's ``trt.Logger`` writes straight to stderr, so a failing deserialisation or parse would show its
    lines before ours (issue: foreign runtimes' logs); subclassing ``trt.ILogger`` is TensorRT's documented way
    to route them."""
    debug = os.environ.get("DDPM_DEBUG") == "1"
    error, warning = int(trt.ILogger.Severity.ERROR), int(trt.ILogger.Severity.WARNING)

    class _Logger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: object, msg: str) -> None:
            level = int(severity)  # type: ignore[call-overload]
            if level <= error:
                self.errors.append(str(msg))
            if debug and level <= warning:
                print(f"[tensorrt] {msg}", file=sys.stderr)

    return _Logger()
