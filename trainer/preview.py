"""What training writes besides the checkpoint: sample grids from a reference sampling loop, the loss curve.

``reference_sample`` draws previews with the project's one reverse loop (``ddpm.reverse``) and the plain torch
step ``ddpm.step`` as its executor; the trainer's previews and the quality tests use it. ``preview_count`` scales
the number of preview images to what the model costs on this device, so a large model's first iteration on a CPU
does not wait minutes for its preview. A class-conditional model's preview has one row per class (guidance 1: the
plain conditional model), every row from the same noise, so each column shows what the class changes.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ddpm.images import new_figure, save_figure, save_samples_png
from ddpm.io import write_text_atomic
from ddpm.loop import ReversePlan, run_reverse
from ddpm.models import class_count
from ddpm.noise import initial_noise
from ddpm.options import SamplingOptions
from ddpm.schedule import Prediction, Sampler, Schedule

from .conditional import preview_classes
from .config import TrainConfig

__all__ = [
    "PREVIEW_BUDGET_S",
    "PreviewCount",
    "preview_count",
    "reference_sample",
    "draw_preview",
    "write_previews",
    "write_loss_csv",
    "plot_loss",
]

# Seconds one preview may take when its count is left to the trainer: a preview is a look, not a measurement.
PREVIEW_BUDGET_S = 15.0
_IMAGES, _POINTS, _MIN_IMAGES = 64, 1000, 4


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
    sampler: Sampler | str = "ddpm",
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw ``n`` samples [n, *sample_shape] float32 with ``sampler`` (default DDPM ancestral sampling, Ho et al.
    Algorithm 2, fixed_small variance) over ``schedule.respace(steps)`` (all steps when None; the sampler's
    default spacing), feeding the model original timesteps: :func:`ddpm.reverse` with the reference executor
    (``ddpm.step``), in batches of ``batch_size``.

    The noise is Philox keyed by (``seed``, sample index, step), as in ``ddpm run`` (the global torch RNG is
    not touched). ``clip`` bounds the predicted x0 (1.0 for images in [-1, 1]; None for unbounded data such
    as the swiss roll). ``y`` [n] int64: the class of each sample for a class-conditional model, which is then
    called as ``model(x, t, y)`` (guidance 1).
    """
    opts = SamplingOptions(sampler=sampler, clip=clip, seed=seed)
    sched = schedule if steps is None else schedule.respace(int(steps), spacing=opts.sampler.default_spacing)
    plan = ReversePlan.create(sched, opts, prediction=prediction)

    def denoiser(yb: torch.Tensor | None):
        def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            # .float(): a module under autocast may answer in half precision
            return (model(x, t) if yb is None else model(x, t, yb)).float()

        return call

    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        x = initial_noise(plan.seed, (b, *sample_shape), sample_offset=start, device=device)
        yb = None if y is None else y[start : start + b].to(device)
        out.append(run_reverse(denoiser(yb), x, plan, sample_offset=start, kernel="reference"))
    return torch.cat(out)


@dataclass(frozen=True)
class PreviewCount:
    """How many preview samples, and why: ``n`` (0: none), the seconds one preview should take (None when not
    measured) and the rule that chose ``n``, for the run header."""

    n: int
    seconds: float | None
    why: str


@torch.no_grad()
def preview_count(
    model: nn.Module, sample_shape: Sequence[int], steps: int, device: torch.device, asked: int | None
) -> PreviewCount:
    """The preview's sample count: ``asked`` when given (0 = no previews); else 1000 points for vector data, and
    for images up to 64, as many as one preview of ``steps`` model calls fits in PREVIEW_BUDGET_S (at least 4),
    from one timed forward pass of the model on this device (the best of two calls after a warm-up)."""
    image = len(sample_shape) == 3
    if asked is not None and (asked == 0 or not image):
        return PreviewCount(asked, None, "asked" if asked else "--preview-samples 0")
    b = min(asked or 8, 8)
    x = torch.zeros((b, *sample_shape), device=device)
    t = torch.full((b,), 0, dtype=torch.int64, device=device)
    args = (x, t) if not class_count(model.config) else (x, t, torch.zeros_like(t))
    was_training = model.training
    model.eval()
    best = math.inf
    for k in range(3):
        t0 = time.perf_counter()
        model(*args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if k:
            best = min(best, time.perf_counter() - t0)
    model.train(was_training)
    per_sample = best / b * steps
    if asked is not None:
        return PreviewCount(asked, asked * per_sample, "asked")
    if not image:
        return PreviewCount(_POINTS, _POINTS * per_sample, "1000 points")
    n = int(min(_IMAGES, max(_MIN_IMAGES, PREVIEW_BUDGET_S // max(per_sample, 1e-9))))
    why = f"up to {_IMAGES} that fit {PREVIEW_BUDGET_S:g} s at {per_sample:.2g} s per sample"
    return PreviewCount(n, n * per_sample, why)


def draw_preview(
    ema: nn.Module, schedule: Schedule, cfg: TrainConfig, sample_shape: Sequence[int], device, n: int
) -> tuple[torch.Tensor | None, int | None]:
    """(samples, tiles per row) of the trainer's preview of ``n`` samples ((None, None) when n = 0): as the run
    records in ``sampling``; a class-conditional model's in rows of one class each (preview_classes)."""
    if n == 0:
        return None, None
    how = cfg.preview(len(sample_shape) == 3)
    opts = dict(steps=how["steps"], seed=cfg.seed, clip=how["clip"], device=device, sampler=how["sampler"])
    k = class_count(ema.config)
    if not k:
        return reference_sample(ema, schedule, cfg.prediction, sample_shape, n=n, **opts), None
    classes, cols = preview_classes(k, n)
    rows = [
        reference_sample(
            ema, schedule, cfg.prediction, sample_shape, n=cols, y=torch.full((cols,), c), **opts
        )
        for c in classes  # the same seed and sample indices: each row starts from the same noise
    ]
    return torch.cat(rows), cols


def write_previews(out: Path, x: torch.Tensor, cfg: TrainConfig, k: int, nrow: int | None) -> None:
    """samples/step_K.png and samples.png (the latest); ``nrow`` tiles per row (a conditional preview's)."""
    (out / "samples").mkdir(exist_ok=True)
    rows = "" if nrow is None else ", one row per class"
    title = f"{cfg.data} step {k} ({cfg.sample_steps} DPM-Solver++ steps{rows})"
    save_samples_png(x, out / "samples" / f"step_{k:07d}.png", title=title, nrow=nrow)
    save_samples_png(x, out / "samples.png", title=title, nrow=nrow)


def write_loss_csv(path: str | os.PathLike, losses: Sequence[float], *, start: int = 1) -> Path:
    """``step,loss`` rows, one per training step (step numbers from ``start``), written atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["step", "loss"])
    for k, v in enumerate(losses, start):
        w.writerow([k, repr(float(v))])
    return write_text_atomic(path, buf.getvalue())


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
