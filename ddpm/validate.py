"""A small typed validator for the metadata every artifact carries, and bounded JSON parsing.

Every metadata dict (checkpoint, ONNX ``metadata_props``, TensorRT sidecar, ``train_state.pt``) is checked here,
before anything is allocated from it: types, ranges and the size caps below. The caps are far above what a real
model reaches and far below what would exhaust memory, so a tiny edited file cannot turn into a multi-GB
allocation. A spec is a plain object (``Int``, ``Float``, ``Str``, ``ListOf``, ``Record``); :func:`check` walks
a value against it and raises :class:`SchemaError` whose message names the field path (``model.depth``).

No pydantic: the specs are ~100 lines, add no dependency to the core, and the messages name the field path and
the allowed range in the project's own words.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ArtifactError, InvalidArgumentError

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_TIMESTEPS",
    "MAX_SAMPLE_ELEMENTS",
    "MAX_IMAGE_SIZE",
    "MAX_PARAMS",
    "MAX_NUM_SAMPLES",
    "MAX_BATCH_ELEMENTS",
    "MAX_CLASSES",
    "SchemaError",
    "Int",
    "Float",
    "Bool",
    "Str",
    "ListOf",
    "Record",
    "Optional",
    "check",
    "loads_json",
    "check_model_config",
    "estimate_params",
]

# A metadata value or sidecar: real ones are < 10 KB; a custom schedule of MAX_TIMESTEPS betas is ~2.5 MB.
MAX_JSON_BYTES = 4 << 20
# Real metadata nests 3 deep (meta -> model -> channel_mult); the cap stops RecursionError in any parser.
MAX_JSON_DEPTH = 16
# Diffusion steps T: papers use 1000-4000; every schedule array and coefficient table is O(T).
MAX_TIMESTEPS = 100_000
# One sample's values: 1024x1024 RGB is 3.1M; 2^24 (64 MB float32) leaves room and stops shape bombs.
MAX_SAMPLE_ELEMENTS = 1 << 24
# Image side: the largest pixel-space DDPMs are 512 (ADM) to 1024; resizing a dataset is O(N * S^2).
MAX_IMAGE_SIZE = 1024
# Network parameters, estimated from the config before it is built: ADM-512 has ~560M; 2^31 is 8 GB float32.
MAX_PARAMS = 1 << 31
# Samples of one run: global sample indices are 32-bit Philox counter words (ddpm.noise).
MAX_NUM_SAMPLES = 1 << 32
# --batch x one sample's values: 2^28 float32 values is 1 GiB per batch tensor (the loop holds a few).
MAX_BATCH_ELEMENTS = 1 << 28
# Classes of a conditional model (ImageNet has 1000); its class table is MAX_CLASSES x the embedding width.
MAX_CLASSES = 100_000
# Any string value (dataset name, versions, hashes); a real one is < 1 KB.
MAX_STR_CHARS = 1 << 16
# Keys of one metadata map or sidecar; real artifacts carry ~20.
MAX_KEYS = 256


class SchemaError(ArtifactError):
    """A value does not fit its spec; the message names the field path, what is allowed and what was found."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:50]}... ({type(value).__name__})"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class Int:
    lo: int
    hi: int

    def check(self, v: Any, path: str) -> int:
        if not _is_int(v) or not (self.lo <= v <= self.hi):
            raise SchemaError(f"{path} must be an integer in {self.lo}..{self.hi}, got {_show(v)}")
        return v


@dataclass(frozen=True)
class Float:
    lo: float
    hi: float
    open_lo: bool = False  # lo itself excluded
    open_hi: bool = False

    def check(self, v: Any, path: str) -> float:
        ok = (_is_int(v) or isinstance(v, float)) and math.isfinite(v)
        if ok:
            ok = (v > self.lo if self.open_lo else v >= self.lo) and (
                v < self.hi if self.open_hi else v <= self.hi
            )
        if not ok:
            lb, rb = "(" if self.open_lo else "[", ")" if self.open_hi else "]"
            raise SchemaError(
                f"{path} must be a finite number in {lb}{self.lo:g}, {self.hi:g}{rb}, got {_show(v)}"
            )
        return float(v)


