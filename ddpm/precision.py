"""The network's arithmetic precision (fp32 | bf16 | fp16) and whether this CPU runs bf16 natively.

Precision is a property of the forward pass only: the update kernel, x and the noise stay float32 whatever the
network runs in (every backend hands the loop a float32 output). On CPU, bf16 pays off only with native bf16
dot products (AVX512-BF16 or AMX); without them the runtimes emulate it, slower than fp32, so a bf16 CPU run on
such a machine is refused rather than quietly slow.
"""

from __future__ import annotations

import functools
from enum import Enum

from .errors import InvalidArgumentError

__all__ = [
    "Precision",
    "parse_precision",
    "artifact_precision",
    "cpu_flags",
    "cpu_has_bf16",
    "require_cpu_bf16",
]

# /proc/cpuinfo flags that mean native bf16 dot products (either is enough for oneDNN's bf16 kernels)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


class Precision(str, Enum):
    """The forward pass's arithmetic: float32, bfloat16 (fp32 range, 8-bit mantissa) or float16."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"

    def __str__(self) -> str:
        return self.value

    @property
    def reduced(self) -> bool:
        return self is not Precision.FP32


def parse_precision(value: Precision | str | None) -> Precision | None:
    """``"bf16"`` -> Precision.BF16; None stays None (the artifact's own precision)."""
    if value is None or isinstance(value, Precision):
        return value
    try:
        return Precision(str(value).strip().lower())
    except ValueError:
        allowed = ", ".join(p.value for p in Precision)
        raise InvalidArgumentError(f"unknown precision {value!r}; allowed: {allowed}") from None


def artifact_precision(meta: dict) -> Precision:
    """The precision an artifact was written in (metadata key ``precision``; absent means fp32). A TensorRT
    ``tf32`` engine counts as fp32: float32 storage, only its matmuls round the inputs to 10 mantissa bits."""
    value = str(meta.get("precision", "fp32")).lower()
    return Precision.FP32 if value == "tf32" else parse_precision(value)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str] | None:
    """The first CPU's feature flags from /proc/cpuinfo, or None where there is no such file (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        return None
    return frozenset()


def cpu_has_bf16(flags: frozenset[str] | None = None) -> bool | None:
    """True / False from the CPU flags; None when they cannot be read (the caller may ask its runtime)."""
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return None
    return any(f in flags for f in BF16_FLAGS)


def require_cpu_bf16(runtime: str, runtime_says: bool | None = None) -> None:
    """InvalidArgumentError unless this CPU runs bf16 natively. ``runtime_says``: the runtime's own answer,
    used only where the flags cannot be read."""
    native = cpu_has_bf16()
    if native is None:
        native = bool(runtime_says)
    if not native:
        raise InvalidArgumentError(
            f"--precision bf16 on CPU ({runtime}) needs native bf16 (AVX512-BF16 or AMX: "
            f"{' / '.join(BF16_FLAGS)} in /proc/cpuinfo), which this CPU lacks; use --precision fp32"
        )
