"""``ddpm info FILE``: what an artifact is and the metadata it carries, as a table or JSON.

Everything is read through ddpm.artifacts (the same code the runtime uses), with the integrity checks on:
an ONNX file's initializers are hashed against ``weights_sha256``, an engine against its sidecar's
``engine_sha256`` — so an edited or truncated file is reported, not described. A diffusers folder is read
through its adapter (ddpm/diffusers_folder.py): the metadata it maps to, and which weight file (EMA or main)
the runtime would load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ddpm.artifacts import artifact_kind, load_onnx, onnx_metadata, read_metadata, sidecar_path
from ddpm.diffusers_folder import MODEL_INDEX, read_folder

__all__ = ["describe", "format_table"]

# Shown first, in this order; everything else follows alphabetically.
_ORDER = (
    "format",
    "model",
    "sample_shape",
    "schedule",
    "prediction",
    "dataset",
    "step",
    "ema_decay",
    "variance",
    "classes",
    "sampling",
    "source",
    "precision",
)


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """``{"file", "kind", "bytes", "file_facts", "metadata"}`` for a checkpoint, ONNX file, engine (+ sidecar) or
    diffusers folder (``bytes``: its weight file's).

    Raises ArtifactError (one line) for a missing, truncated, corrupt or edited file.
    """
    p = Path(path)
    kind = artifact_kind(p)
    facts: dict[str, Any] = {}
    size = p.stat().st_size if kind != "diffusers" else 0
    if kind == "diffusers":
        folder = read_folder(p)
        meta, size = folder.meta, folder.weights.stat().st_size
        facts = {
            "layout": "pipeline" if (p / MODEL_INDEX).is_file() else "model folder",
            "weights": folder.weights.relative_to(p).as_posix(),
            "weights_kind": folder.weights_kind,
        }
    elif kind == "onnx":
        model = load_onnx(p)
        meta = onnx_metadata(model, source=str(p), verify=True)
        facts = {
            "ir_version": model.ir_version,
            "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
            "inputs": {i.name: _onnx_shape(i) for i in model.graph.input},
            "outputs": {o.name: _onnx_shape(o) for o in model.graph.output},
            "nodes": len(model.graph.node),
            "weights_verified": True,
        }
    elif kind == "tensorrt":
        meta = read_metadata(p, verify=True)
        facts = {"sidecar": sidecar_path(p).name, "engine_verified": "engine_sha256" in meta}
    else:
        meta = read_metadata(p)
    return {"file": str(p), "kind": kind, "bytes": size, "file_facts": facts, "metadata": meta}


def _onnx_shape(value_info: Any) -> str:
    tt = value_info.type.tensor_type
    from onnx import TensorProto

    dims = [d.dim_param or str(d.dim_value) for d in tt.shape.dim]
    return f"{TensorProto.DataType.Name(tt.elem_type).lower()} [{', '.join(dims)}]"


def _short(value: Any, width: int = 96) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= width else f"{text[: width - 20]}... ({len(text)} chars)"


def format_table(info: dict[str, Any]) -> str:
    """A two-column, human-readable rendering of :func:`describe`'s result."""
    rows: list[tuple[str, str]] = [
        ("file", info["file"]),
        ("kind", info["kind"]),
        ("size", f"{info['bytes'] / 1e6:.2f} MB ({info['bytes']} bytes)"),
    ]
    rows += [(k, _short(v)) for k, v in info["file_facts"].items()]
    meta = info["metadata"]
    keys = [k for k in _ORDER if k in meta] + sorted(k for k in meta if k not in _ORDER)
    for k in keys:
        v = meta[k]
        if k == "classes" and isinstance(v, dict):
            v = {sub: v.get(sub) for sub in ("count", "names", "p_uncond", "null")}
        if isinstance(v, dict) and k in ("model", "schedule", "profile", "sampling", "source", "classes"):
            rows += [(f"{k}.{sub}", _short(sv)) for sub, sv in v.items()]
        else:
            rows.append((k, _short(v)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