@dataclass(frozen=True)
class Bool:
    def check(self, v: Any, path: str) -> bool:
        if not isinstance(v, bool):
            raise SchemaError(f"{path} must be true or false, got {_show(v)}")
        return v


@dataclass(frozen=True)
class Str:
    choices: tuple[str, ...] = ()
    max_len: int = MAX_STR_CHARS

    def check(self, v: Any, path: str) -> str:
        if not isinstance(v, str) or len(v) > self.max_len:
            raise SchemaError(f"{path} must be a string of at most {self.max_len} characters, got {_show(v)}")
        if self.choices and v not in self.choices:
            raise SchemaError(f"{path} must be one of {', '.join(self.choices)}, got {_show(v)}")
        return v


@dataclass(frozen=True)
class ListOf:
    item: Any
    min_len: int
    max_len: int

    def check(self, v: Any, path: str) -> list:
        if not isinstance(v, list) or not (self.min_len <= len(v) <= self.max_len):
            raise SchemaError(
                f"{path} must be a list of {self.min_len}..{self.max_len} items, got {_show(v)}"
            )
        return [self.item.check(x, f"{path}[{i}]") for i, x in enumerate(v)]


@dataclass(frozen=True)
class Optional:
    spec: Any

    def check(self, v: Any, path: str) -> Any:
        return None if v is None else self.spec.check(v, path)


@dataclass(frozen=True)
class Record:
    """A dict with known keys: ``required`` must be present, ``optional`` may be; others are refused unless
    ``extra`` (then only their number is capped)."""

    required: dict[str, Any]
    optional: dict[str, Any] = field(default_factory=dict)
    extra: bool = False

    def check(self, v: Any, path: str) -> dict:
        if not isinstance(v, dict) or len(v) > MAX_KEYS:
            raise SchemaError(f"{path} must be an object of at most {MAX_KEYS} keys, got {_show(v)}")
        missing = [k for k in self.required if k not in v]
        if missing:
            raise SchemaError(f"{path} lacks required key(s) {', '.join(missing)}")
        unknown = sorted(str(k) for k in v if k not in self.required and k not in self.optional)
        if unknown and not self.extra:
            raise SchemaError(f"{path} has unknown key(s) {', '.join(unknown)[:120]}")
        out = dict(v)
        for k, spec in (*self.required.items(), *self.optional.items()):
            if k in v:
                out[k] = spec.check(v[k], f"{path}.{k}")
        return out


class _SampleSize:
    """diffusers' ``sample_size``: one int (square images) or [H, W]."""

    def check(self, v: Any, path: str) -> int | list[int]:
        side = Int(1, MAX_IMAGE_SIZE)
        if isinstance(v, list) and len(v) == 2:
            return [side.check(s, f"{path}[{i}]") for i, s in enumerate(v)]
        if not _is_int(v):
            raise SchemaError(f"{path} must be an integer or [H, W] in 1..{MAX_IMAGE_SIZE}, got {_show(v)}")
        return side.check(v, path)


