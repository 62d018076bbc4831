"""``ddpm run`` split over processes: ``--shard K/N`` (one shard per job, merged later by ``ddpm merge``) and
torchrun (every rank samples its shard; rank 0 gathers them into the one npz/PNG a single process would write).

Either way each process draws the global samples of its shard (runtime/shard.py), so the result equals a
single-process run bit for bit on the same backend, device type and kernel.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ddpm.errors import InvalidArgumentError
from ddpm.images import save_samples_png
from ddpm.options import SamplingOptions

from .sample_sink import SampleSink, class_extras
from .sampling import SampleRun, sample_run
from .shard import SHARD_META, Shard, shard_record

__all__ = ["Outputs", "torchrun_world", "run_split", "run_shard", "run_torchrun"]

Echo = Callable[[str], None]


def torchrun_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside torchrun."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise InvalidArgumentError(
            "RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun)"
        ) from None
    if world > 1 and not 0 <= rank < world:
        raise InvalidArgumentError(f"RANK={rank} is outside 0..WORLD_SIZE-1 ({world - 1})")
    return (rank, world, local) if world > 1 else (0, 1, 0)


def _header(echo: Echo, backend: Any, plan: Any) -> None:
    echo(f"backend: {backend.name} on {backend.device} [{backend.description}]")
    echo(f"sampling {plan.sampler} {plan.steps} steps, prediction {plan.prediction}")


@dataclass(frozen=True)
class Outputs:
    """Where a split run writes: the npz (required for a shard), the PNG, and its progress lines."""

    npz: Path | None
    out: Path | None
    echo: Echo


def run_split(
    engine: Path, shard: str | None, num_samples: int, options: SamplingOptions, outputs: Outputs
) -> SampleRun | None:
    """``ddpm run`` with ``--shard K/N`` (no torchrun) or under torchrun (no ``--shard``)."""
    _rank, world, _local = torchrun_world()
    if shard is not None and world > 1:
        raise InvalidArgumentError(
            "--shard is for schedulers without torchrun; under torchrun the ranks split --num-samples themselves"
        )
    if shard is not None:
        return run_shard(engine, Shard.parse(shard), num_samples, options, outputs)
    return run_torchrun(engine, num_samples, options, outputs)


def run_shard(
    engine: Path, shard: Shard, num_samples: int, options: SamplingOptions, outputs: Outputs
) -> SampleRun:
    """Sample shard K of N alone and stream it (with its ``shard_meta`` record) into ``npz``, batch by batch:
    memory is one batch, whatever the shard's size. PNG optional."""
    npz, out, echo = outputs.npz, outputs.out, outputs.echo
    if npz is None:
        raise InvalidArgumentError("--shard writes an npz for `ddpm merge`: pass --npz PART.npz")
    start, stop = shard.range(num_samples)

    with contextlib.ExitStack() as stack:
        sink = SampleSink(stack, npz, stop - start, png=out is not None)

        def on_start(backend: Any, plan: Any, _taken: dict[str, Any]) -> None:
            _header(echo, backend, plan)
            precision = str(getattr(backend, "precision", "fp32"))
            record = shard_record(
                engine, plan, shard, num_samples, kernel=plan.kernel, precision=precision,
                runtime=options.runtime or backend.name,
            )  # fmt: skip
            extras = {**(class_extras(plan, start, stop - start) or {}), SHARD_META: _json(record)}
            sink.open(tuple(plan.sample_shape), precision, extras=extras)

        result = sample_run(engine, stop - start, options, first=start, on_start=on_start, on_batch=sink)
        shown = sink.preview()
    echo(f"wrote {npz} (shard {shard}: samples {start}..{stop - 1} of {num_samples})")
    if out is not None:
        save_samples_png(shown, out, title=f"shard {shard}, {result.steps} steps")
        echo(f"wrote {out}")
    return result


