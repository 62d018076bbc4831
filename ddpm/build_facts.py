"""What is installed and how the extension was built (for `ddpm version`, bench JSON and bug reports)."""

from __future__ import annotations

import importlib
import platform


def _version(mod: str) -> str:
    try:
        return getattr(importlib.import_module(mod), "__version__", "?")
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return "not installed"


def build_facts() -> dict[str, str]:
    facts: dict[str, str] = {"python": platform.python_version(), "machine": platform.machine()}
    for mod in ("ddpm", "torch", "numpy", "onnx", "onnxruntime", "tensorrt"):
        facts[mod] = _version(mod)
    try:
        from ddpm import _C

        info = _C.build_info()
        facts["_C"] = (
            f"{info['compiler']}, OpenMP {'on' if info['openmp'] else 'off'} ({info['max_threads']} threads), "
            f"SIMD {info.get('simd', '?')}"
        )
    except ImportError as e:
        facts["_C"] = f"not built ({e})"
    try:
        from ddpm import _C_cuda

        facts["_C_cuda"] = (
            f"{_C_cuda.build_info()['cuda_compiler']}, {_C_cuda.device_count()} device(s) visible"
        )
    except ImportError:
        facts["_C_cuda"] = "not built (no CUDA compiler at build time)"
    return facts
