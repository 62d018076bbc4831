"""``ddpm eval --per-class``: how well a class-conditional model's samples match the classes they were asked for.

The npz holds, beside ``arr_0``, ``classes`` (int64 [M]: the class each sample was asked for; ``ddpm run --npz``
writes it). The proxy classifier of features.py, trained on the labelled reference, answers for every class c:

  accuracy     the share of class-c samples it assigns to c (how often the model draws the class it was asked for)
  confidence   their mean top class probability (how recognisable they are)
  FD           the Fréchet distance of their classifier features to those of the reference images of class c

each beside its real-vs-real scale, as every ddpm eval figure: accuracy and confidence of as many reference images
of each class as there are samples of it (drawn at random, the mean and spread over 5 draws; the classifier was
trained on them, so this is the best a model can score), and FD of that many reference images of class c against
the rest of class c. A cached reference holds no labels, so --per-class needs a dataset REF.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ddpm.errors import ArtifactError, InvalidArgumentError
from ddpm.trainer.data import load_class_labels

from .features import ClassifierFeatures, reference_labels, train_classifier
from .metrics import feature_stats, frechet_distance

__all__ = ["ClassScore", "class_names", "check_classes", "load_classes", "per_class_scores"]

_SPLITS = 5


@dataclass
class ClassScore:
    """One class's row of the per-class table (``value`` / ``scale`` / ``spread`` as in evaluate.Metric); a
    figure that needs more samples than the class has is None."""

    cls: int
    name: str
    count: int  # samples asked for this class
    accuracy: float
    accuracy_scale: float
    confidence: float
    confidence_scale: float
    fd: float | None
    fd_scale: float | None
    fd_spread: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"class": self.cls, **{k: v for k, v in asdict(self).items() if k != "cls"}}


def load_classes(path: str | os.PathLike, count: int) -> np.ndarray:
    """``classes`` of a samples npz as int64 [count]; one-line errors naming the file otherwise."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            if "classes" not in z.files:
                raise InvalidArgumentError(
                    f"{p}: no 'classes' array (the class each sample was asked for, which `ddpm run --class C "
                    "--npz` writes); --per-class needs it"
                )
            y = z["classes"]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ArtifactError(f"{p}: classes is unreadable ({e})") from None
    return check_classes(y, count, str(p))


def check_classes(y: Any, count: int, what: str = "classes") -> np.ndarray:
    y = np.asarray(y)
    if y.dtype.kind not in "iu" or y.shape != (count,):
        raise InvalidArgumentError(
            f"{what}: classes must be integers [{count}] (one per sample), got {y.dtype} {list(y.shape)}"
        )
    return y.astype(np.int64)


def class_names(spec: str, classes: np.ndarray) -> list[str]:
    """The class names of the dataset ``spec`` after checking that every asked class is one of them (cheap: no
    image is read); one-line errors for an unlabelled reference or a class outside it."""
    try:
        names = load_class_labels(spec).names
    except InvalidArgumentError:
        raise InvalidArgumentError(
            f"--per-class needs a labelled reference; {spec} has no labels (digits, mnist:DIR with its label "
            "file, cifar10:DIR and folder:DIR with one sub-folder per class have)"
        ) from None
    bad = classes[(classes < 0) | (classes >= len(names))]
    if len(bad):
        raise InvalidArgumentError(
            f"classes holds {int(bad[0])}, which is not a class of {spec} (0..{len(names) - 1}); a sample of the "
            "null class (unconditional) has no class to score"
        )
    return names


def _fd(a: np.ndarray, b: np.ndarray) -> float | None:
    return frechet_distance(*feature_stats(a), *feature_stats(b)) if min(len(a), len(b)) >= 2 else None


def per_class_scores(
    x: np.ndarray,
    classes: np.ndarray,
    spec: str,
    images: np.ndarray,
    *,
    extractor: Any = None,
    seed: int = 0,
) -> tuple[list[ClassScore], dict[str, float], str]:
    """Per-class scores of uint8 samples ``x`` [M, H, W, C] asked for ``classes`` [M], against the dataset
    ``spec`` whose images [N, H, W, C] are ``images``; ``extractor``: the run's feature extractor, reused when it
    is the classifier trained on these labels (else one is trained, as ``prepare_reference`` would).

    Returns the rows, the overall class accuracy ``{"value", "scale", "spread"}`` and the classifier's name."""
    labels = reference_labels(spec, len(images))
    names = class_names(spec, classes)
    clf = extractor if isinstance(extractor, ClassifierFeatures) and extractor.labelled else None
    clf = clf or train_classifier(images, labels, dataset=spec, seed=seed)
    f_x, f_ref = clf(x), clf(images)
    p_x, p_ref = clf.class_probs(f_x), clf.class_probs(f_ref)
    rng = np.random.default_rng(seed + 2)
    rows, hits, real_hits = [], 0.0, np.zeros(_SPLITS)
    for c in np.unique(classes):
        mine, ref = classes == c, np.flatnonzero(labels == c)
        m = int(mine.sum())
        acc = float((p_x[mine].argmax(1) == c).mean())
        draws = [rng.choice(ref, m, replace=m > len(ref)) for _ in range(_SPLITS)]
        real_acc = np.array([(p_ref[d].argmax(1) == c).mean() for d in draws])
        real_conf = np.array([p_ref[d].max(1).mean() for d in draws])
        n = min(m, len(ref) // 2)
        splits = [rng.permutation(ref) for _ in range(_SPLITS)]
        real_fd = [_fd(f_ref[s[:n]], f_ref[s[n:]]) for s in splits] if n >= 2 else []
        scale = np.array([v for v in real_fd if v is not None])
        rows.append(
            ClassScore(
                int(c), names[int(c)], m, acc, float(real_acc.mean()), float(p_x[mine].max(1).mean()),
                float(real_conf.mean()), _fd(f_x[mine], f_ref[ref]),
                float(scale.mean()) if len(scale) else None, float(scale.std()) if len(scale) else None,
            )
        )  # fmt: skip
        hits += acc * m
        real_hits += real_acc * m
    overall = {
        "value": hits / len(classes),
        "scale": float(real_hits.mean() / len(classes)),
        "spread": float(real_hits.std() / len(classes)),
    }
    return rows, overall, clf.space
