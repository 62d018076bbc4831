"""Writing checkpoints: the (EMA) weights and the artifact metadata in one safetensors file, atomically.

Reading (``load_model``, ``read_checkpoint_metadata``) lives in the core, ``ddpm.checkpoint``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ddpm.checkpoint import CHECKPOINT_NAME, load_model, read_checkpoint_metadata, resolve_checkpoint
from ddpm.errors import InvalidArgumentError
from ddpm.io import atomic_path
from ddpm.metadata import FORMAT, encode_metadata
from ddpm.models import sample_shape

__all__ = [
    "CHECKPOINT_NAME",
    "save_checkpoint",
    "load_model",
    "read_checkpoint_metadata",
    "resolve_checkpoint",
]


def save_checkpoint(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``model``'s weights and ``meta`` to a safetensors file, atomically (temp file + rename).

    ``meta`` needs at least schedule, prediction, dataset and step; ``format``, ``model`` (from
    ``model.config``) and ``sample_shape`` are filled in when absent. Returns the path written.
    """
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
    with atomic_path(path, what="checkpoint") as tmp:
        save_file(tensors, str(tmp), metadata=strings)
    return Path(path)
