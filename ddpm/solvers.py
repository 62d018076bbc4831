"""Multistep solver coefficients as rows of the step table (docs/design.md, "Multistep solvers").

Kept apart from ddpm/schedule.py, which turns them into [steps, 6] tables: this module is the float64 math of
one solver family and needs nothing but the alphabars.
"""

from __future__ import annotations

import numpy as np

__all__ = ["dpmpp_2m"]


def dpmpp_2m(ab: np.ndarray, ab_prev: np.ndarray, *, sde: bool) -> tuple[np.ndarray, ...]:
    """(a, b, c, sigma) of DPM-Solver++(2M), midpoint form (Lu et al. 2022, Algorithm 2), or its SDE variant.

    Step i goes from s = entry i to t = alphabar_prev_i (1 at i = 0), alpha = sqrt(ab), sigma = sqrt(1 - ab),
    lambda = log(alpha / sigma), h_i = lambda_t - lambda_s, r_i = h_{i+1} / h_i (previous step over this one).
    With phi = 1 - e^{-h} (ODE) or 1 - e^{-2h} (SDE) and D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev:
        ODE: x_t = (sigma_t/sigma_s) x_s + alpha_t phi D
        SDE: x_t = (sigma_t/sigma_s) e^{-h} x_s + alpha_t phi D + sigma_t sqrt(phi) z
    The first step (no history yet) and the final one (to sigma_t = 0, where r = 0) are first order, D = x0_hat;
    the final step's limit h -> inf is x_0 = x0_hat. Derivation, diffusers comparison: docs/design.md, "Multistep solvers".
    """
    n = ab.size
    sigma_s, alpha_t, sigma_t = np.sqrt(1.0 - ab), np.sqrt(ab_prev), np.sqrt(1.0 - ab_prev)
    lam = np.log(np.sqrt(ab)) - np.log(sigma_s)
    a, b, c, sigma = (np.zeros(n) for _ in range(4))
    b[0] = 1.0  # final step: (a, b, c, sigma) = (0, 1, 0, 0)
    h = np.full(n, np.inf)
    h[1:] = lam[:-1] - lam[1:]  # lambda_t of step i is lambda of entry i - 1
    i = np.arange(1, n)
    phi = -np.expm1(-(2.0 if sde else 1.0) * h[i])
    a[i] = sigma_t[i] / sigma_s[i] * (np.exp(-h[i]) if sde else 1.0)
    b[i] = alpha_t[i] * phi
    if sde:
        sigma[i] = sigma_t[i] * np.sqrt(phi)
    j = np.arange(1, n - 1)  # second order: a previous x0_hat exists and the step is not the final one
    half_inv_r = 0.5 * h[j] / h[j + 1]  # 1 / (2 r_i)
    c[j] = -b[j] * half_inv_r
    b[j] = b[j] * (1.0 + half_inv_r)
    return a, b, c, sigma
