"""A request body becomes a value here, in one place: JSON (``/v1/samples``) or form fields (``/v1/denoise``) ->
a :class:`SampleRequest` / :class:`DenoiseRequest` holding one validated :class:`ddpm.SamplingOptions`.

The JSON types are gated first (``"seed": true`` is not the seed 1, ``"num_samples": 1e9`` is not an integer);
ranges and combinations are SamplingOptions' own checks, whose messages name the field. Anything else in the
body is refused, naming the fields allowed. Every refusal is a :class:`RequestError` with an HTTP status.

Adding a sampling option to the API (class labels, a guidance scale) is its SamplingOptions field plus one
line in OPTION_FIELDS (``"guidance": NUMBER + NULL,`` is such a line).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ddpm.errors import DDPMError, InvalidArgumentError
from ddpm.images import load_image
from ddpm.options import SamplingOptions, check_num_samples
from ddpm.validate import loads_json

from .limits import Limits

__all__ = [
    "RequestError",
    "SampleRequest",
    "DenoiseRequest",
    "OPTION_FIELDS",
    "FORMATS",
    "parse_sample_request",
    "parse_denoise_form",
    "decode_image",
]

INT, NUMBER, STR, NULL, BOOL, LIST = (int,), (int, float), (str,), (type(None),), (bool,), (list,)

# Request field -> the JSON types it may hold. Each is the SamplingOptions field of that name.
OPTION_FIELDS: dict[str, tuple[type, ...]] = {
    "seed": INT,
    "sampler": STR,
    "steps": INT,
    "spacing": STR,
    "eta": NUMBER,
    "clip": NUMBER + STR + NULL,  # a number, "inf" (no clipping), or null (the model's recommendation)
    "variance": STR,
    "classes": INT
    + STR
    + LIST,  # a class-conditional model's class numbers or names, cycled over the samples
    "guidance": NUMBER + NULL,  # classifier-free guidance scale S (1: plain conditional)
}
SAMPLE_FIELDS: dict[str, tuple[type, ...]] = {
    "model": STR,
    "num_samples": INT,
    "format": STR,
    **OPTION_FIELDS,
}
DENOISE_FIELDS: dict[str, tuple[type, ...]] = {
    "model": STR,
    "t": INT,
    "sigma": NUMBER,
    "add_noise": BOOL,
    "format": STR,
    **OPTION_FIELDS,
}
FORMATS = ("png", "npz", "json")
_MAX_JSON_DEPTH = 8  # today's bodies are flat; room for a list of class labels


class RequestError(InvalidArgumentError):
    """A refused request: ``status`` (4xx) and one line; ``headers`` go with the answer (Retry-After ...)."""

    def __init__(self, message: str, status: int = 400, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, dict(headers or {})


@dataclass(frozen=True)
class SampleRequest:
    """``POST /v1/samples``: samples 0 .. num_samples - 1 of ``options.seed`` from ``model``, as ``format``."""

    model: str
    num_samples: int
    options: SamplingOptions
    format: str = "png"


@dataclass(frozen=True)
class DenoiseRequest:
    """``POST /v1/denoise``: the image (file bytes) from noise level t or sigma back to x_0 (runtime/img2img)."""

    model: str
    image: bytes
    t: int | None
    sigma: float | None
    add_noise: bool
    options: SamplingOptions
    format: str = "png"


def _typed(fields: Mapping[str, Any], allowed: Mapping[str, tuple[type, ...]]) -> dict[str, Any]:
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}; allowed: {', '.join(allowed)}")
    for k, v in fields.items():
        types = allowed[k]
        if isinstance(v, bool) and bool not in types or not isinstance(v, types):
            raise RequestError(f"{k} must be {_wanted(types)}, got {_show(v)}")
    return dict(fields)


_TYPE_NAMES = {
    int: "an integer",
    float: "a number",
    str: "a string",
    type(None): "null",
    bool: "true or false",
    list: "a list",
}


def _wanted(types: tuple[type, ...]) -> str:
    return " or ".join(_TYPE_NAMES[t] for t in types if not (t is int and float in types))


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _model(fields: dict[str, Any], models: Sequence[str]) -> str:
    name = fields.pop("model", None)
    if name is None:
        if len(models) == 1:
            return models[0]
        raise RequestError(f"give the model: one of {', '.join(models)}")
    if name not in models:
        raise RequestError(f"unknown model {_show(name)}; loaded: {', '.join(models)}")
    return name


def _format(fields: dict[str, Any]) -> str:
    fmt = str(fields.pop("format", "png")).lower()
    if fmt not in FORMATS:
        raise RequestError(f"format must be one of {', '.join(FORMATS)}, got {_show(fmt)}")
    return fmt


def _options(base: SamplingOptions, fields: dict[str, Any]) -> SamplingOptions:
    """The server's options with the request's option fields: SamplingOptions validates them, once."""
    try:
        return base.replace(**{k: fields.pop(k) for k in OPTION_FIELDS if k in fields})
    except DDPMError as e:
        raise RequestError(str(e)) from None


def parse_sample_request(
    body: bytes, *, models: Sequence[str], base: SamplingOptions, limits: Limits
) -> SampleRequest:
    """A ``/v1/samples`` JSON body -> a SampleRequest (or RequestError). Absent fields take what ``ddpm run``
    takes: num_samples 1 here, seed 0, and the model's recommended sampler / steps / clip (``base`` has
    ``recommended=True``)."""
    try:
        data = loads_json(
            body, what="the request body", max_bytes=limits.max_body_bytes, max_depth=_MAX_JSON_DEPTH
        )
    except DDPMError as e:
        raise RequestError(str(e)) from None
    if not isinstance(data, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(data).__name__}")
    fields = _typed(data, SAMPLE_FIELDS)
    model, fmt = _model(fields, models), _format(fields)
    n = fields.pop("num_samples", 1)
    try:
        n = check_num_samples(n)
    except DDPMError as e:
        raise RequestError(str(e)) from None
    if n > limits.max_samples:
        raise RequestError(f"num_samples must be <= {limits.max_samples} on this server, got {n}")
    return SampleRequest(model, n, _options(base, fields), fmt)


def _from_text(name: str, text: str, types: tuple[type, ...]) -> Any:
    """A form field's text as the JSON value it stands for (forms carry strings only)."""
    t = text.strip()
    if bool in types:
        if t.lower() in ("true", "1", "yes", "on"):
            return True
        if t.lower() in ("false", "0", "no", "off"):
            return False
    elif int in types and t.lstrip("+-").isdigit() and len(t) < 40:
        return int(t)
    elif float in types and len(t) < 40:
        try:
            return float(t)
        except ValueError:
            pass
    if str in types:
        return t
    if type(None) in types and t.lower() in ("", "null", "none"):
        return None
    raise RequestError(f"{name} must be {_wanted(types)}, got {_show(t)}")


