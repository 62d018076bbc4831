"""Sample-quality math: energy distance on points, Fréchet distance and precision/recall on features, and the
quality-test checks built on them (swiss-roll energy distance, a classifier trained on the real digits).

Energy distance (Szekely & Rizzo): D^2(P, Q) = 2 E|X - Y| - E|X - X'| - E|Y - Y'| >= 0, zero iff P = Q.
The within-sample terms use the unbiased U-statistic (pairs i != j), so two independent samples of the same
distribution score ~0 (positive or slightly negative), and any difference in distribution raises it.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from ddpm.errors import InvalidArgumentError
from ddpm.trainer.data import swissroll

__all__ = [
    "energy_distance",
    "feature_stats",
    "frechet_distance",
    "precision_recall",
    "swissroll_energy_check",
    "digits_classifier_check",
]


def _points(x: Any, name: str) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().to("cpu", torch.float64).numpy()
    except ImportError:  # pragma: no cover
        pass
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] < 2:
        raise InvalidArgumentError(f"{name} must be [N, D] with N >= 2 points, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise InvalidArgumentError(f"{name} contains NaN or Inf")
    return a


def _mean_dist(a: np.ndarray, b: np.ndarray, *, same: bool, block: int = 2048) -> float:
    total = 0.0
    for i in range(0, len(a), block):
        ai = a[i : i + block]
        d2 = (ai * ai).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * ai @ b.T
        total += np.sqrt(np.maximum(d2, 0.0)).sum()
    # The diagonal of a sample against itself is zero, so excluding it only changes the pair count.
    pairs = len(a) * (len(b) - 1) if same else len(a) * len(b)
    return total / pairs


def energy_distance(a: Any, b: Any) -> float:
    """Squared energy distance between samples a [N, D] and b [M, D] (Tensor or array), in float64."""
    x, y = _points(a, "a"), _points(b, "b")
    if x.shape[1] != y.shape[1]:
        raise InvalidArgumentError(f"a and b must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    return 2.0 * _mean_dist(x, y, same=False) - _mean_dist(x, x, same=True) - _mean_dist(y, y, same=True)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (ddof=1, as pytorch-fid and ADM's evaluator) of features [N, D], float64."""
    f = _points(features, "features")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _drop_roundoff(eigenvalues: np.ndarray) -> np.ndarray:
    """Zero the eigenvalues below the matrix's numerical rank (|w| < D eps max|w|): a rank-deficient
    covariance's null space holds round-off of either sign, whose square roots would add ~sqrt(eps) each."""
    w = np.asarray(eigenvalues)
    tol = (
        len(w) * np.finfo(np.float64).eps * max(float(np.abs(w).max(initial=0.0)), np.finfo(np.float64).tiny)
    )
    return np.where(w > tol, w, 0.0)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982; FID, Heusel et al. 2017):

        d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))

    sigma1 sigma2 is not symmetric, but it is similar to the PSD matrix A = sigma1^(1/2) sigma2 sigma1^(1/2), so
    tr((sigma1 sigma2)^(1/2)) = sum sqrt(eig(A)). Two symmetric eigendecompositions replace scipy's general
    sqrtm: no complex round-off to discard and no epsilon offset for the rank-deficient covariances that
    fewer samples than feature dimensions give (the offset pytorch-fid adds when sqrtm fails).
    """
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise InvalidArgumentError(
            f"Fréchet distance needs mu [D] and sigma [D, D] on both sides; got {mu1.shape}, {s1.shape}, "
            f"{mu2.shape}, {s2.shape}"
        )
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    s1_half = (v * np.sqrt(_drop_roundoff(w))) @ v.T
    a = s1_half @ s2 @ s1_half
    tr_covmean = np.sqrt(_drop_roundoff(np.linalg.eigvalsh((a + a.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T, 0.0)


def _knn_radii(x: np.ndarray, k: int, block: int) -> np.ndarray:
    """Squared distance from each point to its k-th nearest neighbour in x, itself excluded."""
    out = np.empty(len(x))
    for i in range(0, len(x), block):
        # Column 0 of the sorted row is the point itself (distance 0), so the k-th neighbour is column k.
        out[i : i + block] = np.partition(_sq_dists(x[i : i + block], x), k, axis=1)[:, k]
    return out


def _inside(query: np.ndarray, support: np.ndarray, radii: np.ndarray, block: int) -> np.ndarray:
    """For each query point: does it fall in some ball B(support_j, radius_j)?"""
    hit = np.empty(len(query), dtype=bool)
    for i in range(0, len(query), block):
        hit[i : i + block] = (_sq_dists(query[i : i + block], support) <= radii[None, :]).any(axis=1)
    return hit


def precision_recall(real: Any, fake: Any, *, k: int = 3, block: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of fake features [M, D] against real [N, D].

    Each set's manifold is the union of balls around its points reaching the k-th nearest neighbour.
    precision = fraction of fake points inside the real manifold (fidelity); recall = fraction of real points
    inside the fake manifold (diversity). The paper uses k = 3 and equally many real and fake points: the
    radii shrink as a set grows, so unequal counts bias the comparison.
    """
    r, f = _points(real, "real"), _points(fake, "fake")
    if r.shape[1] != f.shape[1]:
        raise InvalidArgumentError(
            f"real and fake features differ in dimension: {r.shape[1]} vs {f.shape[1]}"
        )
    if min(len(r), len(f)) <= k:
        raise InvalidArgumentError(f"precision/recall with k={k} needs more than {k} points per set")
    precision = _inside(f, r, _knn_radii(r, k, block), block).mean()
    recall = _inside(r, f, _knn_radii(f, k, block), block).mean()
    return float(precision), float(recall)


