"""The TensorRT stage of ``ddpm export``: fp32 ONNX (exported now or ``--onnx``) -> precision -> engine + sidecar
-> parity through the runtime's own TensorRT backend -> rename into place.

Parity runs the engine exactly as ``ddpm run`` will (runtime.backends.tensorrt_backend: sidecar checks,
``set_tensor_address`` + ``execute_async_v3``) against PyTorch in fp32 on the CPU (the injected reference), or
against the runtime's onnxruntime backend on the CPU when only ``--onnx`` was given, at the profile's MIN, OPT,
MAX (and 7 when inside the profile). Needs tensorrt and an NVIDIA GPU; :func:`ddpm.export.pipeline.export`
checks both before calling in.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddpm.artifacts import read_metadata, sidecar_path
from ddpm.devices import gpu_facts, resolve_device
from ddpm.errors import ArtifactError, InvalidArgumentError
from ddpm.metadata import decode_metadata
from ddpm.runtime.backends import OnnxRuntimeBackend, TensorRTBackend

from .common import ExportReport, Log, staged_pair, write_synced
from .onnx_stage import build_onnx, onnx_parity
from .parity import DEFAULT_BATCHES, Runner, backend_runner, check_parity
from .precision import convert_to_half
from .tensorrt_build import BatchProfile, build_serialized_engine, make_sidecar

__all__ = ["EngineOptions", "export_engine"]


@dataclass(frozen=True)
class EngineOptions:
    """The TensorRT build settings, parsed and validated by the pipeline."""

    profile: BatchProfile
    precision: str
    timing_cache: str | os.PathLike | None = None
    version_compatible: bool = False
    hardware_compat: str | None = None


def _fp32_onnx(model: Any, meta: dict[str, Any] | None, ckpt: Path | None, onnx_path: Path | None, *,
               reference: Runner | None, opset: int, log: Log) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """(fp32 ModelProto, its metadata): from ``--onnx`` (verified) or freshly exported and parity-checked."""
    import onnx

    if onnx_path is not None:
        onnx_meta = read_metadata(onnx_path, verify=True)
        if onnx_meta.get("precision", "fp32") != "fp32":
            raise InvalidArgumentError(
                f"--onnx {onnx_path} is a {onnx_meta['precision']} export; give the fp32 ONNX file "
                "(the engine's precision is set by --precision)"
            )
        if meta is not None and (onnx_meta["model"], onnx_meta["sample_shape"]) != (
            meta["model"],
            meta["sample_shape"],
        ):
            raise ArtifactError(f"--onnx {onnx_path} and --ckpt describe different models (configs differ)")
        log(f"building from {onnx_path} (weights verified against its metadata)")
        return onnx.load(str(onnx_path)), onnx_meta
    assert model is not None and meta is not None and reference is not None  # the pipeline checked --ckpt
    proto = build_onnx(model, meta, ckpt, opset=opset, precision="fp32", log=log)
    onnx_parity(
        proto.SerializeToString(), reference, meta, precision="fp32", batches=DEFAULT_BATCHES, log=log,
        what="the ONNX graph the engine is built from",
    )  # fmt: skip
    props = {e.key: e.value for e in proto.metadata_props}
    return proto, decode_metadata(props, source="exported ONNX graph")


@contextlib.contextmanager
def _reference(reference: Runner | None, proto32: Any, meta: dict[str, Any]) -> Iterator[tuple[Runner, str]]:
    """(runner, label): the injected PyTorch reference, or the runtime's onnxruntime backend on the CPU."""
    if reference is not None:
        yield reference, "PyTorch"
        return
    with OnnxRuntimeBackend(proto32.SerializeToString(), resolve_device("cpu"), meta=meta) as backend:
        yield backend_runner(backend), "onnxruntime[cpu]"


def _build(
    trt: Any, graph: Any, meta: dict[str, Any], opts: EngineOptions, log: Log
) -> tuple[bytes, dict[str, Any]]:
    """(serialized engine, sidecar) for the CUDA device the engine is built and checked on."""
    gpu_name, cc = gpu_facts(resolve_device("cuda"))
    if opts.hardware_compat == "ampere+" and tuple(int(v) for v in cc.split(".")) < (8, 0):
        raise InvalidArgumentError(
            f"--hardware-compat ampere+ needs an Ampere or newer GPU to build on; {gpu_name} is sm {cc}"
        )
    t0 = time.perf_counter()
    engine = build_serialized_engine(
        trt, graph.SerializeToString(), sample_shape=meta["sample_shape"], profile=opts.profile,
        precision=opts.precision, timing_cache=opts.timing_cache, version_compatible=opts.version_compatible,
        hardware_compat=opts.hardware_compat, log=log,
    )  # fmt: skip
    log(
        f"built TensorRT {trt.__version__} engine for {gpu_name} (compute capability {cc}), {opts.precision}, "
        f"batch profile {opts.profile}: {len(engine) / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s"
    )
    sidecar = make_sidecar(
        meta, engine=engine, trt_version=trt.__version__, gpu_name=gpu_name, compute_capability=cc,
        precision=opts.precision, profile=opts.profile, version_compatible=opts.version_compatible,
        hardware_compat=opts.hardware_compat,
    )  # fmt: skip
    return engine, sidecar


def export_engine(
    trt: Any,
    model: Any,
    meta: dict[str, Any] | None,
    ckpt: Path | None,
    out: Path,
    *,
    onnx: Path | None,
    opset: int,
    opts: EngineOptions,
    reference: Runner | None,
    log: Log,
) -> ExportReport:
    """Build, check and write ``out`` and ``out.json``; see the module docstring."""
    proto32, onnx_meta = _fp32_onnx(model, meta, ckpt, onnx, reference=reference, opset=opset, log=log)
    graph = convert_to_half(proto32, opts.precision) if opts.precision in ("fp16", "bf16") else proto32
    engine, sidecar = _build(trt, graph, onnx_meta, opts, log)
    batches = opts.profile.parity_batches()
    with _reference(reference, proto32, onnx_meta) as (ref, ref_name), staged_pair(out) as staged:
        log(f"parity: TensorRT engine against {ref_name} (fp32) at batch {', '.join(map(str, batches))}")
        write_synced(staged, engine)
        write_synced(sidecar_path(staged), (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode())
        with TensorRTBackend(staged, resolve_device("cuda")) as backend:
            parity = check_parity(
                [("tensorrt", backend_runner(backend))], ref, onnx_meta, precision=opts.precision,
                batches=batches, log=log, what=f"{out} (nothing was written)",
            )  # fmt: skip
    log(f"wrote {out} ({len(engine) / 1e6:.1f} MB) and its sidecar {sidecar_path(out).name}")
    return ExportReport(out, "tensorrt", opts.precision, read_metadata(out, verify=True), parity)
