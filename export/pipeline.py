"""``ddpm export``: checkpoint -> ONNX (-> TensorRT engine), with metadata and a parity check before anything
is written under the real name.

    export(ckpt="runs/digits/model.safetensors", out="unet.onnx")            # fp32 ONNX, parity at batch 1, 7
    export(ckpt=..., out="unet.onnx", fp16=True)                             # fp16 ONNX, norms kept fp32
    export(ckpt=..., out="unet.trt", batch="1,64,256", precision="fp16")     # TensorRT engine + unet.trt.json

Order of work: validate every argument (cheap, one clear line each) -> check tensorrt + GPU for engine outputs
-> load the checkpoint -> dispatch to the ONNX stage (onnx_stage.py) or the engine stage (engine_stage.py), which
write to a temporary file beside the target, check parity, then rename. A failed parity check (exit 2) therefore
leaves nothing under the real name. This module only validates and dispatches; the PyTorch parity reference
is built here and handed to the stages.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

from ddpm.artifacts import EXTENSIONS, artifact_kind
from ddpm.checkpoint import load_model
from ddpm.errors import ArtifactError, InvalidArgumentError
from ddpm.io import check_writable

from . import onnx_export, tensorrt_build
from .common import ExportReport, Log
from .engine_stage import EngineOptions, export_engine
from .onnx_stage import export_onnx
from .parity import DEFAULT_BATCHES, Runner, torch_reference

__all__ = ["ExportReport", "export", "load_checkpoint"]


def export(
    ckpt: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    onnx: str | os.PathLike | None = None,
    opset: int | None = None,
    fp16: bool = False,
    batch: str | None = None,
    precision: str | None = None,
    timing_cache: str | os.PathLike | None = None,
    version_compatible: bool = False,
    hardware_compat: str | None = None,
    log: Log | None = None,
) -> ExportReport:
    """Export a checkpoint to ``out`` (``.onnx``, or ``.trt`` / ``.engine`` / ``.plan`` for TensorRT).

    ONNX: ``batch`` lists the parity batch sizes (default 1,7), ``fp16`` writes the half-precision variant.
    TensorRT: ``batch`` is the profile MIN,OPT,MAX (default 1,64,256), ``precision`` fp32|tf32|fp16|bf16,
    ``onnx`` builds from an existing fp32 ONNX export instead of re-exporting ``ckpt`` (then ``ckpt`` is
    optional and parity is checked against onnxruntime instead of PyTorch).
    Raises InvalidArgumentError / ArtifactError / MissingDependencyError / ParityError (one line each).
    """
    log = log or (lambda _msg: None)
    start = time.perf_counter()
    out = Path(out)
    kind = EXTENSIONS.get(out.suffix.lower())
    if kind not in ("onnx", "tensorrt"):
        raise InvalidArgumentError(
            f"--out {str(out)!r} has the extension {out.suffix or '(none)'!r}; export writes .onnx (ONNX) or "
            ".trt / .engine / .plan (TensorRT engine)"
        )
    check_writable(out, what="--out")
    opset = onnx_export.check_opset(onnx_export.OPSET if opset is None else opset)
    if kind == "onnx":
        trt_only = onnx, precision, timing_cache, version_compatible, hardware_compat
        batches = _onnx_batches(batch, *trt_only)
        if ckpt is None:
            raise InvalidArgumentError("--ckpt is required: the checkpoint to export")
        model, meta = load_checkpoint(ckpt)
        report = export_onnx(
            model, meta, Path(ckpt), out, reference=_reference(model), opset=opset, fp16=fp16, batches=batches,
            log=log,
        )  # fmt: skip
    else:
        opts = _engine_options(
            batch, precision, ckpt=ckpt, onnx=onnx, fp16=fp16, timing_cache=timing_cache,
            version_compatible=version_compatible, hardware_compat=hardware_compat,
        )  # fmt: skip
        trt = tensorrt_build.require_tensorrt()  # before loading anything heavy
        model, meta = load_checkpoint(ckpt) if ckpt is not None else (None, None)
        report = export_engine(
            trt, model, meta, Path(ckpt) if ckpt is not None else None, out,
            onnx=Path(onnx) if onnx is not None else None, opset=opset, opts=opts,
            reference=_reference(model) if model is not None else None, log=log,
        )  # fmt: skip
    report.seconds = time.perf_counter() - start
    return report


def _reference(model: Any) -> Runner:
    # Looked up at call time, so a test can swap in a deliberately wrong reference (tests/test_export.py).
    return functools.partial(torch_reference, model)


def _onnx_batches(
    batch: str | None,
    onnx: str | os.PathLike | None,
    precision: str | None,
    timing_cache: str | os.PathLike | None,
    version_compatible: bool,
    hardware_compat: str | None,
) -> tuple[int, ...]:
    """The ONNX export's parity batch sizes, after refusing the TensorRT-only options."""
    if onnx is not None:
        raise InvalidArgumentError(
            "--onnx is the input of a TensorRT build; with an .onnx --out, give --ckpt only"
        )
    if precision is not None:
        raise InvalidArgumentError(
            "--precision is for TensorRT engines; an ONNX export takes --fp16 (or nothing)"
        )
    if timing_cache is not None or version_compatible or hardware_compat is not None:
        raise InvalidArgumentError(
            "--timing-cache / --version-compatible / --hardware-compat are for TensorRT engines"
        )
    return tensorrt_build.parse_batches(batch) if batch is not None else DEFAULT_BATCHES


def _engine_options(
    batch: str | None,
    precision: str | None,
    *,
    ckpt: str | os.PathLike | None,
    onnx: str | os.PathLike | None,
    fp16: bool,
    timing_cache: str | os.PathLike | None,
    version_compatible: bool,
    hardware_compat: str | None,
) -> EngineOptions:
    """The TensorRT build settings, every one validated before tensorrt is imported."""
    if fp16:
        raise InvalidArgumentError(
            "--fp16 is not supported for TensorRT outputs: use --precision fp16 (or bf16) for an engine"
        )
    profile = tensorrt_build.parse_profile(batch if batch is not None else tensorrt_build.DEFAULT_PROFILE)
    prec = tensorrt_build.parse_precision(precision or "fp32")
    hw = tensorrt_build.parse_hardware_compat(hardware_compat)
    if ckpt is None and onnx is None:
        raise InvalidArgumentError("a TensorRT build needs --ckpt (exported to ONNX first) or --onnx FILE")
    if timing_cache is not None:
        check_writable(timing_cache, what="--timing-cache")
    if onnx is not None and artifact_kind(onnx) != "onnx":
        raise InvalidArgumentError(f"--onnx {str(onnx)!r} must be an .onnx file")
    return EngineOptions(profile, prec, timing_cache, version_compatible, hw)


def load_checkpoint(ckpt: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """``(model, meta)`` from a checkpoint file, run folder or diffusers folder; refuses ONNX / engine files by
    name."""
    p = Path(ckpt)
    kind = EXTENSIONS.get(p.suffix.lower())
    if p.is_file() and kind is not None and kind != "checkpoint":
        raise ArtifactError(
            f"{p} is {'a TensorRT engine' if kind == 'tensorrt' else 'an ONNX model'}, not a checkpoint; --ckpt takes "
            "the .safetensors file written by `ddpm train` (or its run folder)"
        )
    return load_model(p, device="cpu")
