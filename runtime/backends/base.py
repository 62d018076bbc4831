"""The one base class of every backend (Polygraphy's ``BaseRunner``): the public call checks, the subclass infers.

    class MyBackend(Backend):
        name, capturable = "mine", False
        def __init__(self, ...):            # open: acquire the runtime's objects, then hand the metadata up
            ...
            super().__init__(meta, device, description="mine 1.0 on cpu")
        def _infer(self, x, t): ...         # inputs already checked: shape, dtype, device
        def _release(self): ...             # drop the runtime's objects (called once, by close())

Lifecycle: a backend is open from construction until :meth:`Backend.close` (or the end of a ``with`` block);
closing twice is harmless, calling a closed backend raises :class:`BackendClosedError`. The metadata is read
once, by whoever opens the artifact, and handed in: backends never re-read their file (docs/design.md,
"Backends").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ddpm.devices import same_device
from ddpm.errors import ArtifactError, DDPMError, InvalidArgumentError

__all__ = ["Backend", "BackendClosedError", "check_call", "check_output"]


class BackendClosedError(DDPMError, RuntimeError):
    """A backend was called after :meth:`Backend.close`: its runtime objects are gone."""


def check_call(x: torch.Tensor, t: torch.Tensor, sample_shape: Sequence[int], device: torch.device) -> None:
    """x [N, *sample_shape] float32 and t [N] int64, both on ``device``; InvalidArgumentError otherwise."""
    if x.dim() < 2 or tuple(x.shape[1:]) != tuple(sample_shape):
        raise InvalidArgumentError(
            f"x must have shape [N, {', '.join(map(str, sample_shape))}], got {list(x.shape)}"
        )
    if x.dtype != torch.float32:
        raise InvalidArgumentError(f"x must be float32, got {x.dtype}")
    if t.dim() != 1 or t.shape[0] != x.shape[0] or t.dtype != torch.int64:
        raise InvalidArgumentError(f"t must be int64 of shape [{x.shape[0]}], got {t.dtype} {list(t.shape)}")
    if not (same_device(x.device, device) and same_device(t.device, device)):
        raise InvalidArgumentError(
            f"x and t must be on the backend's device {device}, got {x.device} and {t.device}"
        )


def check_output(out: object, x: torch.Tensor, device: torch.device, *, source: str) -> None:
    """The model output must be a float32 tensor shaped like x on the backend's device; ArtifactError naming
    ``source`` (the file) otherwise."""
    if not isinstance(out, torch.Tensor):
        raise ArtifactError(f"{source}: the model returned {type(out).__name__}, expected a tensor like x")
    if tuple(out.shape) != tuple(x.shape):
        raise ArtifactError(
            f"{source}: the model output has shape {list(out.shape)} but its input x is {list(x.shape)}; "
            "a denoiser returns one value per input value (the graph does not match its metadata)"
        )
    if out.dtype != torch.float32:
        raise ArtifactError(
            f"{source}: the model output is {out.dtype}, expected float32 (re-export the model)"
        )
    if not same_device(out.device, device):
        raise ArtifactError(f"{source}: the model output is on {out.device}, expected the backend's {device}")


class Backend(ABC):
    """The denoiser behind one call, ``backend(x, t) -> model_output``, whatever runtime evaluates it.

    Attributes:
        name: "torch" | "onnxruntime" | "tensorrt".
        capturable: True when a call can be recorded inside ``torch.cuda.graph`` (torch, TensorRT).
        device: where ``x``, ``t`` and the output live.
        meta: the artifact's decoded metadata (ddpm.metadata keys), read once when the artifact was opened.
        sample_shape: ``meta["sample_shape"]`` as a tuple: one sample is [*sample_shape].
        description: one human-readable line: runtime version, provider / device, threads.
        stream: the CUDA stream the backend is bound to (onnxruntime's CUDA EP fixes one per session), or None
            for "whatever stream is current"; the sampling loop runs on it.
    """

    name: ClassVar[str]
    capturable: ClassVar[bool]
    # The runtime's own exception types for "this graph cannot run" (onnxruntime's Fail / InvalidArgument /
    # RuntimeException, ...): on the first call they become one ArtifactError naming the file.
    runtime_errors: ClassVar[tuple[type[BaseException], ...]] = ()

    def __init__(
        self, meta: dict[str, Any], device: torch.device, *, description: str, stream: Any = None
    ) -> None:
        self.meta = meta
        self.device = torch.device(device)
        self.sample_shape = tuple(int(s) for s in meta["sample_shape"])
        self.description = description
        self.stream = stream
        self.closed = False
        self._output_checked = False

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Model output for x [N, *sample_shape] float32 and t [N] int64 (original timesteps), shaped like x.

        The returned tensor may be a buffer the backend reuses: it is valid until the next call."""
        if self.closed:
            raise BackendClosedError(
                f"the {self.name} backend was closed; open the artifact again to call it"
            )
        check_call(x, t, self.sample_shape, self.device)
        if self._output_checked:
            return self._infer(x, t)
        # The first call is where a model whose graph disagrees with its metadata shows itself: check what
        # it returns once (the loop would otherwise fail deep inside the step kernel, or silently broadcast).
        try:
            out = self._infer(x, t)
        except self.runtime_errors as e:
            text = " ".join(str(e).split())[:200]
            raise ArtifactError(f"{self._source()}: the model failed on its first call ({text})") from None
        check_output(out, x, self.device, source=self._source())
        self._output_checked = True
        return out

    def _source(self) -> str:
        return str(getattr(self, "source", None) or getattr(self, "path", None) or f"the {self.name} model")

    @abstractmethod
    def _infer(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The runtime's own evaluation; x and t are already checked."""

    @abstractmethod
    def _release(self) -> None:
        """Drop the runtime's objects (sessions, engines, weights); called once, by :meth:`close`."""

    def close(self) -> None:
        """Release the runtime's objects; idempotent."""
        if not self.closed:
            self.closed = True
            self._release()

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<{type(self).__name__} {self.name} on {self.device}, {state}: {self.description}>"
