"""The models a server holds: each artifact opened once at start (runtime's ``open_engine``), warmed up, named.

A request chooses a model by name among these; no request ever names a file on the server. Plans are built
once per distinct setting and cached (bounded): the key of a plan is also the batcher's merge key.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddpm.errors import DDPMError, InvalidArgumentError
from ddpm.metadata import recommended_sampling, schedule_from_meta
from ddpm.options import SamplingOptions
from ddpm.runtime.sampling import SamplingPlan, open_engine, plan_run
from ddpm.runtime.segments import Segment, sample_segments

__all__ = ["ModelHost", "open_models", "engine_names", "clip_value", "BITWISE_RUNTIMES"]

# (runtime, device type) whose network computes every row independently of its batch: merged answers are bitwise
# the `ddpm run` answers there (docs/design.md, "Serving"); elsewhere they agree to float32 rounding.
BITWISE_RUNTIMES = {("onnxruntime", "cpu")}
PLAN_CACHE = 64  # distinct settings kept per model (each plan holds an O(T) schedule and table)


@dataclass(eq=False)
class ModelHost:
    """One open model. ``options`` are the server's own (device, threads, runtime, precision, batch =
    --max-batch, ``recommended=True``); a request's options are these with its fields replaced."""

    name: str
    path: Path
    backend: Any
    options: SamplingOptions

    def __post_init__(self) -> None:
        self.meta = self.backend.meta
        self._lock = threading.Lock()
        # request fields (seed left out) -> merge key, and merge key -> plan: a repeated setting costs two dict
        # look-ups, no option resolution; equal settings written differently share one key and one plan
        self._keys: collections.OrderedDict[tuple, SamplingOptions] = collections.OrderedDict()
        self._plans: collections.OrderedDict[SamplingOptions, SamplingPlan] = collections.OrderedDict()

    @property
    def bitwise(self) -> bool:
        return (self.backend.name, self.backend.device.type) in BITWISE_RUNTIMES

    def plan(self, options: SamplingOptions) -> tuple[SamplingOptions, SamplingPlan]:
        """(merge key, plan) of a request's options: the options resolved against this model (the
        recommendation fills unset fields, as ``ddpm run`` does) with the seed zeroed. InvalidArgumentError when
        they do not fit the model (steps > T, a batch tensor too large)."""
        raw = tuple(getattr(options, f) for f in _UNSEEDED)
        with self._lock:
            key = _lookup(self._keys, raw)
            plan = None if key is None else _lookup(self._plans, key)
        if key is None or plan is None:
            resolved, _ = options.resolve(self.meta)
            spacing = resolved.spacing or resolved.sampler.default_spacing
            key = resolved.replace(seed=0, spacing=spacing if resolved.steps is not None else None)
            with self._lock:
                plan = _lookup(self._plans, key)
            if plan is None:
                _, _, plan = plan_run(self.meta, key, [key.batch])
            with self._lock:
                _store(self._keys, raw, key)
                _store(self._plans, key, plan)
        return key, plan

    def warm_up(self, max_batch: int) -> None:
        """One 1-step loop at batch 1 and at ``max_batch``: the runtime allocates and picks kernels for the
        shapes it will see before the first request pays for it."""
        conditional = isinstance(self.meta.get("classes"), dict)
        _, plan = self.plan(self.options.replace(steps=1, classes=(0,) if conditional else None))
        for n in sorted({1, max_batch}):
            sample_segments(self.backend, plan, [Segment(0, 0, n)])

    def info(self) -> dict[str, Any]:
        """What ``GET /v1/models`` shows: the validated metadata's facts and the sampling a bare request gets."""
        meta, b = self.meta, self.backend
        try:
            _, plan = self.plan(self.options)
            defaults: dict[str, Any] | str = {
                "sampler": str(plan.sampler),
                "steps": plan.steps,
                "spacing": plan.schedule.config.get("spacing", "uniform"),
                "clip": clip_value(plan.clip),
                "eta": plan.eta,
                "variance": str(plan.variance),
            }
        except DDPMError as e:  # a conditional model without a null class needs classes in every request
            defaults = str(e)
        return {
            "name": self.name,
            "file": self.path.name,
            "runtime": b.name,
            "device": str(b.device),
            "description": b.description,
            "precision": str(getattr(b, "precision", "fp32")),
            "bitwise_merging": self.bitwise,
            "arch": meta["model"]["arch"],
            "sample_shape": [int(v) for v in meta["sample_shape"]],
            "prediction": str(meta["prediction"]),
            "classes": meta.get("classes"),
            "dataset": meta["dataset"],
            "training_step": meta["step"],
            "timesteps": len(schedule_from_meta(meta)),
            "recommended": _jsonable(recommended_sampling(meta)),
            "defaults": defaults,
        }

    def close(self) -> None:
        self.backend.close()


_UNSEEDED = tuple(f.name for f in dataclasses.fields(SamplingOptions) if f.name != "seed")


def _lookup(cache: collections.OrderedDict, k: Any) -> Any:
    v = cache.get(k)
    if v is not None:
        cache.move_to_end(k)
    return v


def _store(cache: collections.OrderedDict, k: Any, v: Any) -> None:
    cache[k] = v
    cache.move_to_end(k)
    while len(cache) > PLAN_CACHE:
        cache.popitem(last=False)


def clip_value(clip: Any) -> float | str | None:
    """A plan's clip as JSON: the bound, None for none (inf), ``"dynamic:RATIO[:MAX]"`` for a threshold."""
    if isinstance(clip, (int, float)):
        return None if math.isinf(clip) else float(clip)
    return str(clip)


def _jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (int, float, str, type(None))) else str(v) for k, v in d.items()}


def engine_names(engines: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike]) -> dict[str, Path]:
    """``{name: path}``: a mapping as given, or paths named by their file stem (``unet.onnx`` -> ``unet``);
    a ``NAME=PATH`` string names its model. Two models of one name are refused."""
    if isinstance(engines, Mapping):
        pairs = [(str(k), Path(v)) for k, v in engines.items()]
    else:
        pairs = []
        for e in engines:
            text = os.fspath(e)
            name, sep, path = text.partition("=")
            pairs.append(
                (name, Path(path)) if sep and name and "/" not in name else (Path(text).stem, Path(text))
            )
    if not pairs:
        raise InvalidArgumentError("give at least one --engine to serve")
    names = [n for n, _ in pairs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InvalidArgumentError(
            f"two engines are named {dup[0]!r}; name them apart with --engine NAME=PATH"
        )
    for n in names:
        if not n.replace("-", "").replace("_", "").replace(".", "").isalnum() or len(n) > 64:
            raise InvalidArgumentError(f"model name {n!r}: use letters, digits, '-', '_' or '.' (at most 64)")
    return dict(pairs)


def open_models(
    engines: Mapping[str, Path], options: SamplingOptions, *, max_batch: int
) -> dict[str, ModelHost]:
    """Open every engine once (``open_engine`` with the server's options) and warm each up; on any failure
    the ones already open are closed again."""
    hosts: dict[str, ModelHost] = {}
    try:
        for name, path in engines.items():
            backend = open_engine(path, options)
            hosts[name] = ModelHost(name, Path(path), backend, options.replace(batch=max_batch))
            hosts[name].warm_up(
                max_batch
            )  # the model runs before the first request: fail at start, not later
    except BaseException:
        for h in hosts.values():
            h.close()
        raise
    return hosts
