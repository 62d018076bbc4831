"""The ONNX stage of ``ddpm export``: trace -> (fp16/bf16) -> metadata -> parity through the runtime's
onnxruntime backend -> rename into place.

Parity runs the file exactly as ``ddpm run`` will (runtime.backends.onnx_backend: IO binding, the CPU provider,
plus the CUDA one when a GPU is usable) against a reference the caller injects (PyTorch in fp32 on the CPU).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ddpm
from ddpm.artifacts import file_sha256, read_metadata
from ddpm.checkpoint import resolve_checkpoint
from ddpm.io import atomic_path

from .common import ExportReport, Log
from .onnx_export import finalize_onnx, graph_summary, trace_to_onnx
from .parity import ParityResult, Runner, backend_runner, check_parity, onnxruntime_backends
from .precision import convert_to_half

__all__ = ["export_extras", "build_onnx", "onnx_parity", "export_onnx"]


def export_extras(
    ckpt: Path | None, *, opset: int, precision: str, meta: dict[str, Any] | None = None
) -> dict[str, str]:
    """Provenance keys added to the checkpoint metadata: exporter versions, opset, precision, source hash (of
    the weight file a diffusers folder's ``meta["source"]`` names, for a folder)."""
    import onnx
    import onnxscript
    import torch

    extra = {
        "exporter": f"ddpm {ddpm.__version__}",
        "torch_version": str(torch.__version__),
        "onnx_version": str(onnx.__version__),
        "onnxscript_version": str(onnxscript.__version__),
        "onnx_opset": str(opset),
        "precision": precision,
    }
    if ckpt is not None:
        source = (meta or {}).get("source", {})
        imported = source.get("format") == "diffusers" and Path(ckpt).is_dir()
        src = Path(ckpt) / source["weights"] if imported else resolve_checkpoint(ckpt)
        extra["source_checkpoint"] = src.name
        extra["checkpoint_sha256"] = file_sha256(src)
    return extra


def build_onnx(
    model: Any, meta: dict[str, Any], ckpt: Path | None, *, opset: int, precision: str, log: Log
) -> Any:
    """The finished ``onnx.ModelProto`` (traced, converted to fp16/bf16 if asked, metadata set, checked)."""
    t0 = time.perf_counter()
    proto = trace_to_onnx(model, meta["sample_shape"], opset=opset)
    if precision in ("fp16", "bf16"):
        proto = convert_to_half(proto, precision)
    proto = finalize_onnx(proto, meta, export_extras(ckpt, opset=opset, precision=precision, meta=meta))
    log(
        f"exported ONNX opset {proto.opset_import[0].version}, IR {proto.ir_version}, {precision}: "
        f"{graph_summary(proto)} ({time.perf_counter() - t0:.1f} s)"
    )
    return proto


def onnx_parity(
    model: str | bytes,
    reference: Runner,
    meta: dict[str, Any],
    *,
    precision: str,
    batches: Sequence[int],
    log: Log,
    what: str,
) -> list[ParityResult]:
    """The runtime's onnxruntime backend (CPU, plus CUDA when usable) against ``reference`` on fresh inputs."""
    with onnxruntime_backends(model, meta) as backends:
        runners = [(label, backend_runner(b)) for label, b in backends]
        return check_parity(
            runners, reference, meta, precision=precision, batches=batches, log=log, what=what
        )


def export_onnx(
    model: Any,
    meta: dict[str, Any],
    ckpt: Path,
    out: Path,
    *,
    reference: Runner,
    opset: int,
    fp16: bool,
    batches: Sequence[int],
    log: Log,
) -> ExportReport:
    """Write ``out`` (fp32, or fp16 with norms kept fp32) after it passes parity against ``reference``."""
    import onnx

    precision = "fp16" if fp16 else "fp32"
    proto = build_onnx(model, meta, ckpt, opset=opset, precision=precision, log=log)
    with atomic_path(out, what="--out") as tmp:
        onnx.save(proto, str(tmp))
        parity = onnx_parity(
            str(tmp), reference, meta, precision=precision, batches=batches, log=log,
            what=f"{out} (nothing was written)",
        )  # fmt: skip
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return ExportReport(out, "onnx", precision, read_metadata(out), parity)
