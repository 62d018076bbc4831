"""Reading artifacts: which kind a file is, its ddpm metadata, and whether a TensorRT engine fits this machine.

Three kinds of artifact carry the same metadata (docs/design.md, "Artifacts"; :mod:`.metadata`):

    checkpoint  ``.safetensors``              safetensors ``__metadata__`` (the header only is read)
    onnx        ``.onnx``                     ``ModelProto.metadata_props``
    tensorrt    ``.trt`` / ``.engine`` / ``.plan``   the JSON sidecar ``<engine>.json`` beside the engine

and a fourth is read into the same metadata by an adapter (:mod:`.diffusers_folder`):

    diffusers   a folder: ``model_index.json`` (pipeline), or ``config.json`` + ``diffusion_pytorch_model.*``

Writing lives in ``ddpm.export``; reading lives here because the runtime must not import the exporter. Every
failure (missing, truncated, corrupt or edited file) is an :class:`ArtifactError` whose one-line message names
the file. Optional integrity checks (``verify=True``) recompute the weight / engine hashes the exporter stored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .diffusers_folder import is_diffusers_folder, read_folder
from .errors import ArtifactError, InvalidArgumentError
from .metadata import decode_metadata
from .validate import MAX_JSON_BYTES, Int, Optional, Record, SchemaError, Str, check, loads_json

__all__ = [
    "EXTENSIONS",
    "MAX_ONNX_IR_VERSION",
    "SIDECAR_KEYS",
    "artifact_kind",
    "read_metadata",
    "checkpoint_metadata",
    "open_safetensors",
    "read_sidecar",
    "sidecar_path",
    "check_engine_compat",
    "onnx_weights_sha256",
    "file_sha256",
    "load_onnx",
    "onnx_metadata",
]

EXTENSIONS = {
    ".safetensors": "checkpoint",
    ".onnx": "onnx",
    ".trt": "tensorrt",
    ".engine": "tensorrt",
    ".plan": "tensorrt",
}
# onnx 1.23 writes IR 14 by default; the pinned onnxruntime 1.31 reads at most IR 13.
MAX_ONNX_IR_VERSION = 13
# Keys a sidecar carries on top of the common metadata keys; their values stay native JSON (not strings).
SIDECAR_KEYS = ("tensorrt_version", "gpu_name", "compute_capability", "precision", "profile")
_SIDECAR_NATIVE = (*SIDECAR_KEYS, "version_compatible", "hardware_compat", "engine_sha256", "engine_bytes")
# An engine's batch profile: TensorRT's own limit on a dimension is 2^31 - 1; a real max batch is < 2^16.
MAX_BATCH = 1 << 20


class _Any:
    """A sidecar value checked later by its own function (profile, compute capability)."""

    def check(self, v: Any, path: str) -> Any:
        return v


class _Bool:
    def check(self, v: Any, path: str) -> bool:
        if not isinstance(v, bool):
            raise SchemaError(f"{path} must be true or false, got {v!r:.60}")
        return v


_SIDECAR_SPEC = Record(
    {"tensorrt_version": Str(max_len=64), "gpu_name": Str(max_len=256), "precision": Str(max_len=64)},
    {
        "compute_capability": _Any(),
        "profile": _Any(),
        "version_compatible": _Bool(),
        "hardware_compat": Optional(Str(max_len=64)),
        "engine_sha256": Str(max_len=128),
        "engine_bytes": Int(0, 1 << 50),
    },
)


def artifact_kind(path: str | os.PathLike, *, must_exist: bool = True) -> str:
    """``"checkpoint"`` | ``"onnx"`` | ``"tensorrt"``, from the file extension; ``"diffusers"`` for a diffusers
    pipeline or model folder (:func:`ddpm.diffusers_folder.is_diffusers_folder`).

    Raises InvalidArgumentError for an unknown extension, ArtifactError when ``must_exist`` and the file is absent.
    """
    p = Path(path)
    if is_diffusers_folder(p):
        return "diffusers"
    kind = EXTENSIONS.get(p.suffix.lower())
    if kind is None:
        allowed = ", ".join(EXTENSIONS)
        raise InvalidArgumentError(
            f"{str(p)!r} has an unknown extension {p.suffix or '(none)'!r}; allowed: {allowed}"
        )
    if must_exist:
        if not p.exists():
            raise ArtifactError(f"{p}: no such file")
        if not p.is_file():
            raise ArtifactError(f"{p}: not a regular file")
    return kind


def sidecar_path(engine: str | os.PathLike) -> Path:
    """The JSON sidecar of a TensorRT engine: ``unet.trt`` -> ``unet.trt.json``."""
    p = Path(engine)
    return p.with_name(p.name + ".json")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def onnx_weights_sha256(model: Any) -> str:
    """sha256 over an ONNX model's graph initializers, in name order: name, dtype, dims, then the raw bytes.

    Independent of metadata_props (so it can be stored there) and of protobuf field order.
    """
    from onnx import numpy_helper

    h = hashlib.sha256()
    for init in sorted(model.graph.initializer, key=lambda t: t.name):
        arr = numpy_helper.to_array(init)
        h.update(f"{init.name}|{init.data_type}|{list(init.dims)}|".encode())
        h.update(arr.tobytes(order="C"))
    return h.hexdigest()


def read_metadata(path: str | os.PathLike, *, verify: bool = False) -> dict[str, Any]:
    """The decoded, validated ddpm metadata of a checkpoint, ONNX file, TensorRT engine (via its sidecar) or
    diffusers folder (its configs, through the adapter; the EMA weights when it holds both).

    ``verify=True`` also recomputes the ONNX initializer hash / the engine file hash stored at export time and
    rejects a file whose weights were changed since (costs one full read of the file).
    """
    p = Path(path)
    kind = artifact_kind(p)
    if kind == "diffusers":
        return read_folder(p).meta
    if kind == "checkpoint":
        return checkpoint_metadata(p)
    if kind == "onnx":
        return onnx_metadata(load_onnx(p), source=str(p), verify=verify)
    return _read_engine(p, verify=verify)


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike, *, framework: str = "numpy") -> Iterator[Any]:
    """``safetensors.safe_open`` on the CPU; a missing, truncated or foreign file is one ArtifactError naming it."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework=framework, device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types; all mean "not readable"
        raise ArtifactError(f"{path}: not a readable safetensors checkpoint ({_one_line(e)})") from None
    with handle as f:
        yield f


def checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded, validated metadata of a safetensors checkpoint: its header only, no tensor is read."""
    with open_safetensors(path) as f:
        strings = f.metadata()
    return decode_metadata(strings, source=str(path))


def load_onnx(path: str | os.PathLike) -> Any:
    """``onnx.ModelProto`` of an ONNX file (weights inside the file included, external data not loaded)."""
    import onnx

    p = Path(path)
    try:
        # protobuf has no lazy fields: the initializers are parsed too. External data is not touched.
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf DecodeError and friends
        raise ArtifactError(f"{p}: not a readable ONNX model ({_one_line(e)})") from None
    if not model.HasField("graph") or not model.graph.output:
        raise ArtifactError(f"{p}: not a readable ONNX model (no graph; truncated or not ONNX)")
    if _check_external_data(model, p):
        from onnx.external_data_helper import load_external_data_for_model

        try:  # every location was checked above: relative, inside the model's folder, a regular file, in bounds
            load_external_data_for_model(model, str(p.parent))
        except Exception as e:  # noqa: BLE001 - onnx raises ValidationError, OSError, ...
            raise ArtifactError(f"{p}: its external data cannot be read ({_one_line(e)})") from None
    return model


def _check_external_data(model: Any, path: Path) -> bool:
    """True when tensors keep their data in external files, each of which is checked first (nothing is read from
    a file that fails): the location must be a relative path inside the model's folder (a sub-folder is fine),
    not escape it by ``..``, an absolute path or a symlink, and name a regular file (not a device) holding the
    tensor's bytes (offset + length within its size)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    folder = path.parent.resolve()
    external = False
    for tensor in _get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        external = True
        info = {e.key: e.value for e in tensor.external_data}
        loc = info.get("location", "")
        where = f"{path}: tensor {tensor.name[:60]!r} keeps its data in {loc[:120]!r}"
        rel = Path(loc)
        if not loc or rel.is_absolute() or ".." in rel.parts:
            raise ArtifactError(f"{where}; external data must be a relative path inside the model's folder")
        target = (path.parent / rel).resolve()
        if not target.is_relative_to(folder):
            raise ArtifactError(f"{where}, which leads out of the model's folder (a symlink?); refused")
        if not target.is_file():
            raise ArtifactError(f"{where}, which is not a regular file; refused")
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
        except ValueError:
            raise ArtifactError(f"{where} with a non-integer offset/length") from None
        size = target.stat().st_size
        if offset < 0 or offset > size or (length >= 0 and offset + length > size):
            raise ArtifactError(
                f"{where} at offset {offset}, length {length}, but that file has {size} bytes"
            )
    return external


