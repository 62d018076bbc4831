"""Readers of what the trainer writes, for the tests (the library writes these files; only tests read them back)."""

from __future__ import annotations

import csv
import os

import numpy as np


def read_loss_csv(path: str | os.PathLike) -> np.ndarray:
    """The losses of a ``loss.csv`` as float64 [steps]."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    return np.array([float(r[1]) for r in rows], dtype=np.float64)
