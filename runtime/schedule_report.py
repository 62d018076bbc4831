"""Human-readable views of a schedule: the `ddpm schedule` table and plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ddpm.images import new_figure, save_figure
from ddpm.schedule import Schedule


def schedule_table(schedule: Schedule, rows: int = 11) -> str:
    """A fixed-width table of (i, t, beta, alphabar, sqrt(alphabar), SNR) at ``rows`` evenly spaced entries."""
    n = len(schedule)
    idx = np.unique(np.round(np.linspace(0, n - 1, max(2, min(rows, n)))).astype(int))
    cfg = ", ".join(f"{k}={v}" for k, v in schedule.config.items() if k != "betas")
    lines = [
        f"schedule: {cfg} ({n} steps)",
        f"{'i':>6} {'t':>6} {'beta':>12} {'alphabar':>12} {'sqrt(ab)':>10} {'SNR':>12}",
    ]
    ab = schedule.alphas_cumprod
    for i in idx:
        lines.append(
            f"{i:>6} {schedule.timesteps[i]:>6} {schedule.betas[i]:>12.6g} {ab[i]:>12.6g} "
            f"{np.sqrt(ab[i]):>10.5f} {schedule.snr[i]:>12.5g}"
        )
    return "\n".join(lines)


def plot_schedule(schedule: Schedule, path: str | Path) -> Path:
    """Plot sqrt(alphabar_t) (signal) and sqrt(1 - alphabar_t) (noise) against t, written atomically as PNG."""
    ab = schedule.alphas_cumprod
    fig, ax = new_figure((6, 3.6), dpi=120)
    ax.plot(schedule.timesteps, np.sqrt(ab), label=r"$\sqrt{\bar\alpha_t}$ (signal)")
    ax.plot(schedule.timesteps, np.sqrt(1 - ab), label=r"$\sqrt{1-\bar\alpha_t}$ (noise)")
    ax.set_xlabel("t")
    ax.set_title(f"{schedule.config.get('kind', 'custom')} schedule, {len(schedule)} steps")
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, path, what="--plot")