def onnx_metadata(model: Any, *, source: str, verify: bool = False) -> dict[str, Any]:
    """Decoded metadata of a loaded ONNX model; ``verify`` recomputes the initializer hash stored at export."""
    if model.ir_version > MAX_ONNX_IR_VERSION:
        raise ArtifactError(
            f"{source}: ONNX IR version {model.ir_version} is newer than onnxruntime reads (<= {MAX_ONNX_IR_VERSION}); "
            "re-export it with `ddpm export`"
        )
    meta = decode_metadata({e.key: e.value for e in model.metadata_props}, source=source)
    if verify:
        stored = meta.get("weights_sha256")
        if stored is None:
            raise ArtifactError(f"{source}: metadata has no weights_sha256 to verify the weights against")
        actual = onnx_weights_sha256(model)
        if actual != stored:
            raise ArtifactError(
                f"{source}: weights do not match the metadata (sha256 {actual[:12]}... != stored {stored[:12]}...); "
                "the file was modified after export"
            )
    return meta


def read_sidecar(engine: str | os.PathLike) -> dict[str, Any]:
    """The raw JSON object of an engine's sidecar: size- and depth-limited, no validation beyond "is an object"."""
    side = sidecar_path(engine)
    if not side.exists():
        raise ArtifactError(
            f"{engine}: the engine's sidecar {side.name} is missing; it is written by `ddpm export` beside the engine"
        )
    if not side.is_file():
        raise ArtifactError(
            f"{side}: the engine's sidecar is not a regular file (a directory?); expected JSON"
        )
    size = side.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ArtifactError(
            f"{side}: sidecar is {size} bytes; a real one is a few KB (at most {MAX_JSON_BYTES})"
        )
    try:
        obj = loads_json(side.read_bytes(), what="sidecar")
    except SchemaError as e:
        raise ArtifactError(f"{side}: {e}") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{side}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _read_engine(p: Path, *, verify: bool) -> dict[str, Any]:
    side = sidecar_path(p)
    obj = read_sidecar(p)
    # The common keys go through the same decoder as every other artifact; the TensorRT facts stay native JSON.
    strings = {
        k: v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        for k, v in obj.items()
        if k not in _SIDECAR_NATIVE
    }
    meta = decode_metadata(strings, source=str(side))
    missing = [k for k in SIDECAR_KEYS if k not in obj]
    if missing:
        raise ArtifactError(f"{side}: sidecar lacks TensorRT key(s) {', '.join(missing)}")
    try:
        native = check(_SIDECAR_SPEC, {k: obj[k] for k in _SIDECAR_NATIVE if k in obj}, "sidecar")
    except SchemaError as e:
        raise ArtifactError(f"{side}: {e}") from None
    meta.update(native)
    _validate_profile(meta["profile"], source=str(side))
    meta["compute_capability"] = _cc_string(meta["compute_capability"], source=str(side))
    size = p.stat().st_size
    if "engine_bytes" in meta and meta["engine_bytes"] != size:
        raise ArtifactError(
            f"{p}: engine is {size} bytes but its sidecar records {meta['engine_bytes']} (truncated or replaced)"
        )
    if verify and "engine_sha256" in meta:
        actual = file_sha256(p)
        if actual != meta["engine_sha256"]:
            raise ArtifactError(
                f"{p}: engine bytes do not match its sidecar (sha256 {actual[:12]}... != {meta['engine_sha256'][:12]}...)"
            )
    return meta


