"""Backends: one protocol for every way of evaluating the denoiser, ``backend(x, t) -> model_output``.

    with open_backend("unet.onnx", device="auto") as backend:   # torch | onnxruntime | tensorrt
        m = backend(x, t)          # x [N, *sample_shape] float32, t [N] int64 ORIGINAL timesteps, on backend.device

The artifact decides the backend: a checkpoint (``.safetensors``) runs in PyTorch, an ONNX file in
onnxruntime, a TensorRT engine in TensorRT. Each backend imports its runtime lazily (Polygraphy's habit), so
this module costs nothing until a backend is opened and a missing optional package is one clear message.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from ddpm.errors import ArtifactError, InvalidArgumentError

__all__ = ["Backend", "resolve_device", "open_backend", "default_cpu_threads", "BACKEND_FOR_KIND"]


@runtime_checkable
class Backend(Protocol):
    """The denoiser behind a uniform call (Polygraphy-style runner: open, infer, close).

    Attributes:
        name: "torch" | "onnxruntime" | "tensorrt".
        device: where ``x``, ``t`` and the output live.
        meta: the artifact's decoded metadata (runtime/metadata.py keys).
        description: one human-readable line: runtime version, provider / device, threads.
        stream: the CUDA stream the backend is bound to (onnxruntime's CUDA EP fixes one per session), or None
            for "whatever stream is current"; the sampling loop runs on it.
        capturable: True when a call can be recorded inside ``torch.cuda.graph`` (torch, TensorRT).
    """

    name: str
    device: torch.device
    meta: dict[str, Any]
    description: str
    stream: Any
    capturable: bool

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Model output for x [N, *sample_shape] float32 and t [N] int64 (original timesteps), shaped like x.

        The returned tensor may be a buffer the backend reuses: it is valid until the next call."""
        ...

    def __enter__(self) -> Backend: ...

    def __exit__(self, *exc: object) -> None: ...


# artifact kind (runtime/artifacts.py) -> backend name
BACKEND_FOR_KIND = {"checkpoint": "torch", "onnx": "onnxruntime", "tensorrt": "tensorrt"}


def default_cpu_threads() -> int:
    """Threads for CPU inference: the cores this process may run on (cgroup/affinity aware, unlike cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda when torch sees a GPU, else cpu; ``cpu``; ``cuda`` / ``cuda:N`` (checked to exist)."""
    if isinstance(device, torch.device):
        spec = str(device)
    else:
        spec = str(device).strip().lower()
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InvalidArgumentError(
                f"device {spec!r} requested but torch sees no CUDA GPU (torch.cuda.is_available() is False, "
                f"torch {torch.__version__}); use --device cpu or --device auto"
            )
        try:
            dev = torch.device(spec)
        except RuntimeError:
            raise InvalidArgumentError(f"bad device {spec!r}; allowed: auto, cpu, cuda, cuda:N") from None
        index = 0 if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise InvalidArgumentError(
                f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) visible (0..{torch.cuda.device_count() - 1})"
            )
        return torch.device("cuda", index)
    raise InvalidArgumentError(f"unknown device {device!r}; allowed: auto, cpu, cuda, cuda:N")


def _artifact_kind(path: Path) -> str:
    from ddpm.artifacts import artifact_kind

    return artifact_kind(path)


def open_backend(
    engine: str | os.PathLike,
    *,
    device: str | torch.device = "auto",
    compile: bool = False,
    threads: int | None = None,
    cuda_graph: bool = False,
) -> Backend:
    """Open the backend an artifact calls for: checkpoint -> torch, ONNX -> onnxruntime, engine -> tensorrt.

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
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InvalidArgumentError(f"threads must be an integer >= 1, got {threads!r}")
    kind = _artifact_kind(path)
    if kind not in BACKEND_FOR_KIND:
        raise ArtifactError(
            f"{path}: artifact kind {kind!r} has no backend; allowed: {', '.join(BACKEND_FOR_KIND)}"
        )
    dev = resolve_device(device)
    if compile and kind != "checkpoint":
        raise InvalidArgumentError(
            f"--compile applies to the torch backend (a checkpoint); {path.name} is {kind}"
        )
    if kind == "checkpoint":
        from .torch_backend import TorchBackend

        return TorchBackend.from_checkpoint(path, dev, compile=compile, threads=threads)
    if kind == "onnx":
        from .onnx_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, dev, threads=threads, cuda_graph=cuda_graph)
    from .tensorrt_backend import TensorRTBackend

    return TensorRTBackend(path, dev)