def check(spec: Any, value: Any, path: str) -> Any:
    """``spec.check(value, path)``: the value (ints kept, numbers as float) or SchemaError naming ``path``."""
    return spec.check(value, path)


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """Deepest bracket nesting of JSON text, found without parsing it (so without recursion)."""
    depth = deepest = 0
    for ch in _BRACKETS.findall(_STRING.sub("", text)):
        depth += 1 if ch in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def loads_json(
    text: str | bytes, *, what: str, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH
) -> Any:
    """``json.loads`` with a size and a nesting limit checked first; SchemaError naming ``what`` otherwise."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise SchemaError(f"{what} is not UTF-8 text") from None
    if not isinstance(text, str):
        raise SchemaError(f"{what} must be JSON text, got {type(text).__name__}")
    if len(text) > max_bytes:
        raise SchemaError(f"{what} is {len(text)} characters of JSON; at most {max_bytes} are read")
    if json_depth(text) > max_depth:
        raise SchemaError(f"{what} nests deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except RecursionError:  # the bracket count above missed a nesting hidden by odd quoting
        raise SchemaError(f"{what} nests deeper than {max_depth} levels") from None
    except json.JSONDecodeError as e:
        raise SchemaError(f"{what} is not valid JSON ({e.msg} at character {e.pos}): {text!r:.60}") from None


# ---- model configs (ddpm.models.normalize_config calls this before building anything) ----

# Per key: the largest value any real network uses, times a wide margin.
_MODEL_INT_CAPS = {
    "dim": MAX_SAMPLE_ELEMENTS,
    "hidden": 1 << 16,
    "time_dim": 1 << 16,
    "depth": 1024,
    "in_channels": 64,
    "out_channels": 64,
    "image_size": MAX_IMAGE_SIZE,
    "base_channels": 4096,
    "num_res_blocks": 64,
    "groups": 4096,
    "num_heads": 4096,
}
_MLP_INTS = ("dim", "hidden", "time_dim", "depth")
_UNET_INTS = (
    "in_channels",
    "image_size",
    "base_channels",
    "num_res_blocks",
    "groups",
    "num_heads",
    "out_channels",
)


def _int_list(cfg: dict, key: str, min_len: int, max_len: int, hi: int) -> None:
    v = cfg[key]
    ok = isinstance(v, (list, tuple)) and min_len <= len(v) <= max_len and all(_is_int(m) for m in v)
    if not ok or any(not (1 <= m <= hi) for m in v):
        what = "a non-empty list" if min_len else "a list"
        raise InvalidArgumentError(
            f"{key} must be {what} of positive ints (at most {max_len} items, each <= {hi}), got {_show(v)}"
        )


def check_model_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Types and caps of a model config with its defaults filled in (InvalidArgumentError naming the key);
    returns it (for ``unet2d``, with its numbers as floats where diffusers takes floats)."""
    if cfg.get("arch") == "unet2d":
        try:
            cfg = {
                "arch": "unet2d",
                **check(_UNET2D, {k: v for k, v in cfg.items() if k != "arch"}, "model config"),
            }
        except SchemaError as e:
            raise InvalidArgumentError(str(e)) from None
        _check_params(cfg)
        return cfg
    unet = cfg.get("arch") == "unet"
    for key in _UNET_INTS if unet else _MLP_INTS:
        v, hi = cfg.get(key), _MODEL_INT_CAPS[key]
        if not _is_int(v) or not (1 <= v <= hi):
            raise InvalidArgumentError(
                f"model config {key!r} must be a positive integer <= {hi}, got {_show(v)}"
            )
    k = cfg.get("num_classes", 0)
    if not _is_int(k) or not (0 <= k <= MAX_CLASSES):
        raise InvalidArgumentError(
            f"model config 'num_classes' must be an integer in 0..{MAX_CLASSES} (0: unconditional), got {_show(k)}"
        )
    if unet:
        _int_list(cfg, "channel_mult", 1, 8, 64)
        _int_list(cfg, "attention_resolutions", 0, 16, MAX_IMAGE_SIZE)
        d = cfg["dropout"]
        if not (_is_int(d) or isinstance(d, float)) or not (0.0 <= d < 1.0):
            raise InvalidArgumentError(f"dropout must be in [0, 1), got {_show(d)}")
    _check_params(cfg)
    return cfg


def _check_params(cfg: dict[str, Any]) -> None:
    n = estimate_params(cfg)
    if n > MAX_PARAMS:
        raise InvalidArgumentError(
            f"model config describes ~{n:.3g} parameters; at most {MAX_PARAMS:.3g} are built (a real DDPM has < 1e9)"
        )


