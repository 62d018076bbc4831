"""ONNX -> TensorRT engine with TensorRT's public Python API (10.x; also 11.x), plus the engine's JSON sidecar.

The build (Polygraphy / TensorRT samples habits, no deprecated calls: no ``max_workspace_size``, no implicit
batch, no precision builder flags):

    builder -> network (STRONGLY_TYPED) -> OnnxParser (every parser error printed before failing)
    -> one optimization profile from ``--batch MIN,OPT,MAX`` for x [N, *sample_shape], t [N] (and y [N])
    -> TF32 on (``tf32``) or off (``fp32``: TensorRT enables TF32 by default)
    -> timing cache loaded from / saved to ``--timing-cache`` -> ``build_serialized_network``

Precision lives in the ONNX graph, not in builder flags: fp16 and bf16 engines are built from the half-precision
graph of :mod:`.precision` (normalisation, softmax and the timestep branch kept fp32, I/O fp32) as strongly typed
networks. TensorRT deprecated the weakly typed FP16/BF16 flags in 10.12 and removed them in 11, and this way the
TensorRT engine runs the same mixed-precision graph that onnxruntime checked.

Nothing here can run without an NVIDIA GPU and the tensorrt package; the tests that build engines are marked
``trt``. Everything around the build (profile parsing, the sidecar, the error lines) is plain Python.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ddpm.cliutil import parse_int_list
from ddpm.devices import TENSORRT_INSTALL_HINT, find_tensorrt, gpu_facts, resolve_device, tensorrt_logger
from ddpm.errors import ArtifactError, InvalidArgumentError, MissingDependencyError
from ddpm.io import write_bytes_atomic
from ddpm.metadata import decode_metadata, encode_metadata

__all__ = [
    "PRECISIONS",
    "HARDWARE_COMPAT",
    "DEFAULT_PROFILE",
    "INSTALL_HINT",
    "BatchProfile",
    "parse_profile",
    "parse_batches",
    "parse_precision",
    "parse_hardware_compat",
    "require_tensorrt",
    "gpu_facts",
    "build_serialized_engine",
    "make_sidecar",
]

PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
HARDWARE_COMPAT = ("none", "ampere+")
DEFAULT_PROFILE = "1,64,256"
INSTALL_HINT = TENSORRT_INSTALL_HINT
_MAX_BATCH = 1 << 16
# Keys the sidecar sets itself (an ONNX file's own "precision" / weight hash describe the ONNX, not the engine).
_SIDECAR_OWN = ("precision", "weights_sha256")


@dataclass(frozen=True)
class BatchProfile:
    """A TensorRT optimization profile over the batch axis: kernels are tuned for ``opt``, valid for min..max."""

    min: int
    opt: int
    max: int

    def as_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}

    def parity_batches(self) -> tuple[int, ...]:
        """Batch sizes checked after a build: the profile's corners, and 7 when the profile admits it."""
        return tuple(sorted({self.min, self.opt, self.max} | ({7} if self.min <= 7 <= self.max else set())))

    def __str__(self) -> str:
        return f"{self.min},{self.opt},{self.max}"


def _ints(text: str | Sequence[int], what: str) -> list[int]:
    return parse_int_list(text, option=what, hi=_MAX_BATCH)


def parse_profile(text: str | Sequence[int]) -> BatchProfile:
    """``"MIN,OPT,MAX"`` (or a single ``"N"`` for a fixed batch) -> BatchProfile with 1 <= MIN <= OPT <= MAX."""
    v = _ints(text, "--batch MIN,OPT,MAX")
    if len(v) == 1:
        v = v * 3
    if len(v) != 3:
        raise InvalidArgumentError(
            f"--batch for a TensorRT engine takes MIN,OPT,MAX (3 integers), got {text!r}"
        )
    lo, opt, hi = v
    if not (lo <= opt <= hi):
        raise InvalidArgumentError(f"--batch MIN,OPT,MAX needs MIN <= OPT <= MAX, got {lo},{opt},{hi}")
    return BatchProfile(lo, opt, hi)


def parse_batches(text: str | Sequence[int]) -> tuple[int, ...]:
    """``--batch`` for an ONNX export: the batch sizes of the parity check, e.g. ``"1,7"`` (1 to 8 values)."""
    v = _ints(text, "--batch")
    if not 1 <= len(v) <= 8:
        raise InvalidArgumentError(
            f"--batch for an ONNX export takes 1 to 8 parity batch sizes, got {text!r}"
        )
    return tuple(dict.fromkeys(v))


