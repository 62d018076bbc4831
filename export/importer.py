"""``ddpm import``: a diffusers DDPM folder -> one of our checkpoints, once.

    import_diffusers("ddpm-cifar10-32/", "cifar10.safetensors")          # EMA weights when the folder has both

The folder is read by the core's adapter (ddpm/diffusers_folder.py: configs -> our metadata, weights -> our
native UNet2D's names, every key and shape checked), and written with the same ``save_checkpoint`` the trainer
uses: safetensors + complete metadata, atomically. The result samples, exports and describes itself like a
checkpoint from ``ddpm train``; nothing reading it imports diffusers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddpm.checkpoint import load_model, read_checkpoint_metadata, save_checkpoint
from ddpm.diffusers_folder import is_diffusers_folder
from ddpm.errors import ArtifactError, InvalidArgumentError
from ddpm.io import check_writable

__all__ = ["ImportReport", "import_diffusers"]


@dataclass
class ImportReport:
    """What ``import_diffusers`` wrote: the checkpoint, its metadata and the network's size."""

    out: Path
    meta: dict[str, Any]
    params: int
    seconds: float


def import_diffusers(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    *,
    scheduler_config: str | os.PathLike | None = None,
    weights: str | None = None,
    log: Callable[[str], None] | None = None,
) -> ImportReport:
    """Convert a diffusers pipeline / model folder into the checkpoint ``out`` (``.safetensors``).

    ``scheduler_config``: a scheduler_config.json (or its folder) for a model folder that has none beside it.
    ``weights``: "ema" | "main" (default: EMA when the folder holds both). Raises InvalidArgumentError /
    ArtifactError (one line each); nothing is written under ``out`` unless everything succeeded.
    """
    start = time.perf_counter()
    log = log or (lambda _msg: None)
    out, src = Path(out), Path(folder)
    if out.suffix.lower() != ".safetensors":
        raise InvalidArgumentError(f"--out {str(out)!r} must be a .safetensors file (our checkpoint format)")
    check_writable(out, what="--out")
    if not src.exists():
        raise ArtifactError(f"{src}: no such folder")
    if not is_diffusers_folder(src):
        raise ArtifactError(
            f"{src}: not a diffusers folder (expected model_index.json, or config.json + diffusion_pytorch_model.*)"
        )
    model, meta = load_model(src, scheduler_config=scheduler_config, weights=weights)
    source = meta["source"]
    log(f"read {src}: {source['unet_class']} + {source['scheduler_class']}, {source['weights_kind']} weights "
        f"from {source['weights']}")  # fmt: skip
    save_checkpoint(out, model, meta)
    written = read_checkpoint_metadata(out)  # what every reader will see, validated
    params = sum(p.numel() for p in model.parameters())
    return ImportReport(out, written, params, time.perf_counter() - start)