def run_torchrun(
    engine: Path, num_samples: int, options: SamplingOptions, outputs: Outputs
) -> SampleRun | None:
    """Under torchrun: rank r samples shard r of the world on its own device. Rank 0 streams its own batches into
    the npz/PNG sink as they finish; every other rank spills its finished batches to a temporary file on its
    own disk and, when rank 0 has written everything before it, sends them batch by batch (Gloo, CPU tensors).
    So no process ever holds more than about one batch, and the npz equals the single-process one byte for byte.
    Returns rank 0's run (None on the other ranks)."""
    rank, world, local = torchrun_world()
    device = options.device
    if device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{local % torch.cuda.device_count()}"  # one GPU per rank; more ranks than GPUs share
    options = options.replace(device=device)
    bounds = [Shard(r, world).range(num_samples) for r in range(world)]
    start, stop = bounds[rank]
    dist.init_process_group(backend="gloo")
    try:
        if rank == 0:
            return _rank0(engine, num_samples, options, bounds, outputs)
        with tempfile.TemporaryFile(prefix="ddpm-rank-") as spill:
            facts: dict[str, Any] = {}

            def on_start(_backend: Any, plan: Any, _taken: dict[str, Any]) -> None:
                facts["shape"] = tuple(plan.sample_shape)

            result = sample_run(
                engine, stop - start, options, first=start, on_start=on_start,
                on_batch=lambda _offset, x: spill.write(x.numpy().tobytes()),
            )  # fmt: skip
            spill.seek(0)
            for n in _batch_sizes(stop - start, options.batch):
                batch = np.frombuffer(spill.read(n * 4 * math.prod(facts["shape"])), dtype=np.float32)
                dist.send(torch.from_numpy(batch.copy()).reshape(n, *facts["shape"]), dst=0)
        dist.gather_object(_stats(result), None, dst=0)
        return None
    finally:
        dist.destroy_process_group()


def _rank0(
    engine: Path, num_samples: int, options: SamplingOptions, bounds: list[tuple[int, int]], outputs: Outputs
) -> SampleRun:
    npz, out, echo = outputs.npz, outputs.out, outputs.echo
    world = len(bounds)
    with contextlib.ExitStack() as stack:
        sink = SampleSink(stack, npz, num_samples, png=out is not None)
        shape: list[tuple[int, ...]] = []

        def on_start(backend: Any, plan: Any, _taken: dict[str, Any]) -> None:
            _header(echo, backend, plan)
            shape.append(tuple(plan.sample_shape))
            sink.open(
                shape[0],
                str(getattr(backend, "precision", "fp32")),
                extras=class_extras(plan, 0, num_samples),
            )

        result = sample_run(engine, bounds[0][1], options, on_start=on_start, on_batch=sink)
        for r in range(1, world):  # the other shards, in order, one batch at a time
            offset = bounds[r][0]
            for n in _batch_sizes(bounds[r][1] - bounds[r][0], options.batch):
                x = torch.empty((n, *shape[0]), dtype=torch.float32)
                dist.recv(x, src=r)
                sink(offset, x)
                offset += n
        shown = sink.preview()
        if out is not None:
            save_samples_png(shown, out, title=f"{shown.shape[0]} samples, {result.steps} steps")
    parts: list[Any] = [None] * world
    dist.gather_object(_stats(result), parts, dst=0)
    for path in (out, npz):
        if path is not None:
            echo(f"wrote {path}")
    counts = ",".join(str(b - a) for a, b in bounds)
    echo(f"ranks={world} samples per rank={counts} devices={','.join(sorted({p[0] for p in parts}))}")
    echo(f"rank 0: {result.summary()}; slowest rank seconds={max(p[1] for p in parts):.2f}")
    return result


def _batch_sizes(count: int, batch: int) -> list[int]:
    return [min(batch, count - k) for k in range(0, count, batch)]


def _stats(result: SampleRun) -> tuple[str, float]:
    return result.device, round(result.seconds, 2)


def _json(record: dict[str, Any]) -> np.ndarray:
    return np.array(json.dumps(record, sort_keys=True))
