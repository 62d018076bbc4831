"""Training configuration: per-dataset defaults, ``TrainConfig`` and its validation (one place, before any work)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ddpm.errors import InvalidArgumentError
from ddpm.models import PRESETS
from ddpm.schedule import Prediction
from ddpm.validate import MAX_IMAGE_SIZE, MAX_TIMESTEPS

from .data import dataset_kind
from .presets import PRESET_DEFAULTS, choose_preset, default_warmup

__all__ = ["TrainConfig", "LR_SCHEDULES", "CONDITIONS", "validate_config", "jsonable_config"]


_FLIP_DEFAULT = {
    "cifar10": True
}  # a folder may hold text or digits: flips are opt-in there (as in diffusers)
_MAX_ITERS = 10**9  # CIFAR-10's 800k steps is the longest default
_MAX_BATCH = 1 << 16  # batch size and preview samples
_FROM_PRESET = ("iters", "batch_size", "lr", "ema_decay")
LR_SCHEDULES = ("constant", "cosine")
_LATER_OPTIONS = {"lr_schedule": "constant", "grad_accum": 1, "cond": None, "p_uncond": 0.1}
CONDITIONS = ("class",)


@dataclass
class TrainConfig:
    """Everything that defines a training run. None = a default: the preset is chosen from the data and the
    device (trainer/presets.py), and iters / batch_size / lr / ema_decay come from the preset."""

    data: str  # dataset spec: swissroll | digits | mnist:DIR | cifar10:DIR | folder:DIR
    out: str | Path  # run directory; the checkpoint is out/model.safetensors
    model: str | None = None  # preset: tiny | small | mnist | cifar10 | mlp
    iters: int | None = None  # total optimisation steps (a resumed run continues up to this step)
    batch_size: int | None = None  # the batch of one optimisation step (the global batch under torchrun)
    lr: float | None = None  # AdamW peak learning rate, reached after `warmup` steps
    warmup: int | None = None  # linear LR warm-up steps; None: min(200, iters // 5)
    lr_schedule: str = "constant"  # after warm-up: constant (Ho et al.) | cosine (decays to 0 at `iters`)
    grad_accum: int = 1  # split each batch into this many micro-batches (same gradient, less memory)
    weight_decay: float = 0.0  # AdamW decoupled weight decay (the paper's Adam had none)
    grad_clip: float = 1.0  # clip the global gradient norm (as in the paper)
    ema_decay: float | None = None  # EMA of the weights (0.9999 in the paper); ramped up early in training
    image_size: int | None = None  # resize images (centre-crop for folder:DIR)
    timesteps: int = 1000  # T of the training schedule
    schedule: str = "linear"  # linear | cosine
    prediction: str = "eps"  # eps | x0 | v: the regression target
    dropout: float | None = None  # override the preset's dropout
    # "class": a class-conditional model trained on the data's labels (trainer/conditional.py); None: unconditional
    cond: str | None = None
    p_uncond: float = 0.1  # label dropout: the probability that a label is replaced by the null class
    flip: bool | None = None  # random horizontal flips (default: on for cifar10 only)
    save_every: int = 0  # also save every N steps (0: only at the end)
    sample_steps: int = 20  # DPM-Solver++(2M) steps (trailing spacing) of the preview grid
    # preview samples: None = up to 64 images (as many as fit PREVIEW_BUDGET_S on this device) or 1000 points;
    # 0 = no previews
    num_samples: int | None = None
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    # torch CPU threads while training (None: leave torch's setting). Small models on a busy 2-core machine
    # train several times faster on 1 thread than on 2 (the OpenMP pool spins against other processes).
    threads: int | None = None
    resume: bool = False  # continue from out/train_state.pt
    overwrite: bool = False  # replace the outputs of an existing run in `out` (refused without it or resume)
    progress: bool = True  # progress on stderr: a bar on a terminal, plain lines every few seconds otherwise
    log_dir: str | Path | None = None  # TensorBoard event files (needs the tensorboard package)

    def checked(self) -> TrainConfig:
        """A copy with the data-independent defaults filled (flips), checked before any data is read."""
        cfg = dataclasses.replace(self, out=Path(self.out))
        if cfg.flip is None:
            cfg.flip = _FLIP_DEFAULT.get(dataset_kind(self.data), False)
        validate_config(cfg)
        return cfg

    def resolved(self, sample_shape: Sequence[int], device: str) -> tuple[TrainConfig, dict[str, str]]:
        """A copy with every None filled for this data and device, validated, and where each default came
        from (``{"model": "auto: 1x16x16 images on cpu", "lr": "preset tiny", ...}``) for the run header."""
        cfg = self.checked()
        origin: dict[str, str] = {} if self.flip is not None else {"flip": "on for cifar10 only"}
        if cfg.model is None:
            cfg.model, why = choose_preset(sample_shape, device)
            origin["model"] = f"auto: {why}"
        preset = PRESET_DEFAULTS.get(cfg.model, {})
        for key in _FROM_PRESET:
            if getattr(cfg, key) is None and key in preset:
                setattr(cfg, key, preset[key])
                origin[key] = f"preset {cfg.model}"
        if cfg.warmup is None and cfg.iters is not None:
            cfg.warmup = default_warmup(cfg.iters)
            origin["warmup"] = "min(200, iters/5)"
        validate_config(cfg)
        return cfg, origin

    def preview(self, is_image: bool) -> dict[str, Any]:
        """How the previews are drawn: DPM-Solver++(2M) at ``sample_steps`` (the fast sampler: 20 steps sample what
        1000 DDPM steps do, benchmarks/solver_cpu.md), images clipped to the data range, points unclipped; ``n``
        is the asked count, None for the default scaled to the model and device (trainer/preview.py). The
        checkpoint records sampler, steps and clip as what `ddpm run` should use."""
        return {
            "n": self.num_samples,
            "sampler": "dpm++2m",
            "steps": self.sample_steps,
            "clip": 1.0 if is_image else None,
        }

    def trajectory(self) -> dict[str, Any]:
        """The settings that determine the loss trajectory; a resumed run must match them."""
        skip = {
            "out",
            "iters",
            "save_every",
            "sample_steps",
            "num_samples",
            "device",
            "threads",
            "resume",
            "overwrite",
            "progress",
            "log_dir",
        }
        # Options added after the first state format count only when they differ from the behaviour before
        # them, so a run saved by an older ddpm still resumes.
        skip.update(k for k, v in _LATER_OPTIONS.items() if getattr(self, k) == v)
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


def validate_config(c: TrainConfig) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise InvalidArgumentError(msg)

    def is_int(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    # The schedule's length first: later checks (--sample-steps) are phrased against it.
    need(
        is_int(c.timesteps) and 1 <= c.timesteps <= MAX_TIMESTEPS,
        f"--timesteps must be an integer in 1..{MAX_TIMESTEPS}, got {c.timesteps!r}",
    )
    need(
        c.image_size is None or (is_int(c.image_size) and 1 <= c.image_size <= MAX_IMAGE_SIZE),
        f"--image-size must be a positive integer <= {MAX_IMAGE_SIZE}, got {c.image_size!r}",
    )
    # Upper bounds: far beyond any real run, they stop a typo from training forever or allocating terabytes.
    need(
        c.iters is None or (is_int(c.iters) and 1 <= c.iters <= _MAX_ITERS),
        f"--iters must be an integer >= 1, got {c.iters!r}",
    )
    need(
        c.batch_size is None or (is_int(c.batch_size) and 1 <= c.batch_size <= _MAX_BATCH),
        f"--batch-size must be an integer >= 1 and <= {_MAX_BATCH}, got {c.batch_size!r}",
    )
    # 1e30: far beyond any real run, and below where AdamW's float32 step overflows before it starts
    need(
        c.lr is None or (math.isfinite(c.lr) and 0 < c.lr <= 1e30),
        f"--lr must be a positive number <= 1e30, got {c.lr!r}",
    )
    need(
        c.warmup is None or (is_int(c.warmup) and 0 <= c.warmup <= _MAX_ITERS),
        f"--warmup must be an integer >= 0, got {c.warmup!r}",
    )
    need(
        math.isfinite(c.weight_decay) and 0 <= c.weight_decay <= 1e30,
        f"--weight-decay must be >= 0 and <= 1e30, got {c.weight_decay!r}",
    )
    need(math.isfinite(c.grad_clip) and c.grad_clip > 0, f"--grad-clip must be > 0, got {c.grad_clip!r}")
    need(
        c.ema_decay is None or 0.0 <= c.ema_decay < 1.0, f"--ema-decay must be in [0, 1), got {c.ema_decay!r}"
    )
    need(
        is_int(c.save_every) and 0 <= c.save_every <= _MAX_ITERS,
        f"--save-every must be an integer >= 0, got {c.save_every!r}",
    )
    need(
        is_int(c.sample_steps) and c.sample_steps >= 1, f"--sample-steps must be >= 1, got {c.sample_steps!r}"
    )
    need(
        c.num_samples is None or (is_int(c.num_samples) and 0 <= c.num_samples <= _MAX_BATCH),
        f"--preview-samples must be >= 0 (0: no previews) and <= {_MAX_BATCH}, got {c.num_samples!r}",
    )
    need(c.sample_steps <= c.timesteps, f"--sample-steps {c.sample_steps} exceeds --timesteps {c.timesteps}")
    need(is_int(c.seed) and 0 <= c.seed < 2**63, f"--seed must be an integer in 0..2^63-1, got {c.seed!r}")
    need(c.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {c.device!r}")
    need(
        c.model is None or c.model in PRESETS,
        f"unknown model preset {c.model!r}; allowed: {', '.join(PRESETS)}",
    )
    need(
        c.lr_schedule in LR_SCHEDULES,
        f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {c.lr_schedule!r}",
    )
    need(
        is_int(c.grad_accum) and 1 <= c.grad_accum <= _MAX_BATCH,
        f"--grad-accum must be an integer >= 1, got {c.grad_accum!r}",
    )
    need(
        c.batch_size is None or c.batch_size % c.grad_accum == 0,
        f"--batch-size {c.batch_size} must split into --grad-accum {c.grad_accum} equal micro-batches",
    )
    need(not (c.resume and c.overwrite), "--resume continues a run and --overwrite replaces it; give one")
    need(
        c.threads is None or (is_int(c.threads) and 1 <= c.threads <= 1024),
        f"--threads must be >= 1 and <= 1024, got {c.threads!r}",
    )
    need(
        c.cond is None or c.cond in CONDITIONS,
        f"--cond must be {', '.join(CONDITIONS)} (or none: unconditional), got {c.cond!r}",
    )
    need(
        isinstance(c.p_uncond, (int, float)) and math.isfinite(c.p_uncond) and 0.0 <= c.p_uncond < 1.0,
        f"--p-uncond must be in [0, 1) (the share of labels replaced by the null class), got {c.p_uncond!r}",
    )
    need(
        c.cond is not None or c.p_uncond == 0.1,
        "--p-uncond applies to class-conditional runs: add --cond class",
    )
    need(
        c.cond is None or dataset_kind(c.data) != "swissroll",
        "--cond class needs labelled images; swissroll holds unlabelled 2-D points",
    )
    Prediction.parse(c.prediction)
    if c.schedule not in ("linear", "cosine"):
        raise InvalidArgumentError(f"unknown schedule kind {c.schedule!r}; allowed: linear, cosine")


def jsonable_config(cfg: TrainConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}