def estimate_params(cfg: dict[str, Any]) -> int:
    """An upper bound on the parameter count of a type-checked config, computed without building it."""
    if cfg.get("arch") == "unet2d":
        return _estimate_unet2d(cfg)
    if cfg.get("arch") != "unet":
        h, depth = cfg["hidden"], cfg["depth"]
        return depth * (3 * h * h + 6 * h) + h * (cfg["time_dim"] + h + 2 * cfg["dim"] + 6)
    b, levels, nres = cfg["base_channels"], len(cfg["channel_mult"]), cfg["num_res_blocks"]
    c = b * max(cfg["channel_mult"])
    # A ResBlock reads at most 2c channels (up path: skip concatenated) -> <= 33 c^2 weights; attention 4 c^2;
    # each down/up sampling conv 9 c^2; the time MLP 32 b^2; convs in/out 9 c * 64; the class table (K + 1) 4b.
    blocks = 2 * levels * (nres + 1) + 2
    table = (cfg.get("num_classes", 0) + 1) * 4 * b
    return blocks * 37 * c * c + 18 * levels * c * c + 32 * b * b + 18 * 64 * c + table


# ---- diffusers' UNet2DModel (arch "unet2d", ddpm/unet2d.py): its keys, in diffusers' names ----

_CHANNELS = Int(1, 1 << 13)  # per level; real UNets use <= 1280
_UNET2D = Record(
    {
        "sample_size": Optional(_SampleSize()),
        "in_channels": Int(1, _MODEL_INT_CAPS["in_channels"]),
        "out_channels": Int(1, 2 * _MODEL_INT_CAPS["in_channels"]),
        "center_input_sample": Bool(),
        "time_embedding_type": Str(("positional", "learned")),
        "time_embedding_dim": Optional(Int(1, 1 << 16)),
        "freq_shift": Float(0, 1 << 13),
        "flip_sin_to_cos": Bool(),
        "down_block_types": ListOf(Str(max_len=64), 1, 8),
        "mid_block_type": Optional(Str(max_len=64)),
        "up_block_types": ListOf(Str(max_len=64), 1, 8),
        "block_out_channels": ListOf(_CHANNELS, 1, 8),
        "layers_per_block": Int(1, 64),
        "mid_block_scale_factor": Float(0, 1e6, open_lo=True),
        "downsample_padding": Int(0, 1),
        "downsample_type": Str(("conv", "resnet")),
        "upsample_type": Str(("conv", "resnet")),
        "dropout": Float(0, 1, open_hi=True),
        "act_fn": Str(("silu", "swish", "mish", "gelu", "relu")),
        "attention_head_dim": Optional(_CHANNELS),
        "norm_num_groups": _CHANNELS,
        "attn_norm_num_groups": Optional(_CHANNELS),
        "norm_eps": Float(0, 1, open_lo=True),
        "resnet_time_scale_shift": Str(("default", "scale_shift")),
        "add_attention": Bool(),
        "num_train_timesteps": Optional(Int(1, MAX_TIMESTEPS)),
    },
    {"num_class_embeds": Optional(Int(1, MAX_CLASSES))},
)


def _estimate_unet2d(cfg: dict[str, Any]) -> int:
    c, levels, n = max(cfg["block_out_channels"]), len(cfg["block_out_channels"]), cfg["layers_per_block"]
    c0 = cfg["block_out_channels"][0]
    e = cfg["time_embedding_dim"] or 4 * c0
    # A ResNet block reads at most 2c channels (up path: skip concatenated): conv1 18 c^2, conv2 9 c^2, shortcut
    # 2 c^2, time projection 2 c E; attention 4 c^2. Per level: n down and n + 1 up resnets and attentions, and a
    # resampler each way (a 9 c^2 conv or a resnet: counted as a resnet); the mid block 2 resnets + 1 attention.
    resnets, attentions = levels * (2 * n + 3) + 2, levels * (2 * n + 1) + 1
    table = ((cfg["num_train_timesteps"] or 0) + (cfg.get("num_class_embeds") or 0)) * max(c0, e)
    return (
        resnets * (29 * c * c + 2 * c * e + 8 * c)
        + attentions * (4 * c * c + 4 * c)
        + e * (c0 + e + 2)
        + table
        + 18 * 64 * c
    )
