"""Reading checkpoints: one safetensors file holding the (EMA) weights and the artifact metadata.

safetensors, never pickle: loading a checkpoint cannot execute code. The metadata (model config, schedule,
prediction, sample shape, dataset, step, EMA decay; docs/design.md, "Artifacts") rebuilds the network from the
file alone. Writing lives in ``ddpm.trainer.checkpoint``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .artifacts import checkpoint_metadata, open_safetensors
from .errors import ArtifactError, InvalidArgumentError
from .metadata import decode_metadata
from .models import build_model

__all__ = ["CHECKPOINT_NAME", "load_model", "read_checkpoint_metadata", "resolve_checkpoint"]

CHECKPOINT_NAME = "model.safetensors"


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file path; a run directory resolves to its ``model.safetensors``."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise ArtifactError(
            f"checkpoint {str(p)!r} does not exist (expected a .safetensors file from `ddpm train`)"
        )
    return p


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded, validated metadata dict of a checkpoint (no weights are read)."""
    return checkpoint_metadata(resolve_checkpoint(path))


def load_model(
    path: str | os.PathLike, *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint: ``(model, meta)`` with the EMA network in eval mode on ``device``.

    ``model(x, t)``: x [N, *meta["sample_shape"]] float32, t [N] int64 original timesteps -> like x.
    ``meta``: the decoded metadata (schedule, prediction, sample_shape, model, dataset, step, ema_decay, ...).
    A missing, corrupt or inconsistent file raises ArtifactError with one line naming it.
    """
    p = resolve_checkpoint(path)
    with open_safetensors(p, framework="pt") as f:
        meta = decode_metadata(f.metadata(), source=str(p))
        try:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
        except Exception as e:  # noqa: BLE001 - truncated data surfaces only when a tensor is read
            raise ArtifactError(f"{p}: corrupt tensor data ({type(e).__name__}: {str(e)[:120]})") from None
    try:
        model = build_model(meta["model"])
    except InvalidArgumentError as e:
        raise ArtifactError(f"{p}: the stored model config is invalid: {e}") from None
    missing, unexpected = _diff_keys(model.state_dict(), tensors)
    if missing or unexpected:
        raise ArtifactError(
            f"{p}: weights do not match the stored model config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:  # shape mismatches
        first = str(e).strip().splitlines()[-1].strip()
        raise ArtifactError(f"{p}: weights do not match the stored model config: {first[:160]}") from None
    return model.to(device).eval(), meta


def _diff_keys(expected: dict, got: dict) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
