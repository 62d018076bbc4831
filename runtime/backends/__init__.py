"""Backends: one base class for every way of evaluating the denoiser, ``backend(x, t[, y]) -> model_output``.

    with open_backend("unet.onnx", device="auto") as backend:   # torch | onnxruntime | tensorrt
        m = backend(x, t)          # x [N, *sample_shape] float32, t [N] int64 ORIGINAL timesteps, on backend.device
        m = backend(x, t, y)       # a class-conditional artifact (backend.classes): y [N] int64, its classes

The artifact decides the backend: a checkpoint (``.safetensors``) or a diffusers folder (converted by
ddpm/diffusers_folder.py into the same native network) runs in PyTorch, an ONNX file in
onnxruntime (or OpenVINO: ``runtime="openvino"``, CPU only), a TensorRT engine in TensorRT. ``precision``
(fp32 | bf16 | fp16, default: the artifact's own) is checked here, once, against the runtime, the device and the
file: bf16 on CPU through OpenVINO or torch autocast, fp16/bf16 on CUDA through an fp16 export, a TensorRT
engine of that precision, or torch autocast. Every backend is a :class:`Backend` (base.py): the public call checks
the inputs once, the subclass only infers. onnxruntime and tensorrt are imported when a backend is opened
(Polygraphy's habit; openvino too), so a missing optional package is one clear message and costs nothing until then.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ddpm.artifacts import artifact_kind, read_metadata
from ddpm.devices import default_cpu_threads, resolve_device
from ddpm.diffusers_folder import is_diffusers_folder
from ddpm.errors import ArtifactError, InvalidArgumentError
from ddpm.precision import Precision, artifact_precision, parse_precision

from .base import Backend, BackendClosedError, check_call, check_classes
from .onnx_backend import OnnxRuntimeBackend
from .openvino_backend import OpenVINOBackend, require_cpu
from .tensorrt_backend import TensorRTBackend
from .torch_backend import TorchBackend

__all__ = [
    "Backend",
    "BackendClosedError",
    "BACKEND_FOR_KIND",
    "OnnxRuntimeBackend",
    "OpenVINOBackend",
    "Precision",
    "RUNTIMES",
    "TensorRTBackend",
    "TorchBackend",
    "check_call",
    "check_classes",
    "default_cpu_threads",
    "open_backend",
    "parse_runtime",
    "resolve_device",
]

# artifact kind (ddpm.artifacts) -> backend name
BACKEND_FOR_KIND = {
    "checkpoint": "torch",
    "diffusers": "torch",
    "onnx": "onnxruntime",
    "tensorrt": "tensorrt",
}
# artifact kind -> the runtimes that can run it, the default first
RUNTIMES = {
    "checkpoint": ("torch",),
    "diffusers": ("torch",),
    "onnx": ("onnxruntime", "openvino"),
    "tensorrt": ("tensorrt",),
}


def parse_runtime(runtime: str | None, kind: str, path: Path) -> str:
    """The runtime for an artifact: None / "auto" -> the kind's default; otherwise one that can run it."""
    if runtime is None or str(runtime).strip().lower() == "auto":
        return RUNTIMES[kind][0]
    name = str(runtime).strip().lower()
    known = [r for rs in RUNTIMES.values() for r in rs]
    if name not in known:
        raise InvalidArgumentError(f"unknown runtime {runtime!r}; allowed: auto, {', '.join(known)}")
    if name not in RUNTIMES[kind]:
        raise InvalidArgumentError(
            f"--runtime {name} cannot run {path.name} ({kind} file); allowed for it: {', '.join(RUNTIMES[kind])}"
        )
    return name


def _check_precision_early(runtime: str, precision: Precision | None, device: torch.device) -> None:
    """Refusals that need no file: fp16 on CPU, bf16 in onnxruntime on CPU (the rest: the backends)."""
    if device.type != "cpu" or precision is None or precision is Precision.FP32:
        return
    if precision is Precision.FP16:
        raise InvalidArgumentError(
            "--precision fp16 is not supported on CPU (no fast fp16 arithmetic there); use fp32, or bf16 "
            "(--runtime openvino for an ONNX file)"
        )
    if runtime == "onnxruntime":
        raise InvalidArgumentError(
            "onnxruntime's CPU provider has no bf16 path; use --runtime openvino --precision bf16"
        )


