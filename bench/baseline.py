"""The eager-PyTorch baseline every benchmark row is compared against: the DDPM reverse step as a plain
PyTorch port of Ho et al. Algorithm 2 writes it.

Such a loop updates x with separate elementwise ops and a fresh ``torch.randn_like`` per step (Algorithm 2,
line 4, with sigma_t^2 = beta_t):

    x = (1 / sqrt(alpha_t)) * (x - ((1 - alpha_t) / sqrt(1 - alphabar_t)) * eps) + sqrt(beta_t) * z

with alpha_t, alphabar_t, beta_t 0-d tensors indexed from the scheduler's tables. It is kept apart from
``ddpm.reverse`` on purpose: it is what the fused loop is measured against, whatever sampler that loop runs.
"""

from __future__ import annotations

import numpy as np
import torch

from ddpm.schedule import Schedule

__all__ = ["EagerScheduler", "eager_update", "eager_loop"]


class EagerScheduler:
    """A typical NoiseScheduler's tables as float32 tensors on a device (fixed_large variance: sigma^2 = beta)."""

    def __init__(self, schedule: Schedule, device: torch.device | str = "cpu") -> None:
        self.betas = torch.tensor(schedule.betas, dtype=torch.float32, device=device)
        self.alphas = torch.tensor(schedule.alphas, dtype=torch.float32, device=device)
        self.alphas_cumprod = torch.tensor(schedule.alphas_cumprod, dtype=torch.float32, device=device)
        self.timesteps = np.asarray(schedule.timesteps)


def eager_update(sched: EagerScheduler, i: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """One eager reverse update at schedule index i (separate ops + torch.randn_like)."""
    beta_t = sched.betas[i]
    alpha_t = sched.alphas[i]
    alpha_t_bar = sched.alphas_cumprod[i]
    noise = torch.randn_like(x) if i > 0 else torch.zeros_like(x)
    return (1 / torch.sqrt(alpha_t)) * (
        x - ((1 - alpha_t) / (torch.sqrt(1 - alpha_t_bar))) * eps
    ) + torch.sqrt(beta_t) * noise


@torch.no_grad()
def eager_loop(
    model: torch.nn.Module, sched: EagerScheduler, x: torch.Tensor, steps: range | list[int]
) -> torch.Tensor:
    """The eager DDPM sampling loop over schedule indices ``steps`` (descending), eager torch throughout."""
    n = x.shape[0]
    for i in steps:
        t = torch.full((n,), int(sched.timesteps[i]), dtype=torch.int64, device=x.device)
        eps = model(x, t)[:, : x.shape[1]]  # a learned-variance model's output: the eps channels only
        x = eager_update(sched, i, x, eps)
    return x
