"""Artifact metadata: the keys every checkpoint, ONNX file and engine sidecar carries (docs/design.md,
"Artifacts").

On disk, metadata is a flat ``str -> str`` map (safetensors ``__metadata__``, ONNX ``metadata_props``, the
sidecar JSON): structured values are JSON-encoded. In memory it is a plain dict with decoded values:

    format        "ddpm/1"
    model         dict, the network config; ``model["arch"]`` is "unet" or "mlp"
    schedule      dict, :attr:`Schedule.config` of the TRAINING schedule
    prediction    "eps" | "x0" | "v"
    sample_shape  list[int], one sample's shape: [C, H, W] for images, [D] for vectors
    dataset       str
    step          int, training step of the weights
    ema_decay     float | None
plus any extra keys (exporter versions, weight hash, TensorRT facts), kept as given.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import ArtifactError, DDPMError
from .schedule import Prediction, Schedule

__all__ = [
    "FORMAT",
    "REQUIRED_KEYS",
    "encode_metadata",
    "decode_metadata",
    "validate_metadata",
    "schedule_from_meta",
]

FORMAT = "ddpm/1"
REQUIRED_KEYS = ("format", "model", "schedule", "prediction", "sample_shape", "dataset", "step")
_JSON_KEYS = {"model", "schedule", "sample_shape", "step", "ema_decay"}


def encode_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """Flatten to ``str -> str`` (JSON for structured values) after validating."""
    validate_metadata(meta, source="metadata to write")
    out: dict[str, str] = {}
    for k, v in meta.items():
        out[k] = v if isinstance(v, str) and k not in _JSON_KEYS else json.dumps(v, sort_keys=True)
    return out


def decode_metadata(strings: dict[str, str] | None, *, source: str) -> dict[str, Any]:
    """Parse and validate a ``str -> str`` map read from ``source`` (a path, for messages)."""
    if not strings:
        raise ArtifactError(
            f"{source}: no ddpm metadata found (was it written by `ddpm train`/`ddpm export`?)"
        )
    meta: dict[str, Any] = {}
    for k, v in strings.items():
        if k in _JSON_KEYS:
            try:
                meta[k] = json.loads(v)
            except (TypeError, json.JSONDecodeError):
                raise ArtifactError(f"{source}: metadata key {k!r} is not valid JSON: {v!r:.80}") from None
        else:
            meta[k] = v
    validate_metadata(meta, source=source)
    return meta


def validate_metadata(meta: dict[str, Any], *, source: str) -> None:
    """Raise ArtifactError naming ``source`` and the key when metadata is missing or inconsistent."""
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ArtifactError(f"{source}: metadata lacks required key(s) {', '.join(missing)}")
    if meta["format"] != FORMAT:
        raise ArtifactError(
            f"{source}: metadata format {meta['format']!r} is not supported (expected {FORMAT!r})"
        )
    model = meta["model"]
    if not isinstance(model, dict) or model.get("arch") not in ("unet", "mlp"):
        raise ArtifactError(
            f"{source}: metadata 'model' must be a dict with arch 'unet' or 'mlp', got {model!r:.120}"
        )
    shape = meta["sample_shape"]
    if not (isinstance(shape, list) and shape and all(isinstance(s, int) and s > 0 for s in shape)):
        raise ArtifactError(
            f"{source}: metadata 'sample_shape' must be a list of positive ints, got {shape!r}"
        )
    if not isinstance(meta["step"], int) or meta["step"] < 0:
        raise ArtifactError(f"{source}: metadata 'step' must be a non-negative int, got {meta['step']!r}")
    try:
        Prediction.parse(meta["prediction"])
        schedule_from_meta(meta)
    except DDPMError as e:
        raise ArtifactError(f"{source}: inconsistent metadata: {e}") from None
    # The network's own config must describe the same sample shape.
    if model["arch"] == "unet":
        expect = [model.get("in_channels"), model.get("image_size"), model.get("image_size")]
    else:
        expect = [model.get("dim")]
    if expect != shape:
        raise ArtifactError(
            f"{source}: inconsistent metadata: sample_shape {shape} does not match the {model['arch']} config {expect}"
        )


def schedule_from_meta(meta: dict[str, Any]) -> Schedule:
    """The training schedule stored in metadata."""
    return Schedule.from_config(meta["schedule"])
