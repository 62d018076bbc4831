"""Fit the polynomial coefficients used in csrc/philox.h and csrc/step_math.h (run: python csrc/fit_polynomials.py).

Each is a weighted minimax fit (Lawson's iteratively reweighted least squares, float64) of the part of the
function beyond its leading Taylor terms, weighted so that the error is RELATIVE to the function value:
    log1p(f) = f - f^2/2 + f^3 P(f),                f in [sqrt(1/2) - 1, sqrt(2) - 1]
    sin(t)   = t + t^3 S(t^2),  cos(t) = 1 - t^2/2 + t^4 C(t^2),   |t| <= pi/4
    exp(r)   = 1 + r + r^2 E(r),                    |r| <= ln(2)/2  (step_math.h's exp_f32, learned-range sigma)
Printed: the coefficients (lowest order first) as C float literals, and the fit's max relative error, which
is far below float32's 2^-24 = 6e-8 so that the kernels' error is their float32 arithmetic alone.
"""

from __future__ import annotations

import numpy as np


def lawson(
    target: np.ndarray, basis: np.ndarray, weight: np.ndarray, iters: int = 80
) -> tuple[np.ndarray, float]:
    """Coefficients c minimising max |weight * (basis @ c - target)|, and that max."""
    a, b = basis * weight[:, None], target * weight
    w = np.full(target.shape, 1.0 / target.size)
    for _ in range(iters):
        sw = np.sqrt(w)
        c, *_ = np.linalg.lstsq(a * sw[:, None], b * sw, rcond=None)
        err = np.abs(a @ c - b)
        w = w * err / np.sum(w * err)
    return c, float(np.max(np.abs(a @ c - b)))


def chebyshev_nodes(lo: float, hi: float, n: int = 4001) -> np.ndarray:
    return np.cos(np.linspace(0, np.pi, n)) * (hi - lo) / 2 + (hi + lo) / 2


def main() -> None:
    f = chebyshev_nodes(np.sqrt(0.5) - 1, np.sqrt(2) - 1)
    f = f[np.abs(f) > 1e-4]  # the f^3 term vanishes there; any P fits
    p, err = lawson(
        (np.log1p(f) - f + f * f / 2) / f**3,
        np.stack([f**k for k in range(8)], 1),
        np.abs(f**3 / np.log1p(f)),
    )
    print(f"log1p P (max rel err {err:.2e}):", ", ".join(f"{v:.9g}f" for v in p))
    t = chebyshev_nodes(-np.pi / 4, np.pi / 4)
    t = t[np.abs(t) > 1e-3]
    t2 = t * t
    basis = np.stack([t2**k for k in range(3)], 1)
    s, err = lawson((np.sin(t) - t) / t**3, basis, np.abs(t**3 / np.sin(t)))
    print(f"sin S (max rel err {err:.2e}):", ", ".join(f"{v:.9g}f" for v in s))
    c, err = lawson((np.cos(t) - 1 + t2 / 2) / t2**2, basis, np.abs(t2**2 / np.cos(t)))
    print(f"cos C (max rel err {err:.2e}):", ", ".join(f"{v:.9g}f" for v in c))
    r = chebyshev_nodes(-np.log(2) / 2, np.log(2) / 2)
    r = r[np.abs(r) > 1e-3]
    e, err = lawson((np.expm1(r) - r) / r**2, np.stack([r**k for k in range(5)], 1), np.abs(r**2 / np.exp(r)))
    print(f"exp E (max rel err {err:.2e}):", ", ".join(f"{v:.9g}f" for v in e))


if __name__ == "__main__":
    main()
