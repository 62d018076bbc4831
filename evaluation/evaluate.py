"""``ddpm eval``'s library: sample quality of an npz of samples against a reference dataset, offline.

Every value comes with a scale: the same metric computed on real data against real data at the same sample
count. Sample-based metrics are biased by the sample count (FD grows as the count shrinks, Chong & Forsyth
2020), so a bare number cannot say whether 64 samples are good; the real-vs-real value at that count can.

  2-D points (swissroll):  energy distance to held-out points; scale: held-out vs held-out.
  images:                  Fréchet distance (FID with the Inception weights file, else FD-classifier, a proxy),
                           precision/recall (k=3), and for labelled data classifier confidence and class coverage;
                           scale: n reference images against the rest of the reference (disjoint).
  --per-class:             a class-conditional model's samples, class by class: class accuracy, confidence and
                           FD-classifier against the reference images of that class (per_class.py).

The reference can be cached (``reference.py``), as ADM's evaluator caches its reference batches: the
feature statistics, a pool of features for precision/recall and the scales, the feature space they live in,
and for the proxy the classifier itself, since samples must be mapped into that same space.
"""

from __future__ import annotations

import os
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ddpm.errors import ArtifactError, InvalidArgumentError
from ddpm.trainer.data import dataset_kind

from .features import ClassifierFeatures
from .metrics import feature_stats, frechet_distance, precision_recall, swissroll_energy_check
from .per_class import check_classes, class_names, load_classes, per_class_scores
from .reference import (
    ReferenceStats,
    cache_reference,
    check_save_ref,
    complement_stats,
    is_cached,
    prepare_reference,
    reference_images,
    save_reference,
)

# cache_reference and prepare_reference live with the reference statistics; re-exported for the CLI.
__all__ = [
    "EvalReport",
    "Metric",
    "cache_reference",
    "check_samples",
    "evaluate",
    "evaluate_report",
    "load_samples",
    "prepare_reference",
]

_K = 3  # Kynkäänniemi et al.'s neighbourhood size
_SPLITS = 5  # real-vs-real splits averaged for each scale

# What each image metric is called, in JSON and in the table, and what it means.
_FID = ("fid", "FID", "Fréchet distance of Inception-v3 pool3 features; lower is better")
_FD_CLASSIFIER = (
    "fd_classifier",
    "FD-classifier",
    "Fréchet distance of proxy-classifier features (a proxy: not comparable with FID); lower is better",
)
_DESCRIBED = {
    "precision": (
        "precision",
        f"precision (k={_K})",
        "share of samples on the real images' manifold: fidelity",
    ),
    "recall": ("recall", f"recall (k={_K})", "share of real images on the samples' manifold: diversity"),
    "classifier_confidence": (
        "classifier_confidence",
        "classifier confidence",
        "mean top class probability: how recognisable the samples are",
    ),
    "class_coverage": (
        "class_coverage",
        "class coverage",
        "share of the {k} classes predicted at least once",
    ),
}


@dataclass
class Metric:
    key: str  # machine name: fid | fd_classifier | precision | recall | classifier_confidence | ...
    name: str  # what the table prints
    value: float
    scale: float  # the same metric for real data against real data at the same count (mean over splits)
    spread: float  # standard deviation of the scale over the splits: the metric's own noise at this count
    meaning: str


@dataclass
class EvalReport:
    """What ``ddpm eval`` reports; ``to_dict()`` is the JSON form (``metrics`` keyed by ``Metric.key``)."""

    samples: dict[str, Any]  # path, count, shape
    reference: dict[str, Any]  # ref, count, feature_space (images)
    scale: str  # what the scale column measures
    metrics: list[Metric]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    per_class: list[dict[str, Any]] = field(default_factory=list)  # --per-class: per_class.ClassScore rows

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metrics"] = {m.key: {k: v for k, v in asdict(m).items() if k != "key"} for m in self.metrics}
        if not self.per_class:  # asked for with --per-class only
            del d["per_class"]
        return d


# ---- inputs ----


