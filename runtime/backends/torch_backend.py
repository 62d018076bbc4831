"""The torch backend: the checkpoint itself, eager or under ``torch.compile``.

On a GPU its calls can be recorded in a CUDA graph by the sampling loop (``capturable``): the model reads x and
t from fixed buffers and writes its output into memory the graph's private pool owns.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ddpm.errors import ArtifactError, InvalidArgumentError
from ._common import check_call

__all__ = ["TorchBackend"]


class TorchBackend:
    """``backend(x, t) = model(x, t)`` under ``torch.inference_mode``, on ``device``."""

    name = "torch"
    capturable = True

    def __init__(
        self,
        model: torch.nn.Module,
        meta: dict[str, Any],
        device: torch.device,
        *,
        compile: bool = False,
        source: str = "module",
        threads: int | None = None,
    ) -> None:
        self.meta = meta
        # torch's intra-op thread count is process-wide: set it for the backend's lifetime, restore it on exit.
        self._saved_threads = torch.get_num_threads()
        if threads is not None and torch.device(device).type == "cpu":
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.stream = None
        self.sample_shape = tuple(int(s) for s in meta["sample_shape"])
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._fn = torch.compile(self.model) if compile else self.model
        mode = "torch.compile" if compile else "eager"
        where = self.device.type if self.device.type == "cpu" else torch.cuda.get_device_name(self.device)
        threads = f", {torch.get_num_threads()} threads" if self.device.type == "cpu" else ""
        self.description = f"torch {torch.__version__} ({mode}) on {where}{threads}, from {source}"

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: torch.device,
        *,
        compile: bool = False,
        threads: int | None = None,
    ) -> TorchBackend:
        """Load a safetensors checkpoint (no code runs while loading) with its metadata."""
        # Lazy: runtime depends on nothing of ours but ddpm._C; only this backend needs the trainer's models.
        try:
            from ddpm.checkpoint import load_model
        except ImportError as e:  # pragma: no cover - the trainer ships with the package
            raise ArtifactError(
                f"{path}: the torch backend needs ddpm.trainer to rebuild the model ({e})"
            ) from None
        model, meta = load_model(path, device=device)
        return cls(model, meta, device, compile=compile, source=os.fspath(path), threads=threads)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        check_call(x, t, self.sample_shape, self.device)
        with torch.inference_mode():
            out = self._fn(x, t)
        if out.shape != x.shape:
            raise InvalidArgumentError(f"model output shape {list(out.shape)} != input shape {list(x.shape)}")
        return out

    def __enter__(self) -> TorchBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        # Drop the compiled wrapper and the weights with the backend; device memory returns to the allocator.
        self._fn = None
        self.model = None
        torch.set_num_threads(self._saved_threads)
