"""Reference statistics for image metrics, and the feature extractor they belong to.

``prepare_reference`` turns REF into both: a dataset spec is loaded, embedded (FID's Inception-v3 when its
weights are at hand, else a proxy classifier trained on the dataset) and summarised; a cached ``.npz``
is loaded together with the extractor of the space it was made in, and refuses any other.

Like ADM's evaluator reference batches, the file holds what the metrics need and nothing that can run code
(it is read with ``allow_pickle=False``):

  mu, sigma, count      feature mean [D] and covariance [D, D] of all N reference images (the FD target);
  pool                  up to 10000 of their features [P, D], a seeded random subset. Real-vs-real scales
                        draw a subset S of the pool as stand-in samples and compare it with the rest of the
                        reference (the complement's statistics follow from mu, sigma and S exactly), and
                        precision/recall take their real manifold from the pool;
  space, kind           the feature space; samples are only ever compared in the space the file was made in;
  clf.*                 for the classifier proxy, its weights, so samples can be mapped into that space.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddpm.devices import resolve_device
from ddpm.errors import ArtifactError, InvalidArgumentError
from ddpm.images import to_uint8_nhwc
from ddpm.io import atomic_path, check_writable
from ddpm.trainer.data import dataset_kind, load_dataset

from .features import ClassifierFeatures, InceptionFeatures, reference_labels, train_classifier
from .inception import WEIGHTS_NAME, default_weights_path, load_fid_inception
from .metrics import feature_stats

__all__ = [
    "ReferenceStats",
    "build_reference_stats",
    "cache_reference",
    "check_save_ref",
    "complement_stats",
    "is_cached",
    "load_reference",
    "prepare_reference",
    "reference_images",
    "save_reference",
]

FORMAT = "ddpm-eval-reference-1"
_POOL = 10000  # features kept: two sets of 5000 for precision/recall (O(n^2) distances), ADM's scale too
_ARRAYS = ("mu", "sigma", "pool", "image_shape", "count")


@dataclass
class ReferenceStats:
    """Feature statistics of a reference dataset (see the module docstring for the fields)."""

    dataset: str  # the spec it came from, e.g. ``digits``
    space: str  # feature-space name, e.g. ``inception-v3 pool3 (2048-d), weights sha256 ...``
    kind: str  # inception | classifier
    image_shape: tuple[int, int, int]  # (H, W, C)
    count: int  # images in the reference
    mu: np.ndarray  # [D] float64
    sigma: np.ndarray  # [D, D] float64
    pool: np.ndarray  # [P, D] float32, P <= 10000
    classifier: dict[str, np.ndarray] | None = None  # ClassifierFeatures.to_arrays() for kind == classifier


def build_reference_stats(
    features: np.ndarray, *, dataset: str, space: str, kind: str, image_shape: tuple[int, int, int], seed: int
) -> ReferenceStats:
    """Statistics of reference features [N, D]; the pool is a subset chosen by a permutation seeded by ``seed``."""
    n = len(features)
    if n < 8:
        raise InvalidArgumentError(f"reference {dataset!r} has {n} images; evaluation needs at least 8")
    # Round to float32 first, as the pool is stored: complement statistics (mu, sigma minus a pool subset)
    # are then exact, not off by the rounding of the subtracted features.
    f = np.asarray(features, np.float32).astype(np.float64)
    mu, sigma = feature_stats(f)
    pool = f[np.random.default_rng(seed).permutation(n)[:_POOL]].astype(np.float32)
    shape = (int(image_shape[0]), int(image_shape[1]), int(image_shape[2]))
    return ReferenceStats(dataset, space, kind, shape, n, mu, sigma, pool)


def complement_stats(stats: ReferenceStats, subset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (ddof=1) of the reference without ``subset`` [n, D] (rows of the pool), from
    the sums: sum x = N mu and sum x x^T = (N - 1) sigma + N mu mu^T, less the subset's own sums."""
    n_all, s = stats.count, np.asarray(subset, np.float64)
    n = n_all - len(s)
    if n < 2:
        raise InvalidArgumentError(f"the complement of {len(s)} of {n_all} reference images is too small")
    total = n_all * stats.mu - s.sum(axis=0)
    sq = (n_all - 1) * stats.sigma + n_all * np.outer(stats.mu, stats.mu) - s.T @ s
    mu = total / n
    return mu, (sq - n * np.outer(mu, mu)) / (n - 1)


