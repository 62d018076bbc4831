"""Artifact metadata: the keys every checkpoint, ONNX file and engine sidecar carries (docs/design.md,
"Artifacts").

On disk, metadata is a flat ``str -> str`` map (safetensors ``__metadata__``, ONNX ``metadata_props``, the
sidecar JSON): structured values are JSON-encoded. In memory it is a plain dict with decoded values:

    format        "ddpm/1"
    model         dict, the network config; ``model["arch"]`` is "unet", "mlp" or "unet2d" (diffusers'
                  UNet2DModel, keys in diffusers' names: ddpm/unet2d_config.py)
    schedule      dict, :attr:`Schedule.config` of the TRAINING schedule
    prediction    "eps" | "x0" | "v"
    sample_shape  list[int], one sample's shape: [C, H, W] for images, [D] for vectors
    dataset       str
    step          int, training step of the weights
    ema_decay     float | None
    sampling      optional {"sampler", "steps", "clip"}: what the trainer's previews used; ``ddpm run``'s
                  default when no --sampler/--steps/--clip is given (:func:`recommended_sampling`)
    variance      optional "fixed_small" | "fixed_large" | "learned_range": the model's DDPM reverse variance;
                  absent = fixed_small (our own checkpoints). learned_range models output 2C channels
                  (:func:`output_shape`): the prediction, then the interpolation v (Nichol & Dhariwal 2021)
    source        optional dict, where an imported model came from: {"format": "diffusers", "unet_class",
                  "scheduler_class", "weights" (file), "weights_kind" ("ema" | "main"), ...}
    classes       optional {"count": K, "null": int | None, "names": [K str] | None, "p_uncond": float | None}:
                  present exactly when the network is class-conditional (docs/design.md, "Conditional models");
                  ``null`` is the null class's index (our trainer: K) or None when unknown (an imported diffusers
                  model), ``p_uncond`` the label-dropout probability it was trained with (:func:`class_info`)
plus any extra keys (exporter versions, weight hash, TensorRT facts), kept as given.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass
from typing import Any

from .errors import ArtifactError, DDPMError, InvalidArgumentError
from .models import class_count, normalize_config, sample_shape
from .schedule import Prediction, Sampler, Schedule
from .validate import (
    MAX_CLASSES,
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
    "output_shape",
    "VARIANCES",
    "ClassInfo",
    "class_info",
]

FORMAT = "ddpm/1"
REQUIRED_KEYS = ("format", "model", "schedule", "prediction", "sample_shape", "dataset", "step")
_JSON_KEYS = {"model", "schedule", "sample_shape", "step", "ema_decay", "sampling", "source", "classes"}
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
ARCHS = ("unet", "mlp", "unet2d")

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
    "scaled_linear": Record(
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
        "model": Record({"arch": Str(ARCHS)}, extra=True),
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
        "variance": Str(VARIANCES),
        "source": Record({"format": Str(max_len=64)}, extra=True),
        "classes": Record(
            {"count": Int(1, MAX_CLASSES)},
            {
                "null": Optional(Int(0, MAX_CLASSES)),
                "names": Optional(ListOf(Str(max_len=256), 1, MAX_CLASSES)),
                "p_uncond": Optional(Float(0, 1, open_hi=True)),
            },
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
    if not isinstance(model, dict) or model.get("arch") not in ARCHS:
        raise ArtifactError(
            f"{source}: metadata 'model' must be a dict with arch {', '.join(ARCHS)}, got {model!r:.120}"
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
        model = normalize_config(model)
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
    expect = sample_shape(model)
    if expect != shape:
        raise ArtifactError(
            f"{source}: inconsistent metadata: sample_shape {shape} does not match the {model['arch']} config {expect}"
        )
    _check_variance(meta, model, source)
    _check_classes(meta, model, source)


def _check_variance(meta: dict[str, Any], model: dict[str, Any], source: str) -> None:
    """A learned-variance model outputs 2C channels, and only such a model may say ``learned_range``; a learned
    time embedding must cover every timestep of the schedule."""
    variance = meta.get("variance", "fixed_small")
    learned = model["arch"] == "unet2d" and model["out_channels"] == 2 * model["in_channels"]
    if learned != (variance == "learned_range"):
        what = f"outputs {model['out_channels']} channels for {model['in_channels']} input channels"
        raise ArtifactError(
            f"{source}: inconsistent metadata: variance {variance!r} but the model {what} "
            "(learned_range models, and only they, output twice the input channels)"
        )
    table = model.get("num_train_timesteps") if model.get("time_embedding_type") == "learned" else None
    steps = schedule_from_meta(meta).num_timesteps
    if table is not None and table < steps:
        raise ArtifactError(
            f"{source}: inconsistent metadata: the model's learned time embedding has {table} entries but the "
            f"schedule has {steps} timesteps"
        )


def _check_classes(meta: dict[str, Any], model: dict[str, Any], source: str) -> None:
    """``classes`` is present exactly for a class-conditional network and agrees with its class table: our UNet
    holds K classes and the null class K; diffusers' table holds K classes, and whether one of them was trained as
    the null class is not known (None) unless the metadata says which."""
    k, info = class_count(model), meta.get("classes")
    bad = None
    if info is None:
        bad = (
            f"the {model['arch']} network is conditioned on {k} classes but metadata lacks 'classes'"
            if k
            else None
        )
    elif not k:
        bad = f"metadata 'classes' (count {info['count']}) but the {model['arch']} network is unconditional"
    elif info["count"] != k:
        bad = f"classes.count {info['count']} but the {model['arch']} network's class table holds {k} classes"
    elif model["arch"] == "unet" and info.get("null") != k:
        bad = f"classes.null is {info.get('null')} but this UNet's null class is its last row, {k}"
    elif model["arch"] != "unet" and info.get("null") is not None and info["null"] >= k:
        bad = f"classes.null {info['null']} is outside the network's class table 0..{k - 1}"
    elif info.get("names") is not None and len(info["names"]) != k:
        bad = f"classes.names holds {len(info['names'])} names for {k} classes"
    elif info.get("names") is not None and len(set(info["names"])) != k:
        bad = "classes.names repeats a name: a name must pick one class"
    if bad:
        raise ArtifactError(f"{source}: inconsistent metadata: {bad}")


@dataclass(frozen=True)
class ClassInfo:
    """What a class-conditional artifact's metadata says of its classes (``meta["classes"]``, validated).

    count: K, the classes 0..K-1. null: the index of the null (unconditional) class, or None when unknown (then
    guidance is refused). names: K names or None. p_uncond: the label-dropout probability of training, or None.
    """

    count: int
    null: int | None
    names: tuple[str, ...] | None
    p_uncond: float | None

    def index_of(self, cls: int | str) -> int:
        """A class name or number (``"cat"``, ``3``, ``"3"``) -> its index in 0..K-1; InvalidArgumentError
        (one line) otherwise."""
        if isinstance(cls, str) and self.names is not None and cls in self.names:
            return self.names.index(cls)
        text = cls.strip() if isinstance(cls, str) else None
        if text is not None and text.isdigit() and len(text) <= 9:
            cls = int(text)
        elif hasattr(cls, "__index__") and not isinstance(cls, (bool, str)):  # numpy and torch integers too
            cls = operator.index(cls)
        if isinstance(cls, int) and not isinstance(cls, bool) and 0 <= cls < self.count:
            return cls
        if isinstance(cls, int) and not isinstance(cls, bool):
            raise InvalidArgumentError(
                f"class {cls} is out of range: this model has classes 0..{self.count - 1}"
            )
        shown = ", ".join((self.names or ())[:12]) + (", ..." if self.names and self.count > 12 else "")
        raise InvalidArgumentError(
            f"class {str(cls)[:60]!r} is not a class of this model: give a number in 0..{self.count - 1}"
            + (f" or a name ({shown})" if shown else "")
        )


def class_info(meta: dict[str, Any]) -> ClassInfo | None:
    """The classes of a validated artifact metadata dict; None for an unconditional model."""
    info = meta.get("classes")
    if info is None:
        return None
    names = info.get("names")
    p = info.get("p_uncond")
    return ClassInfo(int(info["count"]), info.get("null"), tuple(names) if names else None,
                     None if p is None else float(p))  # fmt: skip


def output_shape(meta: dict[str, Any]) -> list[int]:
    """One model output's shape: ``sample_shape``, with 2C channels for a learned-variance model (its first C
    channels are the prediction, the next C the variance interpolation v)."""
    shape = list(meta["sample_shape"])
    if meta.get("variance") == "learned_range":
        shape[0] *= 2
    return shape


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
