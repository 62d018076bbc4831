"""Sharded sampling: which global samples shard k of n holds, the record a shard npz carries, and the merge.

Shard k of n holds the contiguous global samples ``k M // n .. (k + 1) M // n - 1`` of a run of M samples.
Because the noise is keyed by the global sample index (docs/design.md, "Noise"), sampling a shard with
``sample_offset`` = its first index gives exactly the rows a single run of M samples would, so shards merged
in order equal that run bit for bit (same backend, device and kernel).

A shard npz (``ddpm run --shard K/N --npz part.npz``) holds ``arr_0`` (its rows) and ``shard_meta``, a 0-d
string array with the JSON record below; ``ddpm merge`` refuses gaps, overlaps and shards whose engine or
settings differ.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ddpm.artifacts import file_sha256
from ddpm.errors import ArtifactError, InvalidArgumentError
from ddpm.io import npz_stream
from ddpm.validate import MAX_JSON_BYTES, MAX_NUM_SAMPLES

__all__ = ["Shard", "shard_record", "merge_shards", "SHARD_META", "SETTINGS"]

SHARD_META = "shard_meta"
SHARD_FORMAT = "ddpm-shard/1"
# What must agree between shards of one run; the engine is compared by content hash, not by path, so shards
# sampled on machines that keep the engine at different paths still merge.
SETTINGS = (
    "engine_sha256",
    "seed",
    "steps",
    "sampler",
    "spacing",
    "eta",
    "clip",
    "variance",
    "kernel",
    "precision",
    "runtime",
    "sample_shape",
    "num_samples",
    "classes",
    "guidance",
)


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0 <= index < count)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        ok = all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (self.index, self.count)
        )
        if not ok or not 1 <= self.count <= MAX_NUM_SAMPLES or not 0 <= self.index < self.count:
            raise InvalidArgumentError(
                f"shard must be K/N with integers 0 <= K < N, got {self.index!r}/{self.count!r}"
            )

    @classmethod
    def parse(cls, value: str | tuple[int, int] | Shard) -> Shard:
        """``"K/N"`` (the CLI's ``--shard``) or a ``(k, n)`` pair (``ddpm.sample(shard=...)``)."""
        if isinstance(value, Shard):
            return value
        if isinstance(value, str):
            k, sep, n = value.partition("/")
            if not sep or not k.strip().isdigit() or not n.strip().isdigit():
                raise InvalidArgumentError(f"--shard must be K/N, e.g. 0/4, got {value!r}")
            return cls(int(k), int(n))
        if isinstance(value, tuple) and len(value) == 2:
            return cls(*value)
        raise InvalidArgumentError(f"shard must be a (k, n) pair, got {value!r}")

    def range(self, num_samples: int) -> tuple[int, int]:
        """[start, stop) of this shard's global sample indices in a run of ``num_samples``."""
        if num_samples < self.count:
            raise InvalidArgumentError(
                f"{num_samples} samples cannot be split into {self.count} shards: every shard needs one"
            )
        return self.index * num_samples // self.count, (self.index + 1) * num_samples // self.count

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_record(
    engine: str | os.PathLike, plan: Any, shard: Shard, num_samples: int, **settings: Any
) -> dict[str, Any]:
    """The JSON record of one shard: the engine, every setting that changes a sample, and its range.
    ``plan`` is the run's SamplingPlan; ``settings`` adds kernel, precision and runtime."""
    start, stop = shard.range(num_samples)
    if isinstance(plan.clip, float):
        clip: Any = None if math.isinf(plan.clip) else float(plan.clip)  # inf is not JSON
    else:
        clip = str(plan.clip)  # a dynamic threshold, as its CLI text
    return {
        "format": SHARD_FORMAT,
        "engine": str(Path(engine).resolve()),
        "engine_sha256": file_sha256(engine),
        "seed": int(plan.seed),
        "steps": int(plan.steps),
        "sampler": str(plan.sampler),
        "spacing": str(plan.schedule.config.get("spacing", "uniform")),
        "eta": float(plan.eta),
        "clip": clip,
        "variance": str(plan.variance),
        "sample_shape": [int(s) for s in plan.sample_shape],
        "classes": None if plan.classes is None else [int(c) for c in plan.classes],
        "guidance": float(plan.guidance),
        "num_samples": int(num_samples),
        "shard": [shard.index, shard.count],
        "range": [start, stop],
        **settings,
    }


def _read_record(path: Path) -> tuple[dict[str, Any], tuple[int, ...]]:
    """A shard's record and its arr_0 shape, checked enough that the merge can trust both."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if SHARD_META not in z.files or "arr_0" not in z.files:
                raise ArtifactError(
                    f"{path}: not a shard npz (no {SHARD_META}); write shards with `ddpm run --shard K/N`"
                )
            raw = z[SHARD_META]
            shape = tuple(z["arr_0"].shape)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ArtifactError(f"{path}: unreadable npz ({str(e)[:120]})") from None
    if raw.dtype.kind != "U" or raw.ndim != 0 or len(str(raw)) > MAX_JSON_BYTES:
        raise ArtifactError(f"{path}: {SHARD_META} is not a JSON string")
    try:
        rec = json.loads(str(raw))
    except ValueError:
        raise ArtifactError(f"{path}: {SHARD_META} is not valid JSON") from None
    if isinstance(rec, dict):  # shards written before conditional models: unconditional
        rec.setdefault("classes", None)
        rec.setdefault("guidance", 1.0)
    if not isinstance(rec, dict) or rec.get("format") != SHARD_FORMAT or any(k not in rec for k in SETTINGS):
        raise ArtifactError(f"{path}: {SHARD_META} is not a {SHARD_FORMAT} record")
    try:
        shard = Shard.parse(tuple(rec["shard"]))
        want = shard.range(rec["num_samples"])
    except (InvalidArgumentError, TypeError):
        raise ArtifactError(f"{path}: {SHARD_META} holds a bad shard or num_samples") from None
    if list(want) != rec["range"] or not shape or shape[0] != want[1] - want[0]:
        raise ArtifactError(
            f"{path}: shard {shard} should hold samples {want[0]}..{want[1] - 1}, it does not"
        )
    return rec, shape


def merge_shards(paths: list[Path], npz: Path) -> dict[str, Any]:
    """Concatenate shard npz files in shard order into ``npz`` (atomically); returns the common record.

    Refuses (ArtifactError, one line) shards from different engines or settings, a shard given twice, and a
    missing shard; the order of ``paths`` does not matter."""
    if not paths:
        raise InvalidArgumentError("ddpm merge needs at least one shard npz")
    records = [(Path(p), *_read_record(Path(p))) for p in paths]
    first_path, first, _ = records[0]
    for path, rec, _ in records[1:]:
        diff = [k for k in SETTINGS if rec[k] != first[k]]
        if diff or rec["shard"][1] != first["shard"][1]:
            key = diff[0] if diff else "shard count"
            mine = rec[key] if diff else rec["shard"][1]
            theirs = first[key] if diff else first["shard"][1]
            raise ArtifactError(
                f"{path} and {first_path} are not shards of one run: {key} {mine!r} vs {theirs!r}"
            )
    by_index: dict[int, Path] = {}
    for path, rec, _ in records:
        k = rec["shard"][0]
        if k in by_index:
            raise ArtifactError(f"shard {k}/{first['shard'][1]} given twice: {by_index[k]} and {path}")
        by_index[k] = path
    n = first["shard"][1]
    missing = [k for k in range(n) if k not in by_index]
    if missing:
        start, stop = Shard(missing[0], n).range(first["num_samples"])
        raise ArtifactError(
            f"shard {missing[0]}/{n} (samples {start}..{stop - 1}) is missing"
            + (f", and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    _write_merged(npz, [by_index[k] for k in range(n)], first, records[0][2])
    return first


def _write_merged(npz: Path, ordered: list[Path], rec: dict[str, Any], shape: tuple[int, ...]) -> None:
    # The same writer and extras as a single `ddpm run --npz`: the merged file equals that run's byte for byte.
    with np.load(ordered[0], allow_pickle=False) as z:
        dtype = z["arr_0"].dtype
    extras: dict[str, Any] = {"precision": np.array(rec["precision"])} if rec["precision"] != "fp32" else {}
    if rec["classes"]:  # the class of every sample, as ddpm run's npz holds it
        classes = np.asarray(rec["classes"], dtype=np.int64)
        extras["classes"] = classes[np.arange(rec["num_samples"]) % len(classes)]
    with npz_stream(npz, (rec["num_samples"], *shape[1:]), dtype, what="--npz", extras=extras) as out:
        for path in ordered:  # one shard in memory at a time
            with np.load(path, allow_pickle=False) as z:
                out.write(np.ascontiguousarray(z["arr_0"]))