def _validate_profile(profile: Any, *, source: str) -> None:
    ok = (
        isinstance(profile, dict)
        and len(profile) <= 3
        and all(
            isinstance(profile.get(k), int) and not isinstance(profile.get(k), bool)
            for k in ("min", "opt", "max")
        )
    )
    if not ok or not (1 <= profile["min"] <= profile["opt"] <= profile["max"] <= MAX_BATCH):
        raise ArtifactError(
            f"{source}: 'profile' must be {{min, opt, max}} ints with 1 <= min <= opt <= max <= {MAX_BATCH}, "
            f"got {profile!r:.120}"
        )


def _cc_string(cc: Any, *, source: str) -> str:
    """Normalise a compute capability (``"9.0"``, ``[9, 0]``, ``(9, 0)``) to ``"major.minor"``."""
    if isinstance(cc, (list, tuple)) and len(cc) == 2 and all(isinstance(v, int) for v in cc):
        return f"{cc[0]}.{cc[1]}"
    if isinstance(cc, str):
        parts = cc.strip().split(".")
        if len(parts) == 2 and all(s.isdigit() for s in parts):
            return f"{int(parts[0])}.{int(parts[1])}"
    raise ArtifactError(f"{source}: compute capability must look like '9.0', got {cc!r:.60}")


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in str(v).split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def check_engine_compat(
    sidecar_meta: dict[str, Any],
    *,
    trt_version: str,
    gpu_name: str,
    compute_capability: str | tuple[int, int],
    source: str = "engine",
) -> None:
    """Raise ArtifactError (naming both values) unless an engine with this sidecar can run here.

    TensorRT engines are tied to the TensorRT version and the GPU they were built for. Two build flags relax that
    (and are recorded in the sidecar): ``version_compatible`` engines run on the same or a later TensorRT of the
    same major version; ``hardware_compat == "ampere+"`` engines run on any GPU of compute capability >= 8.0.
    """
    built_v = str(sidecar_meta["tensorrt_version"])
    here_v = str(trt_version)
    hint = "; rebuild it here with `ddpm export --ckpt CKPT --out ENGINE`"
    if sidecar_meta.get("version_compatible"):
        b, h = _version_tuple(built_v), _version_tuple(here_v)
        if not b or not h or b[0] != h[0] or h < b:
            raise ArtifactError(
                f"{source}: version-compatible engine built with TensorRT {built_v} cannot run on TensorRT {here_v} "
                f"(needs the same major version, not older){hint}"
            )
    elif _version_tuple(built_v) != _version_tuple(here_v):
        raise ArtifactError(
            f"{source}: engine was built with TensorRT {built_v} but this machine has TensorRT {here_v}{hint}"
        )

    built_cc = _cc_string(sidecar_meta["compute_capability"], source=source)
    here_cc = _cc_string(compute_capability, source="this GPU")
    if sidecar_meta.get("hardware_compat") == "ampere+":
        if _version_tuple(here_cc) < (8, 0):
            raise ArtifactError(
                f"{source}: engine was built for Ampere and newer GPUs (compute capability >= 8.0) but this GPU "
                f"({gpu_name}) has compute capability {here_cc}{hint}"
            )
        return
    if built_cc != here_cc:
        raise ArtifactError(
            f"{source}: engine was built for compute capability {built_cc} ({sidecar_meta.get('gpu_name')}) but this "
            f"GPU ({gpu_name}) has compute capability {here_cc}{hint}"
        )
    if str(sidecar_meta.get("gpu_name", "")).strip() != str(gpu_name).strip():
        raise ArtifactError(
            f"{source}: engine was built on GPU {sidecar_meta.get('gpu_name')!r} but this GPU is {gpu_name!r} "
            f"(TensorRT engines are specific to the GPU model){hint}"
        )


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__