def load_samples(path: str | os.PathLike) -> np.ndarray:
    """``arr_0`` of an npz as ``ddpm run --npz`` writes it, checked by :func:`check_samples`."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"samples file {str(p)!r} does not exist")
    try:
        z = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ArtifactError(f"{p}: not a readable npz ({e})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ArtifactError(f"{p}: a .npy array, not an npz (expected `ddpm run --npz` output)")
    with z:
        if "arr_0" not in z.files:
            raise ArtifactError(
                f"{p}: no arr_0 in the npz (it holds {sorted(z.files)}); expected `ddpm run --npz`"
            )
        try:
            a = z["arr_0"]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise ArtifactError(f"{p}: arr_0 is unreadable ({e})") from None
    return check_samples(a, str(p))


def check_samples(a: np.ndarray, what: str = "samples") -> np.ndarray:
    """uint8 images [M, H, W, C] (C = 1 or 3) pass as they are; float points [M, D] become float64."""
    a = np.asarray(a)
    if a.dtype == np.uint8 and a.ndim == 4 and a.shape[3] in (1, 3):
        out = a
    elif a.dtype in (np.float32, np.float64) and a.ndim == 2 and a.shape[1] >= 1:
        if not np.all(np.isfinite(a)):
            raise InvalidArgumentError(f"{what}: points contain NaN or Inf")
        out = a.astype(np.float64)
    else:
        raise InvalidArgumentError(
            f"{what}: arr_0 must be uint8 images [M, H, W, C] with C = 1 or 3, or float32 points [M, D]; "
            f"got {a.dtype} with shape {list(a.shape)}"
        )
    if len(out) <= _K:
        raise InvalidArgumentError(f"{what}: {len(out)} samples; evaluation needs at least {_K + 1}")
    return out


# ---- metrics ----


def _scores(
    fake: np.ndarray, real: np.ndarray, target: tuple[np.ndarray, np.ndarray], extractor: Any
) -> dict:
    """Image metrics of features ``fake`` [M, D]: FD to ``target`` (mu, sigma), precision/recall against the
    real manifold ``real`` [n, D] (with as many fake points), and the proxy's class metrics."""
    out = {"fd": frechet_distance(*feature_stats(fake), *target)}
    out["precision"], out["recall"] = precision_recall(real, fake[: len(real)], k=_K)
    if isinstance(extractor, ClassifierFeatures) and extractor.labelled:
        probs = extractor.class_probs(fake)
        out["classifier_confidence"] = float(probs.max(1).mean())
        out["class_coverage"] = len(np.unique(probs.argmax(1))) / extractor.n_classes
    return out


