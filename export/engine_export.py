"""The TensorRT half of ``ddpm export``: fp32 ONNX (exported now or ``--onnx``) -> precision -> engine + sidecar
-> parity through the runtime's own TensorRT backend -> rename into place.

Parity runs the engine exactly as ``ddpm run`` will (runtime.backends.tensorrt_backend: sidecar checks,
``set_tensor_address`` + ``execute_async_v3``) against PyTorch in fp32 on the CPU, or against onnxruntime's CPU
provider when only ``--onnx`` was given, at the profile's MIN, OPT, MAX (and 7 when inside the profile).
Needs tensorrt and an NVIDIA GPU; :func:`ddpm.export.pipeline.export` checks both before calling in.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ddpm.artifacts import read_metadata, sidecar_path
from ddpm.errors import ArtifactError, InvalidArgumentError
from ddpm.metadata import decode_metadata, schedule_from_meta
from .parity import DEFAULT_BATCHES, check_parity, onnxruntime_sessions, ort_runner, torch_reference
from .pipeline import ExportReport, Log, build_onnx, onnx_parity, staged_pair
from .tensorrt_build import BatchProfile, build_serialized_engine, gpu_facts, make_sidecar

__all__ = ["export_engine"]


def _fp32_onnx(model: Any, meta: dict[str, Any] | None, ckpt: Path | None, onnx_path: Path | None, *, opset: int,
               log: Log) -> tuple[Any, dict[str, Any]]:  # fmt: skip
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
    proto = build_onnx(model, meta, ckpt, opset=opset, precision="fp32", log=log)
    onnx_parity(
        proto.SerializeToString(), lambda x, t: torch_reference(model, x, t), meta, precision="fp32",
        batches=DEFAULT_BATCHES, log=log, what="the ONNX graph the engine is built from",
    )  # fmt: skip
    props = {e.key: e.value for e in proto.metadata_props}
    return proto, decode_metadata(props, source="exported ONNX graph")


def export_engine(
    trt: Any,
    model: Any,
    meta: dict[str, Any] | None,
    ckpt: Path | None,
    out: Path,
    *,
    onnx: Path | None,
    opset: int,
    profile: BatchProfile,
    precision: str,
    timing_cache: str | os.PathLike | None,
    version_compatible: bool,
    hardware_compat: str | None,
    log: Log,
) -> ExportReport:
    """Build, check and write ``out`` and ``out.json``; see the module docstring."""
    import torch

    proto32, onnx_meta = _fp32_onnx(model, meta, ckpt, onnx, opset=opset, log=log)
    graph = proto32
    if precision in ("fp16", "bf16"):
        from .precision import convert_to_half

        graph = convert_to_half(proto32, precision)

    gpu_name, cc = gpu_facts()
    if hardware_compat == "ampere+" and tuple(int(v) for v in cc.split(".")) < (8, 0):
        raise InvalidArgumentError(
            f"--hardware-compat ampere+ needs an Ampere or newer GPU to build on; {gpu_name} is sm {cc}"
        )
    t0 = time.perf_counter()
    engine = build_serialized_engine(
        trt, graph.SerializeToString(), sample_shape=onnx_meta["sample_shape"], profile=profile, precision=precision,
        timing_cache=timing_cache, version_compatible=version_compatible, hardware_compat=hardware_compat, log=log,
    )  # fmt: skip
    log(
        f"built TensorRT {trt.__version__} engine for {gpu_name} (compute capability {cc}), {precision}, "
        f"batch profile {profile}: {len(engine) / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s"
    )
    sidecar = make_sidecar(
        onnx_meta, engine=engine, trt_version=trt.__version__, gpu_name=gpu_name, compute_capability=cc,
        precision=precision, profile=profile, version_compatible=version_compatible, hardware_compat=hardware_compat,
    )  # fmt: skip

    if model is not None:
        reference, ref_name = (lambda x, t: torch_reference(model, x, t)), "PyTorch"
    else:
        ((_, session),) = onnxruntime_sessions(proto32.SerializeToString())[:1]
        reference, ref_name = ort_runner(session), "onnxruntime[cpu]"
    log(
        f"parity: TensorRT engine against {ref_name} (fp32) at batch {', '.join(map(str, profile.parity_batches()))}"
    )

    from ..runtime.backends.tensorrt_backend import TensorRTBackend

    device = torch.device("cuda", torch.cuda.current_device())
    with staged_pair(out) as staged:
        _write_synced(staged, engine)
        _write_synced(sidecar_path(staged), (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode())
        with TensorRTBackend(staged, device) as backend:

            def run(x, t):
                y = backend(torch.from_numpy(x).to(device), torch.from_numpy(t).to(device))
                return y.float().cpu().numpy()  # copies: the backend reuses its output buffer

            parity = check_parity(
                [("tensorrt", run)], reference, sample_shape=onnx_meta["sample_shape"],
                num_timesteps=schedule_from_meta(onnx_meta).num_timesteps, precision=precision,
                batches=profile.parity_batches(), log=log, what=f"{out} (nothing was written)",
            )  # fmt: skip
    log(f"wrote {out} ({len(engine) / 1e6:.1f} MB) and its sidecar {sidecar_path(out).name}")
    return ExportReport(out, "tensorrt", precision, read_metadata(out, verify=True), parity)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
