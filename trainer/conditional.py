"""Class-conditional training, ``ddpm train --cond class`` (docs/design.md, "Conditional models").

The network holds K class rows and the null class K (``num_classes`` K, ddpm/models.py). Each training label is
replaced by the null class with probability ``p_uncond`` (label dropout, Ho & Salimans 2022, "Classifier-Free
Diffusion Guidance", Algorithm 1), so one network learns both the conditional and the unconditional model that
guidance mixes. The dropout mask is drawn from the training step's seeded torch RNG right after the step's flips,
t and eps (and before the network's own dropout), for the whole global batch, so a run stays a function of
(seed, step): ``--resume`` continues it bitwise and torchrun shards the same labels as a single process, while
an unconditional run draws nothing more and is unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from ddpm.errors import ArtifactError

from .data import ClassLabels, Dataset, load_class_labels

__all__ = ["PREVIEW_CLASSES", "attach_labels", "drop_labels", "classes_meta", "preview_classes"]

PREVIEW_CLASSES = 10  # a preview shows at most this many classes, one row each


def attach_labels(ds: Dataset, spec: str) -> tuple[Dataset, ClassLabels]:
    """The dataset with its class labels (int64 [N], on the data's device) and the labels' names; one-line
    errors for data without labels (trainer/data.py, :func:`load_class_labels`)."""
    labels = load_class_labels(spec)
    if len(labels.labels) != len(ds):
        raise ArtifactError(f"{spec}: {len(labels.labels)} labels for {len(ds)} images")
    y = torch.from_numpy(np.ascontiguousarray(labels.labels, dtype=np.int64)).to(ds.data.device)
    return dataclasses.replace(ds, labels=y), labels


def drop_labels(y: torch.Tensor, p_uncond: float, null: int) -> torch.Tensor:
    """Label dropout: each of the global batch's labels y [B] becomes ``null`` with probability ``p_uncond``,
    drawn from torch's global RNG (the step's seeded stream; always drawn, so the stream never depends on p)."""
    drop = torch.rand(y.shape[0], device=y.device) < p_uncond
    return torch.where(drop, torch.full_like(y, null), y)


def classes_meta(labels: ClassLabels, p_uncond: float) -> dict[str, Any]:
    """The checkpoint metadata key ``classes``: K classes, the null class K, their names, the dropout."""
    return {"count": labels.count, "null": labels.count, "names": list(labels.names), "p_uncond": p_uncond}


def preview_classes(count: int, n: int) -> tuple[list[int], int]:
    """(classes, columns) of a conditional preview of about ``n`` images: one row per class, up to
    PREVIEW_CLASSES of them evenly spread over 0..count-1, and n // rows columns (at least 1)."""
    rows = min(count, PREVIEW_CLASSES)
    classes = sorted({round(v) for v in np.linspace(0, count - 1, rows)})
    return classes, max(1, n // len(classes))
