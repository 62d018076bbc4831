"""The project's exceptions. Library code raises these; only the CLI turns them into one line + exit code 2."""

from __future__ import annotations


class DDPMError(Exception):
    """Base class of every error the CLI reports as one line (exit code 2) instead of a traceback."""


class InvalidArgumentError(DDPMError, ValueError):
    """An argument has a value outside what is allowed; the message names the value and the allowed range."""


class ArtifactError(DDPMError):
    """A file (checkpoint, ONNX model, engine, sidecar, dataset) is missing, unreadable, corrupt or inconsistent."""


class MissingDependencyError(DDPMError, ImportError):
    """An optional dependency (tensorrt, onnxruntime, the compiled extension, a GPU) is not available."""


class SamplingError(DDPMError, RuntimeError):
    """The sampling loop produced a non-finite value; the message names the step."""


class TrainingError(DDPMError, RuntimeError):
    """Training cannot go on (the loss turned NaN/Inf); the message names the step and the checkpoint kept."""
