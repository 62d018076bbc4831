"""ddpm: train a DDPM UNet, export it to ONNX / TensorRT, sample with a fused C++/CUDA step kernel.

Public names are imported lazily so that ``import ddpm`` (and ``ddpm --help``) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it
_LAZY = {
    "Schedule": "ddpm.runtime.schedule",
    "Prediction": "ddpm.runtime.schedule",
    "Sampler": "ddpm.runtime.schedule",
    "Variance": "ddpm.runtime.schedule",
    "coefficient_table": "ddpm.runtime.schedule",
    "step": "ddpm.runtime.step",
    "q_sample": "ddpm.runtime.step",
    "x0_from_eps": "ddpm.runtime.step",
    "eps_from_x0": "ddpm.runtime.step",
    "x0_from_v": "ddpm.runtime.step",
    "eps_from_v": "ddpm.runtime.step",
    "v_from_x0_eps": "ddpm.runtime.step",
    "training_target": "ddpm.runtime.step",
    "fused_step": "ddpm.runtime.kernels",
    "DeviceStepTable": "ddpm.runtime.kernels",
    "HostStepTable": "ddpm.runtime.kernels",
    "load_model": "ddpm.trainer.checkpoint",
    "read_metadata": "ddpm.runtime.artifacts",
    "sample": "ddpm.runtime.sampling",
    "DDPMError": "ddpm.runtime.errors",
    "InvalidArgumentError": "ddpm.runtime.errors",
    "ArtifactError": "ddpm.runtime.errors",
    "MissingDependencyError": "ddpm.runtime.errors",
    "SamplingError": "ddpm.runtime.errors",
}
_SUBMODULES = {"noise": "ddpm.noise"}

__all__ = sorted([*_LAZY, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(_SUBMODULES[name])
    else:
        raise AttributeError(f"module 'ddpm' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
