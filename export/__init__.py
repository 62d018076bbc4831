"""ddpm.export: checkpoint -> ONNX -> TensorRT engine, with artifact metadata and parity checks.

    from ddpm.export import export
    report = export("runs/digits/model.safetensors", "unet.onnx")   # parity at batch 1 and 7 before writing

Names are imported lazily: ``ddpm.export.cli`` (loaded for ``ddpm --help``) must not pull in torch or onnx, so
it reaches :func:`export` through this table, at call time.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "export": "ddpm.export.pipeline",
    "ExportReport": "ddpm.export.common",
    "describe": "ddpm.export.info",
    "format_table": "ddpm.export.info",
    "convert_to_half": "ddpm.export.precision",
    "ParityError": "ddpm.export.parity",
    "ParityResult": "ddpm.export.parity",
    "TOLERANCES": "ddpm.export.parity",
    "import_diffusers": "ddpm.export.importer",
    "ImportReport": "ddpm.export.importer",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'ddpm.export' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