def parse_precision(precision: str) -> str:
    p = str(precision).lower()
    if p not in PRECISIONS:
        raise InvalidArgumentError(f"unknown --precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    return p


def parse_hardware_compat(level: str | None) -> str | None:
    """``None``/``"none"`` (engine for this GPU model only) or ``"ampere+"`` (any GPU of compute capability 8.0+)."""
    if level is None or str(level).lower() == "none":
        return None
    if str(level).lower() not in HARDWARE_COMPAT:
        raise InvalidArgumentError(
            f"unknown --hardware-compat {level!r}; allowed: {', '.join(HARDWARE_COMPAT)}"
        )
    return str(level).lower()


def require_tensorrt() -> ModuleType:
    """The ``tensorrt`` module for a build, or MissingDependencyError saying which of tensorrt / a GPU is missing."""
    trt, why = find_tensorrt()  # raises when the installed TensorRT is too old
    gpu = resolve_device("auto").type == "cuda"
    why = f"the tensorrt package is not importable ({why})"
    if trt is None and not gpu:
        raise MissingDependencyError(
            f"building a TensorRT engine needs tensorrt and an NVIDIA GPU; neither is available here: {why}, "
            f"and torch sees no CUDA GPU; {INSTALL_HINT}"
        )
    if trt is None:
        raise MissingDependencyError(f"building a TensorRT engine needs tensorrt: {why}; {INSTALL_HINT}")
    if not gpu:
        raise MissingDependencyError(
            f"building a TensorRT engine needs an NVIDIA GPU, and torch sees no CUDA device "
            f"(tensorrt {trt.__version__} is installed); {INSTALL_HINT}"
        )
    return trt


def build_serialized_engine(
    trt: Any,
    onnx_bytes: bytes,
    *,
    sample_shape: Sequence[int],
    profile: BatchProfile,
    precision: str,
    timing_cache: str | os.PathLike | None = None,
    version_compatible: bool = False,
    hardware_compat: str | None = None,
    log: Callable[[str], None] = print,
) -> bytes:
    """Build a serialized engine from an ONNX graph (already in the requested precision, see the module doc).

    ``timing_cache``: a file read before the build (when it exists) and rewritten atomically after it, so
    later builds for the same GPU and TensorRT version skip kernel timing.
    """
    precision = parse_precision(precision)
    logger = tensorrt_logger(
        trt
    )  # its errors are kept (the parser errors are reported by _raise_parser_errors)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        _raise_parser_errors(trt, parser, log)
    config = builder.create_builder_config()
    config.add_optimization_profile(_optimization_profile(builder, network, sample_shape, profile))
    # Strongly typed: fp16/bf16 come from the graph's types. TF32 is a math mode for fp32 tensors, on by default.
    if precision == "tf32":
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    if version_compatible:
        # Runs on later TensorRT 10.x runtimes; the runtime must allow the embedded lean runtime's host code.
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if hardware_compat == "ampere+":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    cache_path = Path(timing_cache) if timing_cache is not None else None
    _load_timing_cache(config, cache_path, log)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ArtifactError(
            f"TensorRT {trt.__version__} could not build the engine (see the TensorRT log above)"
        )
    if cache_path is not None:
        write_bytes_atomic(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
        log(f"timing cache: saved {cache_path}")
    return bytes(memoryview(serialized))


def _raise_parser_errors(trt: Any, parser: Any, log: Callable[[str], None]) -> None:
    """Every ONNX-parser error printed (Polygraphy's habit), then one ArtifactError naming the first."""
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    for i, err in enumerate(errors):
        log(f"TensorRT ONNX parser error {i + 1}/{len(errors)}: {err}")
    first = " ".join(errors[0].split())[:200] if errors else "no error recorded"
    raise ArtifactError(
        f"TensorRT {trt.__version__}'s ONNX parser rejected the graph ({len(errors)} error(s), printed above); "
        f"first: {first}"
    )


def _optimization_profile(
    builder: Any, network: Any, sample_shape: Sequence[int], profile: BatchProfile
) -> Any:
    """One profile over the batch axis: x [N, *sample_shape], t [N] (and y [N], a class-conditional graph's
    classes) for N in MIN..MAX, tuned for OPT."""
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name == "x":
            shapes = [(b, *sample_shape) for b in (profile.min, profile.opt, profile.max)]
        elif tensor.name in ("t", "y"):
            shapes = [(profile.min,), (profile.opt,), (profile.max,)]
        else:
            raise ArtifactError(
                f"the ONNX graph has an unexpected input {tensor.name!r} (expected x, t and, if conditional, y)"
            )
        opt_profile.set_shape(tensor.name, *shapes)
    return opt_profile


def _load_timing_cache(config: Any, cache_path: Path | None, log: Callable[[str], None]) -> None:
    """Attach the timing cache read from ``cache_path`` (when usable), else a fresh one."""
    blob = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    try:
        cache = config.create_timing_cache(blob)
        reused = cache is not None and config.set_timing_cache(cache, ignore_mismatch=False)
    except Exception:  # noqa: BLE001 - a corrupt cache file must not stop the build: start a fresh one
        reused = False
    if not reused:
        if blob:
            log(
                f"timing cache {cache_path} is unreadable or from another GPU / TensorRT version; starting afresh"
            )
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    elif blob:
        log(f"timing cache: reusing {cache_path} ({len(blob)} bytes)")


def make_sidecar(
    meta: dict[str, Any],
    *,
    engine: bytes,
    trt_version: str,
    gpu_name: str,
    compute_capability: str,
    precision: str,
    profile: BatchProfile,
    version_compatible: bool = False,
    hardware_compat: str | None = None,
) -> dict[str, Any]:
    """The sidecar JSON object: the artifact metadata (docs/design.md, "Artifacts", plus export extras) with
    native JSON values, plus the TensorRT facts the runtime checks before deserialising (ddpm.artifacts reads
    it back)."""
    # Round trip through the str->str codec: validates, and gives native JSON values for the structured keys.
    base = {k: v for k, v in meta.items() if k not in _SIDECAR_OWN}
    if "weights_sha256" in meta:  # provenance: which ONNX weights the engine was built from
        base["onnx_weights_sha256"] = meta["weights_sha256"]
    out: dict[str, Any] = decode_metadata(encode_metadata(base), source="engine metadata")
    out.update(
        {
            "tensorrt_version": str(trt_version),
            "gpu_name": str(gpu_name),
            "compute_capability": str(compute_capability),
            "precision": parse_precision(precision),
            "profile": profile.as_dict(),
            "version_compatible": bool(version_compatible),
            "hardware_compat": hardware_compat,
            "engine_bytes": len(engine),
            "engine_sha256": hashlib.sha256(engine).hexdigest(),
        }
    )
    return out
