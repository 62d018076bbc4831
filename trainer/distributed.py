"""Data-parallel training under torchrun: process group, batch sharding, loss averaging, rank-0-only writes.

torchrun (single node or a c10d rendezvous over several) starts one process per device and sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; this module reads them and nothing else, so there is no
launcher of our own. Without those variables every helper is the identity and training is unchanged.

Equivalence with one process (same --batch-size, same --seed): every rank draws the GLOBAL batch indices,
flips, timesteps and noise of step k from the step seed, exactly as one process would, and keeps rows
``rank * b .. (rank + 1) * b - 1`` (b = batch / world). Each rank's loss is the mean over its b rows;
DistributedDataParallel averages the gradients over the ranks, and the mean of equal-sized shard means is the
global mean, so the gradient (and the clipped norm, AdamW step and EMA, identical on every rank) equal the
single-process ones up to float32 summation order. What differs: dropout masks (each rank draws its own from
the same RNG state; the shipped `tiny` preset has no dropout) and the batch-norm-free models need nothing else.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ddpm.errors import InvalidArgumentError, TrainingError

__all__ = ["DistContext", "process_group", "BACKENDS"]

BACKENDS = ("nccl", "gloo")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank r of world_size (1 = not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes every file (checkpoints, samples, plots, loss CSV, config.json)."""
        return self.rank == 0

    def check_batch(self, batch_size: int, grad_accum: int = 1) -> int:
        """The per-rank batch; the global batch must split into equal shards (else the mean of shard means
        is not the global mean), and each shard into ``grad_accum`` equal micro-batches."""
        parts = self.world_size * grad_accum
        if batch_size % parts:
            over = f"{self.world_size} ranks" + (f" x {grad_accum} micro-batches" if grad_accum > 1 else "")
            raise InvalidArgumentError(
                f"--batch-size {batch_size} does not split evenly over {over}; use a multiple of {parts}"
            )
        return batch_size // self.world_size

    def shard(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's contiguous rows of each global-batch tensor [B, ...] -> [B / world, ...]."""
        if not self.active:
            return tensors
        b = tensors[0].shape[0] // self.world_size
        return tuple(x[self.rank * b : (self.rank + 1) * b] for x in tensors)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """DistributedDataParallel around ``model`` (it broadcasts rank 0's weights once); the model itself
        when not distributed. Checkpoints keep saving the unwrapped module, so their keys never change."""
        if not self.active:
            return model
        ids = (
            [device.index if device.index is not None else self.local_rank] if device.type == "cuda" else None
        )
        # A 1x1 convolution's weight gradient has strides that differ from its bucket view's only along size-1
        # dimensions (the same memory layout); DDP compares strides literally and warns on every rank.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The average over ranks of a tensor of per-rank losses: the global-batch loss of each step."""
        if not self.active:
            return values
        values = values.detach().clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values / self.world_size

    def facts(self, batch_size: int) -> dict[str, int]:
        """What config.json and the checkpoint metadata record about the layout of the run."""
        return {"world_size": self.world_size, "per_rank_batch": batch_size // self.world_size}

    def device(self, device: torch.device) -> torch.device:
        """One GPU per rank: cuda means cuda:LOCAL_RANK under torchrun."""
        if not self.active or device.type != "cuda":
            return device
        if device.index is None:
            device = torch.device("cuda", self.local_rank)
        torch.cuda.set_device(device)  # NCCL's collectives and DDP run on the current device
        return device


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidArgumentError(f"environment variable {name}={value!r} is not an integer") from None


def from_env() -> DistContext:
    """The layout torchrun set in the environment; rank 0 of 1 without it."""
    world, rank = _env_int("WORLD_SIZE"), _env_int("RANK")
    if world is None or rank is None or world <= 1:
        return DistContext()
    if not 0 <= rank < world:
        raise InvalidArgumentError(f"RANK={rank} is outside 0..WORLD_SIZE-1 ({world - 1})")
    return DistContext(rank=rank, world_size=world, local_rank=_env_int("LOCAL_RANK") or 0)


def _backend(device: str, backend: str | None) -> str:
    if backend is not None:
        if backend not in BACKENDS:
            raise InvalidArgumentError(
                f"--dist-backend must be one of {', '.join(BACKENDS)}, got {backend!r}"
            )
        return backend
    # NCCL moves CUDA tensors only; Gloo is the CPU (and fallback) collective library.
    wants_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return "nccl" if wants_cuda else "gloo"


@contextlib.contextmanager
def process_group(device: str, backend: str | None = None) -> Iterator[DistContext]:
    """Join torchrun's process group for the block (and leave it after); a no-op outside torchrun.

    A failed collective (another rank died, the network dropped) becomes one TrainingError line: the files in
    the run folder are the last complete save, written atomically by rank 0, and ``--resume`` continues."""
    ctx = from_env()
    if not ctx.active:
        if backend is not None:
            _backend(device, backend)  # still validated: a typo is an error with or without torchrun
        yield ctx
        return
    name = _backend(device, backend)
    if not dist.is_available():
        raise InvalidArgumentError("this torch build has no torch.distributed; run without torchrun")
    dist.init_process_group(backend=name)
    ctx = DistContext(ctx.rank, ctx.world_size, ctx.local_rank, name)
    try:
        yield ctx
        # Leave together: torch asks every rank to destroy the group within its timeout, and a rank that tears
        # down its connections while rank 0 still writes the last save and preview leaves gloo's teardown to race
        # (a rank aborted with SIGABRT once at the end of a resumed run, on a loaded 2-core machine).
        dist.barrier()
    except dist.DistError as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise TrainingError(
            f"rank {ctx.rank} of {ctx.world_size}: a collective failed ({first}); another rank probably "
            "died. The run folder holds the last complete save; rerun with --resume to continue"
        ) from None
    finally:
        with contextlib.suppress(Exception):  # a broken group may refuse a clean teardown
            dist.destroy_process_group()
