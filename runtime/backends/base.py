"""The one base class of every backend (Polygraphy's ``BaseRunner``): the public call checks, the subclass infers.

    class MyBackend(Backend):
        name, capturable = "mine", False
        def __init__(self, ...):            # open: acquire the runtime's objects, then hand the metadata up
            ...
            super().__init__(meta, device, description="mine 1.0 on cpu")
        def _infer(self, x, t, y=None): ... # inputs already checked: shape, dtype, device (y: classes)
        def _release(self): ...             # drop the runtime's objects (called once, by close())

Lifecycle: a backend is open from construction until :meth:`Backend.close` (or the end of a ``with`` block);
closing twice is harmless, calling a closed backend raises :class:`BackendClosedError`. The metadata is read
once, by whoever opens the artifact, and handed in: backends never re-read their file (docs/design.md,
"Backends").
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ddpm.devices import same_device
from ddpm.errors import ArtifactError, DDPMError, InvalidArgumentError
from ddpm.metadata import ClassInfo, class_info, output_shape

__all__ = ["Backend", "BackendClosedError", "check_call", "check_classes", "check_output"]


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


def check_classes(
    y: torch.Tensor | None, n: int, device: torch.device, classes: ClassInfo | None, *, values: bool = True
) -> None:
    """y is required exactly for a class-conditional artifact (``classes`` not None): int64 [n] on ``device``,
    every value a class 0..K-1 or the null class when the artifact has one. ``values=False`` skips the value
    check (it reads y on the host: a synchronisation on CUDA, impossible inside a CUDA-graph capture)."""
    if classes is None:
        if y is not None:
            raise InvalidArgumentError("this model is unconditional: call it without y (the classes)")
        return
    if y is None:
        raise InvalidArgumentError(
            f"this model is class-conditional ({classes.count} classes): call it with y, int64 [N] classes"
        )
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != n or y.dtype != torch.int64:
        what = f"{y.dtype} {list(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise InvalidArgumentError(f"y must be int64 of shape [{n}], got {what}")
    if not same_device(y.device, device):
        raise InvalidArgumentError(f"y must be on the backend's device {device}, got {y.device}")
    if values and n:
        # the allowed values are contiguous: 0..K-1, and the null class is K (ours) or one of them (diffusers')
        top = classes.count - 1 if classes.null is None else max(classes.count - 1, classes.null)
        lo, hi = (int(v) for v in torch.aminmax(y))
        if lo < 0 or hi > top:
            null = f", or the null class {classes.null}" if classes.null is not None else ""
            raise InvalidArgumentError(
                f"y holds class {lo if lo < 0 else hi}; this model's classes are 0..{classes.count - 1}{null}"
            )


def check_output(
    out: object, x: torch.Tensor, device: torch.device, *, source: str, shape: Sequence[int] | None = None
) -> None:
    """The model output must be a float32 tensor [N, *shape] on the backend's device (``shape``: one output's
    shape, default x's sample shape; 2C channels for a learned-variance model); ArtifactError naming ``source``
    (the file) otherwise."""
    if not isinstance(out, torch.Tensor):
        raise ArtifactError(f"{source}: the model returned {type(out).__name__}, expected a tensor like x")
    want = (x.shape[0], *(x.shape[1:] if shape is None else shape))
    if tuple(out.shape) != tuple(want):
        per = (
            "one value per input value"
            if tuple(want) == tuple(x.shape)
            else f"[N, {', '.join(map(str, want[1:]))}]"
        )
        raise ArtifactError(
            f"{source}: the model output has shape {list(out.shape)} but its input x is {list(x.shape)}; "
            f"a denoiser returns {per} (the graph does not match its metadata)"
        )
    if out.dtype != torch.float32:
        raise ArtifactError(
            f"{source}: the model output is {out.dtype}, expected float32 (re-export the model)"
        )
    if not same_device(out.device, device):
        raise ArtifactError(f"{source}: the model output is on {out.device}, expected the backend's {device}")


class Backend(ABC):
    """The denoiser behind one call, ``backend(x, t[, y]) -> model_output``, whatever runtime evaluates it.

    Attributes:
        name: "torch" | "onnxruntime" | "tensorrt".
        capturable: True when a call can be recorded inside ``torch.cuda.graph`` (torch, TensorRT).
        device: where ``x``, ``t`` and the output live.
        meta: the artifact's decoded metadata (ddpm.metadata keys), read once when the artifact was opened.
        classes: ``ddpm.metadata.class_info(meta)``: the classes y may hold; None for an unconditional model.
        sample_shape: ``meta["sample_shape"]`` as a tuple: one sample is [*sample_shape].
        output_shape: one model output's shape (``ddpm.metadata.output_shape``): sample_shape, with 2C channels
            for a learned-variance model (the prediction, then the variance interpolation v).
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
        self.output_shape = tuple(int(s) for s in output_shape(meta))
        self.description = description
        self.stream = stream
        self.closed = False
        self._output_checked = False
        self.classes = class_info(meta)
        self._y_checked: tuple[Any, int] | None = None  # (weakref to y, its version) whose values passed

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Model output [N, *output_shape] for x [N, *sample_shape] float32 and t [N] int64 (original timesteps),
        and for a class-conditional artifact (``classes``) y [N] int64, each row's class (docs/design.md,
        "Conditional models").

        The returned tensor may be a buffer the backend reuses: it is valid until the next call."""
        if self.closed:
            raise BackendClosedError(
                f"the {self.name} backend was closed; open the artifact again to call it"
            )
        check_call(x, t, self.sample_shape, self.device)
        if y is not None or self.classes is not None:
            fresh = self._unchecked(y)
            check_classes(y, x.shape[0], self.device, self.classes, values=fresh is not None)
            self._y_checked = fresh or self._y_checked
        if self._output_checked:
            return self._infer(x, t) if y is None else self._infer(x, t, y)
        # The first call is where a model whose graph disagrees with its metadata shows itself: check what
        # it returns once (the loop would otherwise fail deep inside the step kernel, or silently broadcast).
        try:
            out = self._infer(x, t) if y is None else self._infer(x, t, y)
        except self.runtime_errors as e:
            text = " ".join(str(e).split())[:200]
            raise ArtifactError(f"{self._source()}: the model failed on its first call ({text})") from None
        check_output(out, x, self.device, source=self._source(), shape=self.output_shape)
        self._output_checked = True
        return out

    def _unchecked(self, y: torch.Tensor | None) -> tuple[Any, int] | None:
        """(weakref, version) of a y whose values must be read now, else None: once per tensor (the loop passes
        the same y every step, so a CUDA run synchronises once, not per step), never during a CUDA-graph capture."""
        if not isinstance(y, torch.Tensor) or (y.is_cuda and torch.cuda.is_current_stream_capturing()):
            return None
        try:
            version = y._version  # bumped by every in-place write
        except RuntimeError:  # an inference-mode tensor keeps no version: check it every call
            return (lambda: None), 0
        seen = self._y_checked
        return (
            None if seen is not None and seen[0]() is y and seen[1] == version else (weakref.ref(y), version)
        )

    def _source(self) -> str:
        return str(getattr(self, "source", None) or getattr(self, "path", None) or f"the {self.name} model")

    @abstractmethod
    def _infer(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The runtime's own evaluation; x, t (and y, a conditional artifact's classes) are already checked.
        An unconditional backend is called with (x, t) only."""

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
