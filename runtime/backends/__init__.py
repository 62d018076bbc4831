"""Backends: one base class for every way of evaluating the denoiser, ``backend(x, t) -> model_output``.

    with open_backend("unet.onnx", device="auto") as backend:   # torch | onnxruntime | tensorrt
        m = backend(x, t)          # x [N, *sample_shape] float32, t [N] int64 ORIGINAL timesteps, on backend.device

The artifact decides the backend: a checkpoint (``.safetensors``) runs in PyTorch, an ONNX file in
onnxruntime, a TensorRT engine in TensorRT. Every backend is a :class:`Backend` (base.py): the public call checks
the inputs once, the subclass only infers. onnxruntime and tensorrt are imported when a backend is opened
(Polygraphy's habit), so a missing optional package is one clear message and costs nothing until then.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ddpm.artifacts import artifact_kind, read_metadata
from ddpm.devices import default_cpu_threads, resolve_device
from ddpm.errors import ArtifactError, InvalidArgumentError

from .base import Backend, BackendClosedError, check_call
from .onnx_backend import OnnxRuntimeBackend
from .tensorrt_backend import TensorRTBackend
from .torch_backend import TorchBackend

__all__ = [
    "Backend",
    "BackendClosedError",
    "BACKEND_FOR_KIND",
    "OnnxRuntimeBackend",
    "TensorRTBackend",
    "TorchBackend",
    "check_call",
    "default_cpu_threads",
    "open_backend",
    "resolve_device",
]

# artifact kind (ddpm.artifacts) -> backend name
BACKEND_FOR_KIND = {"checkpoint": "torch", "onnx": "onnxruntime", "tensorrt": "tensorrt"}


def _check_options(path: Path, kind: str, *, compile: bool, threads: int | None) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InvalidArgumentError(f"threads must be an integer >= 1, got {threads!r}")
    if kind not in BACKEND_FOR_KIND:
        raise ArtifactError(
            f"{path}: artifact kind {kind!r} has no backend; allowed: {', '.join(BACKEND_FOR_KIND)}"
        )
    if compile and kind != "checkpoint":
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
) -> Backend:
    """Open the backend an artifact calls for: checkpoint -> torch, ONNX -> onnxruntime, engine -> tensorrt.

    The artifact's metadata is read once, here or by the runtime that parses the file anyway (the checkpoint
    loader, onnxruntime), and handed to the backend.

    Args:
        engine: path of a checkpoint, ONNX file or TensorRT engine (with its ``.json`` sidecar).
        device: auto | cpu | cuda | cuda:N.
        compile: torch backend only: wrap the model in ``torch.compile``.
        threads: CPU intra-op threads (onnxruntime CPU EP and torch on CPU); default: the cores available.
        cuda_graph: onnxruntime on CUDA: enable its CUDA-graph capture (fixed IO-bound buffers).
    """
    path = Path(engine)
    if not path.exists():
        raise ArtifactError(f"engine file {str(path)!r} does not exist")
    if path.is_dir():
        raise ArtifactError(f"engine {str(path)!r} is a directory; give a checkpoint, ONNX or TensorRT file")
    kind = artifact_kind(path)
    _check_options(path, kind, compile=compile, threads=threads)
    dev = resolve_device(device)
    if kind == "checkpoint":
        return TorchBackend.from_checkpoint(path, dev, compile=compile, threads=threads)
    if kind == "onnx":
        return OnnxRuntimeBackend(path, dev, threads=threads, cuda_graph=cuda_graph)
    return TensorRTBackend(path, dev, meta=read_metadata(path))
