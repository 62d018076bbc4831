"""``ddpm export``: checkpoint -> ONNX (-> TensorRT engine), with metadata and a parity check before anything
is written under the real name.

    export(ckpt="runs/digits/model.safetensors", out="unet.onnx")            # fp32 ONNX, parity at batch 1, 7
    export(ckpt=..., out="unet.onnx", fp16=True)                             # fp16 ONNX, norms kept fp32
    export(ckpt=..., out="unet.trt", batch="1,64,256", precision="fp16")     # TensorRT engine + unet.trt.json

Order of work: validate every argument (cheap, one clear line each) -> check tensorrt + GPU for engine outputs
-> load the checkpoint -> export -> write to a temporary file beside the target -> parity -> rename. A failed
parity check (exit 2) therefore leaves nothing under the real name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddpm.artifacts import EXTENSIONS, artifact_kind, file_sha256, read_metadata, sidecar_path
from ddpm.errors import ArtifactError, InvalidArgumentError
from ddpm.io import atomic_path, check_writable
from ddpm.metadata import schedule_from_meta
from .parity import (
    DEFAULT_BATCHES,
    ParityResult,
    check_parity,
    onnxruntime_sessions,
    ort_runner,
    torch_reference,
)

__all__ = ["ExportReport", "export"]

Log = Callable[[str], None]


@dataclass
class ExportReport:
    """What ``export`` wrote: the file, its kind and precision, its metadata and every parity figure."""

    out: Path
    kind: str
    precision: str
    meta: dict[str, Any]
    parity: list[ParityResult] = field(default_factory=list)
    seconds: float = 0.0


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
    from . import onnx_export, tensorrt_build

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
        batches = tensorrt_build.parse_batches(batch) if batch is not None else DEFAULT_BATCHES
        if ckpt is None:
            raise InvalidArgumentError("--ckpt is required: the checkpoint to export")
        model, meta = load_checkpoint(ckpt)
        report = _export_onnx(model, meta, Path(ckpt), out, opset=opset, fp16=fp16, batches=batches, log=log)
    else:
        if fp16:
            raise InvalidArgumentError(
                "--fp16 is not supported for TensorRT outputs: use --precision fp16 (or bf16) for an engine"
            )
        profile = tensorrt_build.parse_profile(batch if batch is not None else tensorrt_build.DEFAULT_PROFILE)
        prec = tensorrt_build.parse_precision(precision or "fp32")
        hw = tensorrt_build.parse_hardware_compat(hardware_compat)
        if ckpt is None and onnx is None:
            raise InvalidArgumentError(
                "a TensorRT build needs --ckpt (exported to ONNX first) or --onnx FILE"
            )
        if timing_cache is not None:
            check_writable(timing_cache, what="--timing-cache")
        if onnx is not None and artifact_kind(onnx) != "onnx":
            raise InvalidArgumentError(f"--onnx {str(onnx)!r} must be an .onnx file")
        trt = tensorrt_build.require_tensorrt()  # before loading anything heavy
        from .engine_export import export_engine

        model, meta = load_checkpoint(ckpt) if ckpt is not None else (None, None)
        report = export_engine(
            trt, model, meta, Path(ckpt) if ckpt is not None else None, out,
            onnx=Path(onnx) if onnx is not None else None, opset=opset, profile=profile, precision=prec,
            timing_cache=timing_cache, version_compatible=version_compatible, hardware_compat=hw, log=log,
        )  # fmt: skip
    report.seconds = time.perf_counter() - start
    return report


def load_checkpoint(ckpt: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """``(model, meta)`` from a checkpoint file or run folder; refuses ONNX / engine files by name."""
    p = Path(ckpt)
    kind = EXTENSIONS.get(p.suffix.lower())
    if p.is_file() and kind is not None and kind != "checkpoint":
        raise ArtifactError(
            f"{p} is {'a TensorRT engine' if kind == 'tensorrt' else 'an ONNX model'}, not a checkpoint; --ckpt takes "
            "the .safetensors file written by `ddpm train` (or its run folder)"
        )
    from ddpm.checkpoint import load_model

    return load_model(p, device="cpu")


def export_extras(ckpt: Path | None, *, opset: int, precision: str) -> dict[str, str]:
    """Provenance keys added to the checkpoint metadata: exporter versions, opset, precision, source hash."""
    import onnx
    import onnxscript
    import torch

    import ddpm

    extra = {
        "exporter": f"ddpm {ddpm.__version__}",
        "torch_version": str(torch.__version__),
        "onnx_version": str(onnx.__version__),
        "onnxscript_version": str(onnxscript.__version__),
        "onnx_opset": str(opset),
        "precision": precision,
    }
    if ckpt is not None:
        src = ckpt / "model.safetensors" if ckpt.is_dir() else ckpt
        extra["source_checkpoint"] = src.name
        extra["checkpoint_sha256"] = file_sha256(src)
    return extra


def build_onnx(
    model: Any, meta: dict[str, Any], ckpt: Path | None, *, opset: int, precision: str, log: Log
) -> Any:
    """The finished ``onnx.ModelProto`` (traced, converted to fp16/bf16 if asked, metadata set, checked)."""
    from .onnx_export import finalize_onnx, graph_summary, trace_to_onnx

    t0 = time.perf_counter()
    proto = trace_to_onnx(model, meta["sample_shape"], opset=opset)
    if precision in ("fp16", "bf16"):
        from .precision import convert_to_half

        proto = convert_to_half(proto, precision)
    proto = finalize_onnx(proto, meta, export_extras(ckpt, opset=opset, precision=precision))
    log(
        f"exported ONNX opset {proto.opset_import[0].version}, IR {proto.ir_version}, {precision}: "
        f"{graph_summary(proto)} ({time.perf_counter() - t0:.1f} s)"
    )
    return proto


def onnx_parity(
    model_or_path: str | bytes,
    reference: Callable,
    meta: dict[str, Any],
    *,
    precision: str,
    batches,
    log: Log,
    what: str,
) -> list[ParityResult]:
    """onnxruntime (CPU EP, plus CUDA EP when usable) against ``reference`` on fresh random inputs."""
    runners = [(label, ort_runner(s)) for label, s in onnxruntime_sessions(model_or_path)]
    return check_parity(
        runners,
        reference,
        sample_shape=meta["sample_shape"],
        num_timesteps=schedule_from_meta(meta).num_timesteps,
        precision=precision,
        batches=batches,
        log=log,
        what=what,
    )


def _export_onnx(
    model: Any, meta: dict[str, Any], ckpt: Path, out: Path, *, opset: int, fp16: bool, batches, log: Log
) -> ExportReport:
    import onnx

    precision = "fp16" if fp16 else "fp32"
    proto = build_onnx(model, meta, ckpt, opset=opset, precision=precision, log=log)
    with atomic_path(out, what="--out") as tmp:
        onnx.save(proto, str(tmp))
        parity = onnx_parity(
            str(tmp), lambda x, t: torch_reference(model, x, t), meta, precision=precision, batches=batches,
            log=log, what=f"{out} (nothing was written)",
        )  # fmt: skip
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return ExportReport(out, "onnx", precision, read_metadata(out), parity)


@contextlib.contextmanager
def staged_pair(out: Path) -> Iterator[Path]:
    """Yield ``<tmpdir>/<out.name>`` in a private folder beside ``out``; on success move it and its sidecar into
    place (engine first, then sidecar), on error delete both.

    ``runtime.io.atomic_path`` stages one file under a temporary name; an engine must be checked together with
    its sidecar under its real file name (the runtime finds the sidecar by name), hence a staging folder. The
    folder is on the same filesystem, so each move is an atomic rename; the sidecar records the engine's size
    and sha256, so a crash between the two renames is detected when the engine is read.
    """
    check_writable(out, what="--out")
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent or "."))
    try:
        staged = tmpdir / out.name
        yield staged
        os.replace(staged, out)
        os.replace(sidecar_path(staged), sidecar_path(out))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