def swissroll_energy_check(samples: Any, *, n_ref: int = 2000, seed: int = 1) -> dict[str, float]:
    """Energy distances for generated swiss-roll points [N, 2]:

    sample_vs_data: samples vs held-out swiss-roll points (data seed ``seed``; training uses seed 0);
    data_vs_data:   held-out vs other held-out sets of the same size as the samples (the noise floor, mean of 4),
                    data_vs_data_std: their standard deviation;
    data_vs_gauss:  held-out vs N(0, I) points, what an untrained model would score (the data is standardised).
    """
    s = _points(samples, "samples")
    ref = swissroll(n_ref, seed=seed)
    # The floor is averaged over 4 draws: one draw's estimate scatters by ~0.0005 (2000 points), which would
    # otherwise add to the scatter of sample_vs_data in any comparison of the two.
    floor = [energy_distance(swissroll(len(s), seed=seed + 1000 + k), ref) for k in range(4)]
    gauss = np.random.default_rng(seed + 2000).standard_normal((len(s), 2))
    return {
        "sample_vs_data": energy_distance(s, ref),
        "data_vs_data": float(np.mean(floor)),
        "data_vs_data_std": float(np.std(floor)),
        "data_vs_gauss": energy_distance(gauss, ref),
    }


@functools.lru_cache(maxsize=1)
def _digits_classifier():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    d = load_digits()
    x = d.images.reshape(len(d.images), -1) / 8.0 - 1.0  # the training scale: [-1, 1]
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(x))
    test, train = perm[:300], perm[300:]
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(x[train], d.target[train])
    return clf, x[test], d.target[test]


def digits_classifier_check(samples: Any) -> dict[str, Any]:
    """Score generated digits [N, 1, 8, 8] in [-1, 1] with a logistic regression trained on the real digits.

    Returns mean_confidence (mean max class probability of the samples), class_counts (argmax histogram,
    10 ints), classes_present, and the same figures for references: real_* on 300 held-out real digits,
    noise_* on uniform noise images.
    """
    a = np.asarray(samples.detach().cpu() if hasattr(samples, "detach") else samples, dtype=np.float64)
    if a.ndim != 4 or a.shape[1:] != (1, 8, 8):
        raise InvalidArgumentError(f"digits samples must be [N, 1, 8, 8], got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise InvalidArgumentError("digits samples contain NaN or Inf")
    clf, x_test, y_test = _digits_classifier()

    def score(x: np.ndarray) -> tuple[float, np.ndarray]:
        p = clf.predict_proba(np.clip(x, -1.0, 1.0))
        return float(p.max(1).mean()), np.bincount(p.argmax(1), minlength=10)

    conf, counts = score(a.reshape(len(a), -1))
    real_conf, _ = score(x_test)
    noise = np.random.default_rng(0).uniform(-1, 1, (len(a), 64))
    noise_conf, noise_counts = score(noise)
    return {
        "mean_confidence": conf,
        "class_counts": counts.tolist(),
        "classes_present": int((counts > 0).sum()),
        "real_mean_confidence": real_conf,
        "real_accuracy": float((clf.predict(x_test) == y_test).mean()),
        "noise_mean_confidence": noise_conf,
        "noise_classes_present": int((noise_counts > 0).sum()),
    }