def parse_denoise_form(
    form: Mapping[str, str], image: bytes, *, models: Sequence[str], base: SamplingOptions
) -> DenoiseRequest:
    """The text fields of a ``/v1/denoise`` form (and the image file's bytes) -> a DenoiseRequest. Exactly one
    of t (a timestep) or sigma (pixel-space noise); add_noise default true (SDEdit)."""
    unknown = sorted(set(form) - set(DENOISE_FIELDS))
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}; allowed: image, {', '.join(DENOISE_FIELDS)}")
    fields = {k: _from_text(k, v, DENOISE_FIELDS[k]) for k, v in form.items()}
    model, fmt = _model(fields, models), _format(fields)
    t, sigma = fields.pop("t", None), fields.pop("sigma", None)
    if (t is None) == (sigma is None):
        raise RequestError("give the noise level as exactly one of t (a timestep) or sigma (pixel space)")
    add_noise = fields.pop("add_noise", True)
    return DenoiseRequest(model, image, t, sigma, add_noise, _options(base, fields), fmt)


class _Upload(io.BytesIO):
    """An uploaded file as load_image reads it; named in messages as what it is, not as a memory address."""

    def __str__(self) -> str:
        return "the uploaded image"


def decode_image(data: bytes, shape: Sequence[int], max_pixels: int) -> Any:
    """The uploaded file as [1, C, H, W] float32 in [-1, 1], converted and resized to the model's shape (as
    ``ddpm denoise`` reads a file). Its pixel count is read from the header and checked before decoding."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as f:
            w, h = f.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise RequestError("the uploaded file is not an image PIL can read (PNG, JPEG, BMP, ...)") from None
    if w * h > max_pixels:
        raise RequestError(
            f"the image is {w}x{h} = {w * h} pixels; this server takes at most {max_pixels}", 413
        )
    try:
        x, _ = load_image(_Upload(data), shape)
    except DDPMError as e:
        raise RequestError(str(e)) from None
    return x
