"""``ddpm run`` split over processes: ``--shard K/N`` (one shard per job, merged later by ``ddpm merge``) and
torchrun (every rank samples its shard; rank 0 gathers them into the one npz/PNG a single process would write).

Either way each process draws the global samples of its shard (runtime/shard.py), so the result equals a
single-process run bit for bit on the same backend, device type and kernel.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ddpm.errors import InvalidArgumentError
from ddpm.images import save_samples_png, to_uint8_nhwc
from ddpm.io import npz_stream

from .sample_sink import SampleSink
from .sampling import SampleRun, sample_run
from .shard import SHARD_META, Shard, shard_record

__all__ = ["torchrun_world", "run_split", "run_shard", "run_torchrun"]

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


def _header(echo: Echo) -> Callable[[Any, Any], None]:
    def on_start(backend: Any, plan: Any) -> None:
        echo(f"backend: {backend.name} on {backend.device} [{backend.description}]")
        echo(f"sampling {plan.sampler} {plan.steps} steps, prediction {plan.prediction}")

    return on_start


def run_split(
    engine: Path,
    shard: str | None,
    num_samples: int,
    *,
    npz: Path | None,
    out: Path | None,
    echo: Echo,
    **sampling: Any,
) -> SampleRun | None:
    """``ddpm run`` with ``--shard K/N`` (no torchrun) or under torchrun (no ``--shard``)."""
    _rank, world, _local = torchrun_world()
    if shard is not None and world > 1:
        raise InvalidArgumentError(
            "--shard is for schedulers without torchrun; under torchrun the ranks split --num-samples themselves"
        )
    if shard is not None:
        return run_shard(engine, Shard.parse(shard), num_samples, npz=npz, out=out, echo=echo, **sampling)
    return run_torchrun(engine, num_samples, npz=npz, out=out, echo=echo, **sampling)


def run_shard(
    engine: Path,
    shard: Shard,
    num_samples: int,
    *,
    npz: Path | None,
    out: Path | None,
    echo: Echo,
    **sampling: Any,
) -> SampleRun:
    """Sample shard K of N alone and write it (with its ``shard_meta`` record) to ``npz``; PNG optional."""
    if npz is None:
        raise InvalidArgumentError("--shard writes an npz for `ddpm merge`: pass --npz PART.npz")
    start, stop = shard.range(num_samples)
    facts: dict[str, Any] = {}

    def on_start(backend: Any, plan: Any) -> None:
        _header(echo)(backend, plan)
        precision = str(getattr(backend, "precision", "fp32"))
        runtime = sampling.get("runtime") or backend.name
        facts.update(plan=plan, precision=precision, runtime=runtime)

    result = sample_run(engine, stop - start, first=start, on_start=on_start, **sampling)
    record = shard_record(
        engine,
        facts["plan"],
        shard,
        num_samples,
        kernel=str(sampling.get("kernel", "fused")),
        precision=facts["precision"],
        runtime=facts["runtime"],
    )
    arr = _as_array(result.samples)
    extras = {SHARD_META: np.array(json.dumps(record, sort_keys=True))}
    with npz_stream(npz, arr.shape, arr.dtype, what="--npz", extras=extras) as stream:
        stream.write(arr)
    echo(f"wrote {npz} (shard {shard}: samples {start}..{stop - 1} of {num_samples})")
    if out is not None:
        save_samples_png(result.samples[:256], out, title=f"shard {shard}, {result.steps} steps")
        echo(f"wrote {out}")
    return result


def run_torchrun(
    engine: Path, num_samples: int, *, npz: Path | None, out: Path | None, echo: Echo, **sampling: Any
) -> SampleRun | None:
    """Under torchrun: rank r samples shard r of the world on its own device; rank 0 gathers the shards (Gloo,
    whatever the device: the samples are gathered once, on the CPU) and writes the npz/PNG. Returns rank 0's
    run (None on the other ranks)."""
    rank, world, local = torchrun_world()
    device = str(sampling.pop("device", "auto"))
    if device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{local % torch.cuda.device_count()}"  # one GPU per rank; more ranks than GPUs share
    start, stop = Shard(rank, world).range(num_samples)
    dist.init_process_group(backend="gloo")
    try:
        say = echo if rank == 0 else (lambda _line: None)
        result = sample_run(
            engine, stop - start, first=start, device=device, on_start=_header(say), **sampling
        )
        part = (start, result.samples, result.device, round(result.seconds, 2))
        parts: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(part, parts, dst=0)
    finally:
        dist.destroy_process_group()
    if parts is None:
        return None
    _write_gathered(parts, num_samples, npz=npz, out=out, precision=result.precision, steps=result.steps)
    for path in (out, npz):
        if path is not None:
            echo(f"wrote {path}")
    counts = ",".join(str(p[1].shape[0]) for p in parts)
    echo(f"ranks={world} samples per rank={counts} devices={','.join(sorted({p[2] for p in parts}))}")
    echo(f"rank 0: {result.summary()}; slowest rank seconds={max(p[3] for p in parts):.2f}")
    return result


def _write_gathered(
    parts: list[Any], num_samples: int, *, npz: Path | None, out: Path | None, precision: str, steps: int
) -> None:
    # The single-process writer: the npz comes out byte for byte as `ddpm run` alone writes it.
    with contextlib.ExitStack() as stack:
        sink = SampleSink(stack, npz, num_samples, png=out is not None)
        sink.open(tuple(parts[0][1].shape[1:]), precision)
        for start, samples, _device, _seconds in sorted(parts, key=lambda p: p[0]):
            sink(start, samples)
        shown = sink.preview()
        if out is not None:
            save_samples_png(shown, out, title=f"{shown.shape[0]} samples, {steps} steps")


def _as_array(samples: torch.Tensor) -> np.ndarray:
    # The layout `ddpm run --npz` writes: uint8 NHWC images, float32 vectors.
    arr = to_uint8_nhwc(samples) if samples.dim() == 4 else samples.detach().float().numpy()
    return np.ascontiguousarray(arr)
