"""Which timesteps a respaced schedule keeps (docs/design.md, "The math": respacing).

    uniform   evenly spaced in t, always keeping 0 and T-1 (improved-diffusion's ``space_timesteps``)
    trailing  evenly spaced in t counted down from T-1, so the smallest kept t is about T/steps, never 0
              (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2)
    logsnr    evenly spaced in the half log-SNR lambda = log(sqrt(ab) / sqrt(1 - ab)) between the first and the
              last timestep (Lu et al. 2022, DPM-Solver, Sec. 3.3: uniform lambda for pixel-space models)

Why the choice matters for multistep solvers: DPM-Solver++(2M) extrapolates x0_hat linearly in lambda with the
ratio r = h_prev / h of consecutive lambda steps. Uniform-in-t spacing of a linear schedule ends with one huge
lambda step onto t = 0 (lambda jumps from ~1.7 to ~4.6 at 20 steps, r ~ 0.2), where the extrapolation weights
are 1 + 1/(2r) ~ 3.4 and -1/(2r) ~ -2.4 and the samples blur. Measured on the swiss-roll model: energy
distance 0.0053 at 20 uniform steps, -0.0008 (the data floor) at 20 logsnr steps.
"""

from __future__ import annotations

import numpy as np

__all__ = ["kept_timesteps"]


def kept_timesteps(alphas_cumprod: np.ndarray, steps: int, spacing: str) -> np.ndarray:
    """Indices (ascending, distinct, always including the last one) of the ``steps`` entries to keep;
    ``spacing`` is uniform | trailing | logsnr (``ddpm.schedule.Spacing``, a str enum)."""
    n = len(alphas_cumprod)
    if steps == 1:
        return np.array([n - 1])
    if spacing == "uniform":
        return np.round(np.arange(steps, dtype=np.float64) * (n - 1) / (steps - 1)).astype(np.int64)
    if spacing == "trailing":
        return np.round(np.linspace(n - 1, 0, steps + 1)[:steps][::-1]).astype(np.int64)
    ab = np.asarray(alphas_cumprod, dtype=np.float64)
    lam = 0.5 * (np.log(ab) - np.log1p(-ab))  # decreasing in t
    targets = np.linspace(lam[0], lam[-1], steps)
    keep = np.searchsorted(-lam, -targets)  # first index with lambda <= target
    keep = np.clip(keep, 0, n - 1)
    # Near t = 0 lambda moves faster than one timestep per target: make the indices distinct, keeping T-1.
    for k in range(1, steps):
        keep[k] = max(keep[k], keep[k - 1] + 1)
    keep = np.minimum(keep, np.arange(n - steps, n))
    return keep.astype(np.int64)
