"""ddpm: train a DDPM UNet, export it to ONNX / TensorRT, sample with a fused C++/CUDA step kernel.

Public names are imported lazily so that ``import ddpm`` (and ``ddpm --help``) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it
_LAZY = {
    "Schedule": "ddpm.schedule",
    "Prediction": "ddpm.schedule",
    "Sampler": "ddpm.schedule",
    "Variance": "ddpm.schedule",
    "Spacing": "ddpm.schedule",
    "coefficient_table": "ddpm.schedule",
    "step": "ddpm.diffusion",
    "q_sample": "ddpm.diffusion",
    "x0_from_eps": "ddpm.diffusion",
    "eps_from_x0": "ddpm.diffusion",
    "x0_from_v": "ddpm.diffusion",
    "eps_from_v": "ddpm.diffusion",
    "v_from_x0_eps": "ddpm.diffusion",
    "training_target": "ddpm.diffusion",
    "fused_step": "ddpm.kernels",
    "DeviceStepTable": "ddpm.kernels",
    "HostStepTable": "ddpm.kernels",
    "load_model": "ddpm.checkpoint",
    "read_metadata": "ddpm.artifacts",
    "reverse": "ddpm.loop",
    "ReversePlan": "ddpm.loop",
    "SamplingOptions": "ddpm.options",
    "sample": "ddpm.runtime.sampling",
    "diffuse": "ddpm.forward",
    "denoise": "ddpm.runtime.img2img",
    "interpolate": "ddpm.runtime.img2img",
    "invert": "ddpm.runtime.img2img",
    "DDPMError": "ddpm.errors",
    "InvalidArgumentError": "ddpm.errors",
    "ArtifactError": "ddpm.errors",
    "MissingDependencyError": "ddpm.errors",
    "SamplingError": "ddpm.errors",
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
