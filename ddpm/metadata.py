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
    sampling      optional {"sampler", "steps", "clip"}: what the trainer's previews used; ``ddpm run``'s
                  default when no --sampler/--steps/--clip is given (:func:`recommended_sampling`)
plus any extra keys (exporter versions, weight hash, TensorRT facts), kept as given.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import ArtifactError, DDPMError, InvalidArgumentError
from .models import normalize_config
from .schedule import Prediction, Sampler, Schedule
from .validate import (
    MAX_JSON_BYTES,
    MAX_KEYS,
    MAX_SAMPLE_ELEMENTS,
    MAX_TIMESTEPS,
    Float,
    Int,
    ListOf,
    Optional,
    Record,
    SchemaError,
    Str,
    check,
    loads_json,
)

__all__ = [
    "FORMAT",
    "REQUIRED_KEYS",
    "encode_metadata",
    "decode_metadata",
    "validate_metadata",
    "schedule_from_meta",
    "recommended_sampling",
]

FORMAT = "ddpm/1"
REQUIRED_KEYS = ("format", "model", "schedule", "prediction", "sample_shape", "dataset", "step")
_JSON_KEYS = {"model", "schedule", "sample_shape", "step", "ema_decay", "sampling"}

_STEPS = Int(1, MAX_TIMESTEPS)
_SCHEDULES = {
    "linear": Record(
        {
            "kind": Str(),
            "timesteps": _STEPS,
            "beta_start": Float(0, 1, True, True),
            "beta_end": Float(0, 1, True, True),
        },
        {"steps": _STEPS},
    ),
    "cosine": Record(
        {"kind": Str(), "timesteps": _STEPS},
        {"s": Float(0, 1e3), "max_beta": Float(0, 1, True, True), "steps": _STEPS},
    ),
    "custom": Record(
        {"kind": Str(), "betas": ListOf(Float(0, 1, True, True), 1, MAX_TIMESTEPS)}, {"steps": _STEPS}
    ),
}
# The common keys; anything else (exporter versions, hashes, TensorRT facts) is kept, its size capped.
_META = Record(
    {
        "format": Str(),
        "model": Record({"arch": Str(("unet", "mlp"))}, extra=True),
        "schedule": Record({"kind": Str(tuple(_SCHEDULES))}, extra=True),
        "prediction": Str(max_len=64),
        "sample_shape": ListOf(Int(1, MAX_SAMPLE_ELEMENTS), 1, 4),
        "dataset": Str(max_len=4096),
        "step": Int(0, 2**62),
    },
    {
        "ema_decay": Optional(Float(0, 1)),
        "sampling": Record(
            {"sampler": Str(max_len=64), "steps": _STEPS}, {"clip": Optional(Float(0, 1e30, True, True))}
        ),
    },
    extra=True,
)


def encode_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """Flatten to ``str -> str`` (JSON for structured values) after validating."""
    validate_metadata(meta, source="metadata to write")
    out: dict[str, str] = {}
    for k, v in meta.items():
        out[k] = v if isinstance(v, str) and k not in _JSON_KEYS else json.dumps(v, sort_keys=True)
    return out


def decode_metadata(strings: dict[str, str] | None, *, source: str) -> dict[str, Any]:
    """Parse and validate a ``str -> str`` map read from ``source`` (a path, for messages).

    Every value is size-checked and the JSON ones are parsed with a depth limit before anything else is read.
    """
    if not strings:
        raise ArtifactError(
            f"{source}: no ddpm metadata found (was it written by `ddpm train`/`ddpm export`?)"
        )
    if len(strings) > MAX_KEYS:
        raise ArtifactError(f"{source}: metadata has {len(strings)} keys; at most {MAX_KEYS} are read")
    meta: dict[str, Any] = {}
    for k, v in strings.items():
        if not isinstance(k, str) or not isinstance(v, str) or len(k) > 256 or len(v) > MAX_JSON_BYTES:
            raise ArtifactError(
                f"{source}: metadata key {str(k)[:60]!r} is not a string of at most {MAX_JSON_BYTES} bytes"
            )
        if k in _JSON_KEYS:
            try:
                meta[k] = loads_json(v, what=f"metadata key {k!r}")
            except SchemaError as e:
                raise ArtifactError(f"{source}: {e}") from None
        else:
            meta[k] = v
    validate_metadata(meta, source=source)
    return meta


def validate_metadata(meta: dict[str, Any], *, source: str) -> None:
    """Raise ArtifactError naming ``source`` and the field when metadata is missing, mistyped, over a size cap
    (ddpm.validate) or inconsistent. Nothing is allocated from the metadata before its types and caps pass."""
    if not isinstance(meta, dict):
        raise ArtifactError(f"{source}: metadata must be an object, got {type(meta).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ArtifactError(f"{source}: metadata lacks required key(s) {', '.join(missing)}")
    if meta["format"] != FORMAT:
        raise ArtifactError(
            f"{source}: metadata format {str(meta['format'])[:60]!r} is not supported (expected {FORMAT!r})"
        )
    model = meta["model"]
    if not isinstance(model, dict) or model.get("arch") not in ("unet", "mlp"):
        raise ArtifactError(
            f"{source}: metadata 'model' must be a dict with arch 'unet' or 'mlp', got {model!r:.120}"
        )
    try:
        check(_META, meta, "metadata")
        check(_SCHEDULES[meta["schedule"]["kind"]], meta["schedule"], "metadata.schedule")
    except SchemaError as e:
        raise ArtifactError(f"{source}: {e}") from None
    shape = meta["sample_shape"]
    if math.prod(shape) > MAX_SAMPLE_ELEMENTS:
        raise ArtifactError(
            f"{source}: metadata.sample_shape {shape} holds {math.prod(shape)} values per sample; "
            f"at most {MAX_SAMPLE_ELEMENTS} are allowed"
        )
    try:
        # The same checks `ddpm run` applies when it builds the network: info accepts exactly what run accepts.
        normalize_config(model)
    except InvalidArgumentError as e:
        raise ArtifactError(f"{source}: the stored model config is invalid: {e}") from None
    try:
        Prediction.parse(meta["prediction"])
        schedule_from_meta(meta)
        if "sampling" in meta:
            Sampler.parse(meta["sampling"]["sampler"])
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


def recommended_sampling(meta: dict[str, Any]) -> dict[str, Any]:
    """The sampler, steps and clip the artifact's trainer previewed with (``{}`` for artifacts from before the
    key existed). Steps are capped by the schedule's length, as a later respacing could shorten it."""
    rec = meta.get("sampling")
    if not isinstance(rec, dict):
        return {}
    out = {"sampler": rec["sampler"], "steps": min(int(rec["steps"]), len(schedule_from_meta(meta)))}
    out["clip"] = rec.get("clip")
    return out