def save_reference(stats: ReferenceStats, path: str | os.PathLike) -> Path:
    """Write ``stats`` as an npz, atomically (through a file object: np.savez would append .npz to a path)."""
    if not str(path).lower().endswith(".npz"):
        raise InvalidArgumentError(f"--save-ref {str(path)!r} must end in .npz")
    arrays = {k: np.asarray(getattr(stats, k)) for k in _ARRAYS}
    arrays.update(format=np.array(FORMAT), dataset=np.array(stats.dataset))
    arrays.update(space=np.array(stats.space), kind=np.array(stats.kind))
    arrays.update(stats.classifier or {})
    with atomic_path(path, what="--save-ref") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return Path(path)


def load_reference(path: str | os.PathLike) -> ReferenceStats:
    """Read a file written by :func:`save_reference`; anything else is an ArtifactError saying so."""
    p = Path(path)
    how = "write one with `ddpm eval --ref DATA --save-ref FILE.npz`"
    if not p.is_file():
        raise ArtifactError(f"reference statistics {str(p)!r} do not exist ({how})")
    try:
        z = np.load(p, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ArtifactError(f"{p}: not ddpm eval reference statistics ({FORMAT}); {how}")
        with z:
            if "format" not in z.files or str(z["format"]) != FORMAT:
                raise ArtifactError(f"{p}: not ddpm eval reference statistics ({FORMAT}); {how}")
            missing = [k for k in (*_ARRAYS, "dataset", "space", "kind") if k not in z.files]
            if missing:
                raise ArtifactError(f"{p}: reference statistics lack {missing[0]!r}; {how}")
            d = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ArtifactError(f"{p}: not a readable npz ({e}); {how}") from None
    kind = str(d["kind"])
    if kind not in ("inception", "classifier"):
        raise ArtifactError(f"{p}: unknown feature-space kind {kind!r} (expected inception or classifier)")
    return ReferenceStats(
        dataset=str(d["dataset"]),
        space=str(d["space"]),
        kind=kind,
        image_shape=tuple(int(s) for s in d["image_shape"]),
        count=int(d["count"]),
        mu=d["mu"],
        sigma=d["sigma"],
        pool=d["pool"],
        classifier={k: v for k, v in d.items() if k.startswith("clf")} if kind == "classifier" else None,
    )


# ---- from a dataset spec or a cached file to statistics and their extractor ----


def is_cached(ref: str | os.PathLike) -> bool:
    """A ``.npz`` REF is cached statistics; anything else is a dataset spec."""
    return str(ref).lower().endswith(".npz")


def _inception(weights: str | os.PathLike | None, device: str) -> tuple[InceptionFeatures | None, str | None]:
    """The FID network from ``weights`` or torch's hub cache; else (None, a note saying what is missing)."""
    path = Path(weights) if weights is not None else default_weights_path()
    if weights is None and not path.is_file():
        return None, (
            f"FID needs the FID Inception-v3 weights {WEIGHTS_NAME} (pytorch-fid's release file); "
            f"pass --inception-weights FILE or put it at {path}. Reporting FD-classifier, a proxy, instead"
        )
    net, fingerprint = load_fid_inception(path)
    return InceptionFeatures(net, fingerprint, device), None


def check_save_ref(ref: str | os.PathLike, save_ref: str | os.PathLike) -> None:
    """Fail before any features are computed, not after."""
    if is_cached(ref):
        raise InvalidArgumentError("--save-ref needs a dataset as --ref (it is already cached statistics)")
    if not str(save_ref).lower().endswith(".npz"):
        raise InvalidArgumentError(f"--save-ref {str(save_ref)!r} must end in .npz")
    check_writable(save_ref, what="--save-ref")


def _device(device: str) -> str:
    return str(resolve_device(device))


def reference_images(spec: str, image_size: int | None) -> np.ndarray:
    """The dataset as uint8 [N, H, W, C], quantised the way ``ddpm run --npz`` quantises samples."""
    data = load_dataset(spec, image_size=image_size).data
    if data.dtype == torch.uint8:
        return np.ascontiguousarray(data.permute(0, 2, 3, 1).numpy())
    return to_uint8_nhwc(data)  # float datasets (digits) are in [-1, 1], like the model's samples


def _check_shape(samples_shape: tuple[int, ...], ref_shape: tuple[int, ...], ref: str) -> None:
    if tuple(samples_shape) != tuple(ref_shape):
        (h, w, c), (rh, rw, rc) = samples_shape, ref_shape
        raise InvalidArgumentError(
            f"samples are {h}x{w} with {c} channel(s) but the reference {ref} is {rh}x{rw} with {rc} channel(s)"
            + ("; --image-size resizes a dataset reference" if c == rc else "")
        )


def prepare_reference(
    ref: str | os.PathLike,
    *,
    image_shape: tuple[int, int, int] | None = None,
    inception_weights: str | os.PathLike | None = None,
    seed: int = 0,
    device: str = "auto",
    image_size: int | None = None,
) -> tuple[ReferenceStats, InceptionFeatures | ClassifierFeatures, list[str]]:
    """Reference statistics and the feature extractor they belong to, from cached statistics (``*.npz``) or a
    dataset spec; ``image_shape`` (H, W, C) of the samples is checked before any features are computed."""
    if is_cached(ref):
        if image_size is not None:
            raise InvalidArgumentError("--image-size resizes a dataset reference, not cached statistics")
        stats = load_reference(ref)
        if image_shape is not None:
            _check_shape(image_shape, stats.image_shape, str(ref))
        return stats, _cached_extractor(stats, str(ref), inception_weights, _device(device)), []
    spec = str(ref)
    if dataset_kind(spec) == "swissroll":
        raise InvalidArgumentError(
            "swissroll holds 2-D points; image reference statistics need an image dataset"
        )
    if dataset_kind(spec) == "folder" and image_size is None and image_shape is not None:
        image_size = image_shape[0]  # a folder has no native size: crop it to the samples'
    images = reference_images(spec, image_size)
    if image_shape is not None:
        _check_shape(image_shape, images.shape[1:], spec)
    extractor, note = _inception(inception_weights, _device(device))
    notes = [note] if note else []
    if extractor is None:
        labels = reference_labels(spec, len(images))
        if labels is None and dataset_kind(spec) != "folder":
            notes.append(f"no labels found for {spec}: the proxy classifier learns rotations instead")
        extractor = train_classifier(images, labels, dataset=spec, seed=seed)
    stats = build_reference_stats(
        extractor(images),
        dataset=spec,
        space=extractor.space,
        kind="inception" if isinstance(extractor, InceptionFeatures) else "classifier",
        image_shape=images.shape[1:],
        seed=seed,
    )
    if isinstance(extractor, ClassifierFeatures):
        stats.classifier = extractor.to_arrays()
    return stats, extractor, notes


def _cached_extractor(
    stats: ReferenceStats, where: str, weights: str | os.PathLike | None, device: str
) -> InceptionFeatures | ClassifierFeatures:
    """The extractor of the space the cached statistics live in; never another one."""
    if stats.kind == "classifier":
        if weights is not None:
            raise InvalidArgumentError(
                f"{where} holds FD-classifier statistics ({stats.space}); Inception features cannot be compared "
                "with them: rebuild it with `ddpm eval --ref DATA --inception-weights FILE --save-ref FILE.npz`"
            )
        return ClassifierFeatures.from_arrays(stats.classifier or {}, stats.space, where)
    extractor, _ = _inception(weights, device)
    if extractor is None:
        raise InvalidArgumentError(
            f"{where} holds FID statistics ({stats.space}); pass --inception-weights FILE ({WEIGHTS_NAME})"
        )
    if extractor.space != stats.space:
        raise InvalidArgumentError(
            f"{where} was made in {stats.space}, but these weights give {extractor.space}: "
            "features of different networks cannot be compared"
        )
    return extractor


def cache_reference(
    ref: str,
    save_ref: str | os.PathLike,
    *,
    inception_weights: str | os.PathLike | None = None,
    seed: int = 0,
    device: str = "auto",
    image_size: int | None = None,
) -> tuple[ReferenceStats, list[str]]:
    """Compute the statistics of dataset ``ref`` and write them to ``save_ref`` (no samples needed)."""
    check_save_ref(ref, save_ref)
    stats, _, notes = prepare_reference(
        ref, inception_weights=inception_weights, seed=seed, device=device, image_size=image_size
    )
    save_reference(stats, save_ref)
    return stats, notes
