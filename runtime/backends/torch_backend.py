"""The torch backend: the checkpoint itself, eager or under ``torch.compile``.

On a GPU its calls can be recorded in a CUDA graph by the sampling loop (``capturable``): the model reads x and
t from fixed buffers and writes its output into memory the graph's private pool owns.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ddpm.checkpoint import load_model
from ddpm.errors import InvalidArgumentError

from .base import Backend

__all__ = ["TorchBackend"]


class TorchBackend(Backend):
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
        device = torch.device(device)
        # torch's intra-op thread count is process-wide: set it for the backend's lifetime, restore it on close.
        self._saved_threads = torch.get_num_threads()
        if threads is not None and device.type == "cpu":
            torch.set_num_threads(threads)
        self.model: torch.nn.Module | None = model.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._fn = torch.compile(self.model) if compile else self.model
        mode = "torch.compile" if compile else "eager"
        where = device.type if device.type == "cpu" else torch.cuda.get_device_name(device)
        n_threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
        super().__init__(
            meta,
            device,
            description=f"torch {torch.__version__} ({mode}) on {where}{n_threads}, from {source}",
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: torch.device,
        *,
        compile: bool = False,
        threads: int | None = None,
    ) -> TorchBackend:
        """Load a safetensors checkpoint (no code runs while loading); its metadata comes with the weights."""
        model, meta = load_model(path, device=device)
        return cls(model, meta, device, compile=compile, source=os.fspath(path), threads=threads)

    def _infer(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self._fn(x, t)
        if out.shape != x.shape:
            raise InvalidArgumentError(f"model output shape {list(out.shape)} != input shape {list(x.shape)}")
        return out

    def _release(self) -> None:
        # Drop the compiled wrapper and the weights with the backend; device memory returns to the allocator.
        self._fn = None
        self.model = None
        torch.set_num_threads(self._saved_threads)
