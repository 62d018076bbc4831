"""What is installed and how the extension was built (for `ddpm version`, bench JSON and bug reports)."""

from __future__ import annotations

import importlib
import platform

from .extension import load_extension


def _version(mod: str) -> str:
    try:
        return getattr(importlib.import_module(mod), "__version__", "?")
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return "not installed"


def build_facts() -> dict[str, str]:
    facts: dict[str, str] = {"python": platform.python_version(), "machine": platform.machine()}
    for mod in ("ddpm", "torch", "numpy", "onnx", "onnxruntime", "tensorrt"):
        facts[mod] = _version(mod)
    cpu, why = load_extension("_C")
    if cpu is None:
        facts["_C"] = f"not built ({why})"
    else:
        info = cpu.build_info()
        facts["_C"] = (
            f"{info['compiler']}, OpenMP {'on' if info['openmp'] else 'off'} ({info['max_threads']} threads), "
            f"SIMD {info.get('simd', '?')}"
        )
    cuda, _ = load_extension("_C_cuda")
    if cuda is None:
        facts["_C_cuda"] = "not built (no CUDA compiler at build time)"
    else:
        facts["_C_cuda"] = f"{cuda.build_info()['cuda_compiler']}, {cuda.device_count()} device(s) visible"
    return facts
