"""Readers of what the trainer writes, for the tests (the library writes these files; only tests read them back),
and of what a failed torchrun wrote."""

from __future__ import annotations

import csv
import os
import subprocess

import numpy as np


def read_loss_csv(path: str | os.PathLike) -> np.ndarray:
    """The losses of a ``loss.csv`` as float64 [steps]."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    return np.array([float(r[1]) for r in rows], dtype=np.float64)


def torchrun_failure(r: subprocess.CompletedProcess) -> str:
    """What a failed torchrun said, for an assertion message: the ranks' own lines come first (a rank's error, an
    abort's reason), torchrun's summary of who died last, so a tail alone would show only the summary."""
    err = r.stderr
    return err if len(err) <= 5000 else f"{err[:3000]}\n[...]\n{err[-2000:]}"