def _check_file_precision(path: Path, runtime: str, have: Precision, want: Precision | None) -> None:
    """An ONNX export or a TensorRT engine computes in the precision it was written in: refuse another."""
    if want is None or want is have:
        return
    if runtime == "tensorrt":
        raise InvalidArgumentError(
            f"{path.name} is a {have} TensorRT engine (its sidecar says so), not {want}; rebuild it with "
            f"`ddpm export --precision {want}` or run with --precision {have}"
        )
    if want is Precision.FP16:
        raise InvalidArgumentError(
            f"{path.name} is a {have} ONNX file; --precision fp16 on CUDA needs an fp16 export: "
            "`ddpm export --fp16`"
        )
    if want is Precision.BF16:
        raise InvalidArgumentError(
            f"{path.name} is a {have} ONNX file and onnxruntime runs bf16 on CUDA only from a bf16 graph, which "
            "`ddpm export` does not write; use --precision fp16 (`ddpm export --fp16`) or a TensorRT engine "
            "(`ddpm export --precision bf16`)"
        )
    raise InvalidArgumentError(
        f"{path.name} is a {have} export; give the fp32 ONNX file for --precision fp32"
    )


def _check_options(path: Path, kind: str, *, compile: bool, threads: int | None) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InvalidArgumentError(f"threads must be an integer >= 1, got {threads!r}")
    if kind not in BACKEND_FOR_KIND:
        raise ArtifactError(
            f"{path}: artifact kind {kind!r} has no backend; allowed: {', '.join(BACKEND_FOR_KIND)}"
        )
    if compile and BACKEND_FOR_KIND[kind] != "torch":
        raise InvalidArgumentError(
            f"--compile applies to the torch backend (a checkpoint); {path.name} is {kind}"
        )


def open_backend(
    engine: str | os.PathLike,
    *,
    device: str | torch.device = "auto",
    compile: bool = False,
    threads: int | None = None,
    cuda_graph: bool = False,
    runtime: str | None = None,
    precision: Precision | str | None = None,
) -> Backend:
    """Open the backend an artifact calls for: checkpoint -> torch, ONNX -> onnxruntime, engine -> tensorrt.

    The artifact's metadata is read once, here or by the runtime that parses the file anyway (the checkpoint
    loader, onnxruntime), and handed to the backend.

    Args:
        engine: path of a checkpoint, ONNX file, TensorRT engine (with its ``.json`` sidecar) or diffusers folder
            (its EMA weights when it holds both).
        device: auto | cpu | cuda | cuda:N.
        compile: torch backend only: wrap the model in ``torch.compile``.
        threads: CPU intra-op threads (onnxruntime CPU EP and torch on CPU); default: the cores available.
        cuda_graph: onnxruntime on CUDA: enable its CUDA-graph capture (fixed IO-bound buffers).
        runtime: None / "auto" (the artifact's default) | onnxruntime | openvino (ONNX, CPU) | torch | tensorrt.
        precision: fp32 | bf16 | fp16, or None for the artifact's own (fp32 unless it is a half export or
            engine). The opened backend's ``precision`` says what it computes in.
    """
    path = Path(engine)
    if not path.exists():
        raise ArtifactError(f"engine file {str(path)!r} does not exist")
    kind = artifact_kind(path) if not path.is_dir() or is_diffusers_folder(path) else None
    if kind is None:
        raise ArtifactError(
            f"engine {str(path)!r} is a directory; give a checkpoint, ONNX or TensorRT file (or a diffusers folder)"
        )
    _check_options(path, kind, compile=compile, threads=threads)
    name = parse_runtime(runtime, kind, path)
    want = parse_precision(precision)
    if name == "openvino":
        # CPU only: "auto" means the CPU here, and any other device is refused before a GPU is looked for
        device = "cpu" if str(device).strip().lower() == "auto" else device
        require_cpu(device)
    dev = resolve_device(device)
    _check_precision_early(name, want, dev)
    if name == "torch":
        return TorchBackend.from_checkpoint(
            path, dev, compile=compile, threads=threads, precision=want or Precision.FP32
        )
    if name == "openvino":
        if cuda_graph:
            raise InvalidArgumentError("--cuda-graph needs a CUDA device; the openvino runtime is CPU only")
        return OpenVINOBackend(path, dev, precision=want or Precision.FP32, threads=threads)
    if name == "onnxruntime":
        backend: Backend = OnnxRuntimeBackend(path, dev, threads=threads, cuda_graph=cuda_graph)
        try:
            _check_file_precision(path, name, backend.precision, want)
        except InvalidArgumentError:
            backend.close()
            raise
        return backend
    meta = read_metadata(path)
    _check_file_precision(path, name, artifact_precision(meta), want)
    return TensorRTBackend(path, dev, meta=meta)