def _image_metrics(
    x: np.ndarray, stats: ReferenceStats, extractor: Any, seed: int
) -> tuple[list[Metric], str]:
    """Metrics of uint8 samples [M, H, W, C], and the sentence that says what their scale is.

    The scale repeats each metric with n real images S from the pool as the "samples" and the rest of the
    reference (disjoint from S) as the reference, over 5 random splits: one split's FD scatters by a third
    or more at a few hundred images, so the mean is the scale and the spread is shown beside it.
    """
    f, pool = extractor(x), stats.pool.astype(np.float64)
    n = min(len(f), len(pool) // 2)
    rng = np.random.default_rng(seed + 1)
    splits = [rng.permutation(len(pool)) for _ in range(_SPLITS)]
    value = _scores(f, pool[splits[0][n : 2 * n]], (stats.mu, stats.sigma), extractor)
    real = [
        _scores(pool[p[:n]], pool[p[n : 2 * n]], complement_stats(stats, pool[p[:n]]), extractor)
        for p in splits
    ]
    described = dict(_DESCRIBED)
    described["fd"] = _FID if stats.kind == "inception" else _FD_CLASSIFIER
    k = getattr(extractor, "n_classes", 0)
    metrics = []
    for key, v in value.items():
        r = np.array([d[key] for d in real])
        out_key, name, meaning = described[key]
        metrics.append(Metric(out_key, name, float(v), float(r.mean()), float(r.std()), meaning.format(k=k)))
    scale = (
        f"real vs real: {n} reference images against the rest of the reference, mean (± std) over "
        f"{_SPLITS} random splits; precision/recall use {n} samples and {n} real images"
    )
    if n < len(f):
        scale += f" (FD uses all {len(f)} samples; the scale is at {n}, what the reference allows)"
    return metrics, scale


def _point_metrics(x: np.ndarray, ref: str) -> tuple[list[Metric], str, dict[str, Any]]:
    if is_cached(ref) or dataset_kind(ref) != "swissroll":
        raise InvalidArgumentError(f"samples are points [M, D] but the reference {ref} holds images")
    if x.shape[1] != 2:
        raise InvalidArgumentError(f"swissroll points are 2-D; the samples have D = {x.shape[1]}")
    e = swissroll_energy_check(x)
    metric = Metric(
        "energy_distance",
        "energy distance",
        e["sample_vs_data"],
        e["data_vs_data"],
        e["data_vs_data_std"],
        "squared energy distance to 2000 held-out points (Székely & Rizzo); 0 when the distributions match",
    )
    scale = f"real vs real: {len(x)} held-out points against the 2000, mean (± std) over 4 draws"
    return [metric], scale, {"spec": ref, "count": 2000, "gauss_vs_data": e["data_vs_gauss"]}


def evaluate_report(
    samples: str | os.PathLike | np.ndarray,
    ref: str | os.PathLike,
    *,
    inception_weights: str | os.PathLike | None = None,
    seed: int = 0,
    device: str = "auto",
    image_size: int | None = None,
    save_ref: str | os.PathLike | None = None,
    per_class: bool = False,
    classes: np.ndarray | None = None,
) -> EvalReport:
    """Evaluate ``samples`` (an npz path or its ``arr_0``) against ``ref`` (dataset spec or cached ``.npz``);
    ``save_ref`` also caches the reference statistics for later runs. ``per_class``: also score each class of a
    class-conditional model's samples (``classes``: the class each was asked for, default the npz's
    ``classes``; per_class.py)."""
    t0 = time.perf_counter()
    x = check_samples(samples) if isinstance(samples, np.ndarray) else load_samples(samples)
    info = {"path": None if isinstance(samples, np.ndarray) else str(samples), "count": len(x)}
    info["shape"] = list(x.shape[1:])
    if per_class:
        y = _asked_classes(samples, classes, x, ref)
    if x.dtype != np.uint8:
        if save_ref is not None or image_size is not None:
            raise InvalidArgumentError("--save-ref and --image-size apply to image references, not points")
        metrics, scale, reference = _point_metrics(x, str(ref))
        notes = ["--inception-weights is ignored for points"] if inception_weights is not None else []
        reference["ref"] = str(ref)
        return EvalReport(info, reference, scale, metrics, notes, time.perf_counter() - t0)
    if save_ref is not None:
        check_save_ref(ref, save_ref)
    stats, extractor, notes = prepare_reference(
        ref,
        image_shape=x.shape[1:],
        inception_weights=inception_weights,
        seed=seed,
        device=device,
        image_size=image_size,
    )
    if save_ref is not None:
        save_reference(stats, save_ref)
        notes.append(f"reference statistics saved to {save_ref}")
    metrics, scale = _image_metrics(x, stats, extractor, seed)
    reference = {
        "ref": str(ref),
        "dataset": stats.dataset,
        "count": stats.count,
        "feature_space": stats.space,
    }
    rows = []
    if per_class:
        size = x.shape[1] if image_size is None and dataset_kind(str(ref)) == "folder" else image_size
        found, overall, space = per_class_scores(
            x, y, str(ref), reference_images(str(ref), size), extractor=extractor, seed=seed
        )
        rows = [r.to_dict() for r in found]
        metrics.append(Metric("class_accuracy", "class accuracy", overall["value"], overall["scale"],
                              overall["spread"], "share of samples the classifier assigns to the class they were "
                              "asked for (scale: real images of the same classes)"))  # fmt: skip
        reference["per_class_space"] = space
    return EvalReport(info, reference, scale, metrics, notes, time.perf_counter() - t0, rows)


def _asked_classes(samples: Any, classes: np.ndarray | None, x: np.ndarray, ref: Any) -> np.ndarray:
    """--per-class's inputs, checked before any feature is computed: images, a dataset REF, the classes."""
    if x.dtype != np.uint8:
        raise InvalidArgumentError("--per-class scores images of a class-conditional model, not points")
    if is_cached(ref):
        raise InvalidArgumentError(
            "--per-class needs a dataset as --ref (cached statistics hold no class labels)"
        )
    if classes is not None:
        y = check_classes(classes, len(x))
    elif isinstance(samples, np.ndarray):
        raise InvalidArgumentError("--per-class needs the classes the samples were asked for")
    else:
        y = load_classes(samples, len(x))
    class_names(str(ref), y)
    return y


def evaluate(
    samples: str | os.PathLike | np.ndarray,
    ref: str | os.PathLike,
    *,
    inception_weights: str | os.PathLike | None = None,
    seed: int = 0,
    device: str = "auto",
    image_size: int | None = None,
    per_class: bool = False,
    classes: np.ndarray | None = None,
) -> dict[str, Any]:
    """Sample-quality metrics as a JSON-ready dict (``EvalReport.to_dict()``), for benchmarks and scripts:
    ``metrics[key]`` holds ``name``, ``value``, ``scale`` (real vs real at the same count) and ``meaning``;
    ``per_class`` (with ``per_class=True``) one row per class."""
    report = evaluate_report(
        samples, ref, inception_weights=inception_weights, seed=seed, device=device, image_size=image_size,
        per_class=per_class, classes=classes,
    )  # fmt: skip
    return report.to_dict()
