"""What training writes besides the checkpoint: sample grids from a reference sampling loop, the loss curve.

``reference_sample`` draws previews with the project's one reverse loop (``ddpm.reverse``) and the plain torch
step ``ddpm.step`` as its executor; the trainer's previews and the quality tests use it.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ddpm.images import new_figure, save_figure
from ddpm.io import write_text_atomic
from ddpm.loop import ReversePlan, run_reverse
from ddpm.noise import initial_noise
from ddpm.schedule import Prediction, Schedule

__all__ = ["reference_sample", "write_loss_csv", "plot_loss", "read_loss_csv"]


def reference_sample(
    model: nn.Module,
    schedule: Schedule,
    prediction: Prediction | str,
    sample_shape: Sequence[int],
    *,
    n: int,
    steps: int | None = None,
    seed: int = 0,
    clip: float | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 1024,
) -> torch.Tensor:
    """Draw ``n`` samples [n, *sample_shape] float32 with DDPM ancestral sampling (Ho et al. Algorithm 2,
    fixed_small variance) over ``schedule.respace(steps)`` (all steps when None), feeding the model original
    timesteps: :func:`ddpm.reverse` with the reference executor (``ddpm.step``), in batches of ``batch_size``.

    The noise is Philox keyed by (``seed``, sample index, step), as in ``ddpm run`` (the global torch RNG is
    not touched). ``clip`` bounds the predicted x0 (1.0 for images in [-1, 1]; None for unbounded data such
    as the swiss roll).
    """
    sched = schedule if steps is None else schedule.respace(int(steps))
    plan = ReversePlan.parse(sched, prediction=prediction, clip=clip, seed=seed)

    def denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(x, t).float()  # a module under autocast may answer in half precision

    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        x = initial_noise(plan.seed, (b, *sample_shape), sample_offset=start, device=device)
        out.append(run_reverse(denoiser, x, plan, sample_offset=start, kernel="reference"))
    return torch.cat(out)


def write_loss_csv(path: str | os.PathLike, losses: Sequence[float], *, start: int = 1) -> Path:
    """``step,loss`` rows, one per training step (step numbers from ``start``), written atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["step", "loss"])
    for k, v in enumerate(losses, start):
        w.writerow([k, repr(float(v))])
    return write_text_atomic(path, buf.getvalue())


def read_loss_csv(path: str | os.PathLike) -> np.ndarray:
    """The losses of a ``loss.csv`` as float64 [steps]."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    return np.array([float(r[1]) for r in rows], dtype=np.float64)


def plot_loss(path: str | os.PathLike, losses: Sequence[float], *, title: str = "training loss") -> Path:
    """The loss per step (faint) and its moving average over ~1% of the run, log-scaled, as a PNG."""
    y = np.asarray(losses, dtype=np.float64)
    steps = np.arange(1, len(y) + 1)
    fig, ax = new_figure((6, 3))
    ax.plot(steps, y, lw=0.5, alpha=0.3, color="tab:blue")
    win = max(1, len(y) // 100)
    if len(y) >= win > 1:
        smooth = np.convolve(y, np.ones(win) / win, mode="valid")
        ax.plot(steps[win - 1 :], smooth, lw=1.5, color="tab:blue", label=f"mean of {win} steps")
        ax.legend(loc="upper right")
    if len(y) and np.all(y > 0):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE")
    ax.set_title(title)
    return save_figure(fig, path, what="loss plot")
