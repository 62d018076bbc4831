"""What a training run says about itself: a header with every setting and where its value came from, and,
after the first few steps, the measured time per step with the estimated total time, memory and disk.

A new user should never start a 45-minute, 700 MB run without being told so first; the estimate is measured on
the run's own steps (no extra work), and when it is long a smaller preset is timed too and offered.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ddpm.models import build_model, count_params, preset_config

from .config import TrainConfig
from .presets import SMALLER
from .preview import PreviewCount
from .progress import hms

__all__ = [
    "Estimator",
    "run_header",
    "estimate_line",
    "peak_memory_bytes",
    "time_preset_step",
    "smaller_hint",
    "LONG_RUN_SECONDS",
]

LONG_RUN_SECONDS = 15 * 60  # an estimate above this on the CPU times the next smaller preset and offers it


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_header(
    cfg: TrainConfig,
    origin: dict[str, str],
    *,
    n_data: int,
    sample_shape: Sequence[int],
    params: int,
    device: torch.device,
    threads: int,
    start: int,
    previews: PreviewCount,
    classes: Sequence[str] | None = None,
) -> str:
    """The header: one line per topic; a value that was not given on the command line is followed by where it
    came from in brackets (``[preset tiny]``, ``[auto: 3x16x16 images on cpu]``)."""

    def v(key: str, shown: Any = None) -> str:
        text = _fmt(getattr(cfg, key) if shown is None else shown)
        return f"{text} [{origin[key]}]" if key in origin else text

    where = f"{device.type}, {threads} threads" if device.type == "cpu" else str(device)
    shape = "x".join(map(str, sample_shape))
    after = "then cosine decay to 0 at the last step" if cfg.lr_schedule == "cosine" else "then constant"
    micro = cfg.batch_size // cfg.grad_accum
    accum = f" as {cfg.grad_accum} micro-batches of {micro}" if cfg.grad_accum > 1 else ""
    preview = cfg.preview(len(sample_shape) == 3)
    clip = "no clip" if preview["clip"] is None else f"clip {preview['clip']:g}"
    if previews.n == 0:
        shown = "no previews [--preview-samples 0]"
    else:
        cost = "" if previews.seconds is None else f", ~{previews.seconds:.2g} s each"
        origin_n = "" if cfg.num_samples is not None else f" [{previews.why}]"
        shown = f"preview {previews.n} samples{origin_n}, {preview['sampler']} {cfg.sample_steps} steps, {clip}{cost}"
    saves = f"every {cfg.save_every} steps and at the end" if cfg.save_every else "at the end"
    lines = [
        f"train {cfg.data} -> {cfg.out} ({where})",
        f"  data       {n_data} samples {shape}, flips {'on' if cfg.flip else 'off'}",
        f"  model      {v('model')}, {params / 1e6:.2f}M params"
        + ("" if cfg.dropout is None else f", dropout {cfg.dropout:g}"),
        f"  steps      {start + 1}..{v('iters')}, batch {v('batch_size')}{accum}, seed {cfg.seed}",
        f"  optimiser  AdamW lr {v('lr')}, warm-up {v('warmup')} steps, {after}; lr schedule {cfg.lr_schedule}, "
        f"weight decay {cfg.weight_decay:g}, grad clip {cfg.grad_clip:g}",
        f"  EMA        decay {v('ema_decay')}, warm-up min(decay, (1+k)/(10+k)) at step k",
        f"  diffusion  {cfg.schedule} schedule, T={cfg.timesteps}, predicts {cfg.prediction}",
        f"  outputs    saved {saves}; {shown}; TensorBoard {cfg.log_dir or 'off (--log-dir)'}",
    ]
    if classes is not None:
        names = ", ".join(list(classes)[:10]) + (", ..." if len(classes) > 10 else "")
        lines.insert(
            4,
            f"  classes    {len(classes)} ({names}) + the null class {len(classes)}; label dropout p_uncond "
            f"{cfg.p_uncond:g}; previews one row per class",
        )
    return "\n".join(lines)


def peak_memory_bytes(device: torch.device) -> int:
    """The process's peak resident memory (CPU, Linux/macOS) or torch's peak CUDA allocation."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def estimate_line(
    cfg: TrainConfig, *, per_step: float, measured: str, steps_left: int, params: int, memory: int
) -> str:
    """``estimate: ...`` from the measured seconds per step: the rest of the run, the memory seen so far and
    what the run will write (model = EMA weights, train_state = weights, EMA and AdamW's two moments)."""
    weights = 4 * params
    saves = 1 + (cfg.iters // cfg.save_every if cfg.save_every else 0)
    return (
        f"estimate: {steps_left} more steps ~ {hms(per_step * steps_left)} at {per_step:.3g} s/step "
        f"(measured over {measured}); memory {memory / 2**30:.2f} GiB peak; disk {weights / 1e6:.1f} MB "
        f"model.safetensors + {4 * weights / 1e6:.1f} MB train_state.pt + ~{saves * 0.05:.2g} MB previews"
    )


def time_preset_step(
    name: str, sample_shape: Sequence[int], batch: int, device: torch.device, **overrides: Any
) -> tuple[float, int]:
    """Seconds of one training step (forward, backward, AdamW) of preset ``name`` at this batch, and its
    parameter count: the best of two timed steps after a warm-up step, on random data."""
    c = int(sample_shape[0])
    model = build_model(preset_config(name, in_channels=c, image_size=int(sample_shape[-1]), **overrides))
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(batch, *sample_shape, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    best = float("inf")
    for k in range(3):
        a = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x, t), x).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if k:
            best = min(best, time.perf_counter() - a)
    return best, count_params(model)


def smaller_hint(
    cfg: TrainConfig, sample_shape: Sequence[int], device: torch.device, total: float
) -> str | None:
    """When the run is long on the CPU, a line offering the next smaller preset with its own measured time."""
    smaller = SMALLER.get(str(cfg.model))
    if device.type != "cpu" or total < LONG_RUN_SECONDS or smaller is None or len(sample_shape) != 3:
        return None
    per, params = time_preset_step(smaller, sample_shape, cfg.batch_size // cfg.grad_accum, device)
    per *= cfg.grad_accum
    return (
        f"hint: that is long on a CPU; --model {smaller} ({params / 1e6:.2f}M params) measures {per:.3g} s/step "
        f"here, {hms(per * cfg.iters)} for {cfg.iters} steps"
    )


class Estimator:
    """Times steps start+2 .. start+4 (the first carries one-off costs) and reports the estimate once."""

    MEASURE = 3

    def __init__(self, cfg: TrainConfig, start: int, params: int, shape, device) -> None:
        self.cfg, self.start, self.params, self.shape, self.device = cfg, start, params, shape, device
        self.t0 = 0.0
        self.at = min(cfg.iters, start + 1 + self.MEASURE)
        self.done = cfg.iters - start < 2  # nothing to estimate for a 1-step run

    def due(self, k: int) -> bool:
        if k == self.start + 1:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.t0 = time.perf_counter()
        return not self.done and k == self.at

    def report(self, k: int) -> list[str]:
        self.done = True
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        per = (time.perf_counter() - self.t0) / max(1, k - self.start - 1)
        left = self.cfg.iters - k
        lines = [
            estimate_line(
                self.cfg,
                per_step=per,
                measured=f"steps {self.start + 2}-{k}",
                steps_left=left,
                params=self.params,
                memory=peak_memory_bytes(self.device),
            )
        ]
        hint = smaller_hint(self.cfg, self.shape, self.device, per * left)
        return lines + ([hint] if hint else [])
