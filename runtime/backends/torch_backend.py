"""The torch backend: the checkpoint itself, eager or under ``torch.compile``, in fp32 or under autocast.

A reduced precision (bf16 on a CPU with native bf16, bf16/fp16 on CUDA) runs the model under ``torch.autocast``
with weights and activations channels-last (oneDNN's bf16 convolutions want NHWC; NCHW inputs pay a reorder
per layer); the output is cast back to float32 contiguous, so the step kernel never sees 16-bit values.

On a GPU its calls can be recorded in a CUDA graph by the sampling loop (``capturable``): the model reads x and
t (and y, a conditional model's classes) from fixed buffers and writes its output into memory the graph's
private pool owns.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ddpm.checkpoint import load_model
from ddpm.errors import InvalidArgumentError
from ddpm.precision import Precision, require_cpu_bf16

from .base import Backend

__all__ = ["TorchBackend"]


class TorchBackend(Backend):
    """``backend(x, t[, y]) = model(x, t[, y])`` under ``torch.inference_mode``, on ``device``."""

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
        precision: Precision = Precision.FP32,
    ) -> None:
        device = torch.device(device)
        _check_precision(precision, device)
        self.precision = precision
        self.source = source  # named by the first-call output check
        # torch's intra-op thread count is process-wide: set it for the backend's lifetime, restore it on close.
        self._saved_threads = torch.get_num_threads()
        if threads is not None and device.type == "cpu":
            torch.set_num_threads(threads)
        self.model: torch.nn.Module | None = model.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        if precision.reduced:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._fn = torch.compile(self.model) if compile else self.model
        mode = "torch.compile" if compile else "eager"
        mode += f", {precision} autocast" if precision.reduced else ""
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
        precision: Precision = Precision.FP32,
    ) -> TorchBackend:
        """Load a safetensors checkpoint or a diffusers folder (no code runs while loading); its metadata comes
        with the weights."""
        _check_precision(precision, torch.device(device))  # before the weights are read
        model, meta = load_model(path, device=device)
        return cls(
            model, meta, device, compile=compile, source=os.fspath(path), threads=threads, precision=precision
        )

    def _infer(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        args = (x, t) if y is None else (x, t, y)
        with torch.inference_mode():
            if self.precision.reduced:
                out = self._infer_autocast(*args)
            else:
                out = self._fn(*args)
        if tuple(out.shape[1:]) != self.output_shape:
            raise InvalidArgumentError(
                f"model output shape {list(out.shape)} != [N, {', '.join(map(str, self.output_shape))}]"
            )
        return out

    def _infer_autocast(self, x: torch.Tensor, t: torch.Tensor, *y: torch.Tensor) -> torch.Tensor:
        dtype = torch.bfloat16 if self.precision is Precision.BF16 else torch.float16
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        # cache_enabled=False: a cached weight cast would outlive a CUDA-graph capture's private pool
        with torch.autocast(self.device.type, dtype=dtype, cache_enabled=False):
            out = self._fn(x, t, *y)
        # the step kernel reads float32, contiguous: one copy does both
        return out.to(torch.float32, memory_format=torch.contiguous_format)

    def _release(self) -> None:
        # Drop the compiled wrapper and the weights with the backend; device memory returns to the allocator.
        self._fn = None
        self.model = None
        torch.set_num_threads(self._saved_threads)


def _check_precision(precision: Precision, device: torch.device) -> None:
    """fp16 autocast on CPU is refused (no fast CPU fp16 path); bf16 on CPU needs native bf16."""
    if device.type == "cpu":
        if precision is Precision.FP16:
            raise InvalidArgumentError(
                "--precision fp16 is not supported on CPU (no fast fp16 arithmetic there); use bf16 or fp32"
            )
        if precision is Precision.BF16:
            require_cpu_bf16("torch autocast")
