"""Which network and optimisation settings a run gets when the user leaves them out (stdlib only: the CLI's help
text is built from this table without importing torch).

The preset follows the data and the device, never the dataset's name alone: a folder of 200 16x16 PNGs on a
laptop CPU must not get the 35.7M-parameter CIFAR-10 UNet (8.7 s per step on 2 cores). Each preset carries the
settings it was tuned with; an explicit ``--model`` brings that preset's settings, and any option given on the
command line wins over both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["PRESET_DEFAULTS", "choose_preset", "preset_rule", "defaults_help", "default_warmup"]

# Per preset: iterations, batch, AdamW peak learning rate, EMA decay. tiny/mlp are the settings the digits and
# swiss-roll quality tests train with; mnist/cifar10 are Ho et al.'s (2e-4, batch 128, EMA 0.9999); small sits
# between them (measured on 16x16 and 32x32 folders on a 2-core CPU).
PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"iters": 4000, "batch_size": 256, "lr": 1e-3, "ema_decay": 0.995},
    "tiny": {"iters": 1500, "batch_size": 64, "lr": 2e-3, "ema_decay": 0.995},
    "small": {"iters": 10000, "batch_size": 64, "lr": 1e-3, "ema_decay": 0.999},
    "mnist": {"iters": 30000, "batch_size": 128, "lr": 2e-4, "ema_decay": 0.9999},
    "cifar10": {"iters": 800000, "batch_size": 128, "lr": 2e-4, "ema_decay": 0.9999},
}
SMALLER = {"cifar10": "small", "mnist": "small", "small": "tiny"}  # the hint when a run would be long


def choose_preset(sample_shape: Sequence[int], device: str) -> tuple[str, str]:
    """``(preset, why)`` for one sample's shape ([D] vectors, [C, H, W] images) on ``device`` (cpu | cuda)."""
    if len(sample_shape) == 1:
        return "mlp", f"{sample_shape[0]}-d vectors"
    c, side = int(sample_shape[0]), int(sample_shape[-1])
    what = f"{c}x{side}x{side} images on {device}"
    if device == "cpu":
        return ("tiny" if side <= 16 else "small"), what
    if side <= 16:
        return "small", what
    return ("mnist" if c == 1 and side <= 28 else "cifar10"), what


def preset_rule() -> str:
    """The rule of :func:`choose_preset` in words (``ddpm train --help`` and the docs)."""
    return (
        "vectors: mlp; images on CPU: tiny up to 16 px, small above; on GPU: small up to 16 px, "
        "mnist for 1-channel up to 28 px, cifar10 otherwise"
    )


def defaults_help() -> str:
    """Every preset's defaults, one clause each, for ``--help``."""
    return "; ".join(
        f"{name}: {d['iters']} iters, batch {d['batch_size']}, lr {d['lr']:g}, EMA {d['ema_decay']:g}"
        for name, d in PRESET_DEFAULTS.items()
    )


def default_warmup(iters: int) -> int:
    """LR warm-up steps when not given: 200 (a fifth of the run for short ones, so 300 steps are not mostly
    warm-up)."""
    return max(1, min(200, iters // 5))
