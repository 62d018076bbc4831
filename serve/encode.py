"""Answers as bytes: the grid PNG, the npz, or JSON, laid out as the commands write them.

- npz of samples: ``arr_0`` is exactly what ``ddpm run --npz`` writes (``ddpm.images.to_uint8_nhwc`` for
  images, float32 [N, D] for points), ``samples`` the float32 values [N, *sample_shape]; ``precision`` beside
  them when the network ran in reduced precision (as ``ddpm run`` records it).
- npz of a denoise: ``arr_0`` uint8 NHWC of the denoised images, ``denoised``, ``noisy``, ``t`` (as ``ddpm
  denoise --npz``).
- PNG: ``ddpm run``'s picture (``ddpm.images.save_samples_png``: a grid of the first images, or a scatter of
  points), of the same first samples ``ddpm run`` keeps for it.
- JSON: the settings and the float32 values as numbers (a float32 printed by Python's repr reads back exactly).
"""

from __future__ import annotations

import io
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm.images import save_samples_png, to_uint8_nhwc
from ddpm.runtime.sample_sink import PNG_MAX_IMAGES, PNG_MAX_VALUES

__all__ = ["encode_samples", "encode_denoised", "MEDIA_TYPES"]

MEDIA_TYPES = {"png": "image/png", "npz": "application/octet-stream", "json": "application/json"}


def _npz(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _png(x: torch.Tensor, title: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix="ddpm-serve-") as tmp:
        path = save_samples_png(x, Path(tmp) / "samples.png", title=title)
        return path.read_bytes()


def _preview(x: torch.Tensor) -> torch.Tensor:
    """The samples ``ddpm run`` keeps for its PNG (runtime/sample_sink.py)."""
    keep = min(x.shape[0], max(1, PNG_MAX_VALUES // math.prod(x.shape[1:])))
    return x[: min(keep, PNG_MAX_IMAGES) if x.dim() == 4 else keep]


def encode_samples(x: torch.Tensor, fmt: str, settings: dict[str, Any], precision: str = "fp32") -> bytes:
    """x [N, *sample_shape] float32 (CPU) as ``fmt``; ``settings`` describe the run (JSON, the PNG title)."""
    if fmt == "npz":
        arr = to_uint8_nhwc(x) if x.dim() == 4 else x.numpy()
        extra = {} if precision == "fp32" else {"precision": np.array(precision)}
        return _npz(arr_0=arr, samples=x.numpy(), **extra)
    if fmt == "png":
        shown = _preview(x)
        return _png(shown, f"{shown.shape[0]} samples, {settings['steps']} steps")
    body = {**settings, "precision": precision, "shape": list(x.shape), "samples": x.tolist()}
    return _json(body)


def encode_denoised(result: Any, fmt: str, settings: dict[str, Any]) -> bytes:
    """A runtime.img2img DenoiseResult as ``fmt``."""
    if fmt == "npz":
        return _npz(
            arr_0=to_uint8_nhwc(result.denoised),
            denoised=result.denoised.numpy(),
            noisy=result.noisy.numpy(),
            t=np.array(result.t),
        )
    if fmt == "png":
        return _png(result.denoised, f"denoised from t={result.t}")
    body = {
        **settings,
        "t": result.t,
        "steps": result.steps,
        "sampler": result.sampler,
        "shape": list(result.denoised.shape),
        "denoised": result.denoised.tolist(),
        "noisy": result.noisy.tolist(),
    }
    return _json(body)


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, allow_nan=False, separators=(",", ":")).encode()
