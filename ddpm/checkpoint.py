"""Checkpoints: one safetensors file holding the (EMA) weights and the artifact metadata, read and written here.

safetensors, never pickle: loading a checkpoint cannot execute code. The metadata (model config, schedule,
prediction, sample shape, dataset, step, EMA decay; docs/design.md, "Artifacts") rebuilds the network from the
file alone. :func:`load_model` also takes a diffusers folder (read by the adapter, ddpm/diffusers_folder.py):
``ddpm import`` writes it once, with :func:`save_checkpoint`, as a checkpoint that needs no diffusers. The
trainer's run state (``train_state.pt``) lives in ``ddpm.trainer.checkpoint``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .artifacts import checkpoint_metadata, open_safetensors
from .diffusers_folder import is_diffusers_folder, load_folder
from .errors import ArtifactError, InvalidArgumentError
from .io import atomic_path, check_free_space
from .metadata import FORMAT, decode_metadata, encode_metadata
from .models import build_model, sample_shape

__all__ = [
    "CHECKPOINT_NAME",
    "load_model",
    "read_checkpoint_metadata",
    "resolve_checkpoint",
    "save_checkpoint",
]

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
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    scheduler_config: str | os.PathLike | None = None,
    weights: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint or a diffusers folder: ``(model, meta)`` with the EMA network in eval mode on ``device``.

    ``model(x, t)``: x [N, *meta["sample_shape"]] float32, t [N] int64 original timesteps -> like x (2C channels
    for a learned-variance model: ``ddpm.metadata.output_shape``).
    ``meta``: the decoded metadata (schedule, prediction, sample_shape, model, dataset, step, ema_decay, ...).
    ``scheduler_config`` / ``weights`` (ema | main): diffusers folders only (``ddpm.diffusers_folder``).
    A missing, corrupt or inconsistent file raises ArtifactError with one line naming it.
    """
    if is_diffusers_folder(path):
        meta, tensors = load_folder(path, scheduler_config=scheduler_config, weights=weights)
        return _build(meta, tensors, Path(path)).to(device).eval(), meta
    if scheduler_config is not None or weights is not None:
        raise InvalidArgumentError(f"{path}: --scheduler-config / --weights apply to diffusers folders only")
    p = resolve_checkpoint(path)
    with open_safetensors(p, framework="pt") as f:
        meta = decode_metadata(f.metadata(), source=str(p))
        try:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
        except Exception as e:  # noqa: BLE001 - truncated data surfaces only when a tensor is read
            raise ArtifactError(f"{p}: corrupt tensor data ({type(e).__name__}: {str(e)[:120]})") from None
    return _build(meta, tensors, p).to(device).eval(), meta


def _build(meta: dict[str, Any], tensors: dict[str, torch.Tensor], p: Path) -> nn.Module:
    """The network of ``meta`` holding ``tensors``; ArtifactError naming ``p`` when they do not fit."""
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
    return model


def _diff_keys(expected: dict, got: dict) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(got)), sorted(set(got) - set(expected))


def save_checkpoint(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``model``'s weights and ``meta`` to a safetensors file, atomically (temp file + rename).

    ``meta`` needs at least schedule, prediction, dataset and step; ``format``, ``model`` (from
    ``model.config``) and ``sample_shape`` are filled in when absent. Returns the path written.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        raise InvalidArgumentError(
            "save_checkpoint needs a model built by build_model (it has no .config dict)"
        )
    full = {"format": FORMAT, "model": config, "sample_shape": sample_shape(config), **meta}
    if full["model"] != config:
        raise InvalidArgumentError(
            "meta['model'] differs from the model's own config; leave it out or pass model.config"
        )
    strings = encode_metadata(full)
    # safetensors refuses shared or non-contiguous storage; a detached contiguous CPU copy of each tensor.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    check_free_space(
        path, sum(t.numel() * t.element_size() for t in tensors.values()) + (1 << 20), what="checkpoint"
    )
    with atomic_path(path, what="checkpoint") as tmp:
        try:
            save_file(tensors, str(tmp), metadata=strings)
        except SafetensorError as e:  # its I/O failures (disk full) arrive as this type, not OSError
            raise ArtifactError(
                f"{path}: cannot write the checkpoint ({' '.join(str(e).split())[:160]})"
            ) from None
    return Path(path)
