"""Feature spaces for image metrics: FID's Inception-v3, or a proxy classifier trained on the reference.

Fréchet distance and precision/recall need a feature space where distance means perceptual difference. The
standard one is Inception-v3's pool3 (``inception.py``); it needs a weights file that cannot be downloaded
here. The proxy is the penultimate layer of a small CNN that ``ddpm eval`` trains on the reference images
themselves (the idea behind the LeNet/MNIST "FID" of several GAN papers): cheap, deterministic for a seed, and
meaningful within one dataset, but its values are not comparable with published FID. Its label head also
gives classifier confidence and class coverage. Unlabelled folders train it on rotation prediction
(Gidaris et al. 2018, the four multiples of 90 degrees), which still needs the image content to solve.

All extractors take uint8 images [N, H, W, C] and return float64 features [N, D].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddpm.errors import ArtifactError
from ddpm.trainer.data import load_labels

from .inception import FEATURE_DIM, FIDInceptionV3, inception_pool3

__all__ = ["ClassifierFeatures", "InceptionFeatures", "reference_labels", "train_classifier"]

_WIDTH = 128  # feature dimension of the proxy
_BATCH = 128


class SmallCNN(nn.Module):
    """3 conv layers (the last two stride 2) -> 2x2 adaptive average pool -> 128-d features -> logits.

    The 2x2 pool keeps coarse layout (where the strokes are) for any input size from 8x8 up.
    """

    def __init__(self, in_channels: int, n_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(128 * 4, _WIDTH)
        self.head = nn.Linear(_WIDTH, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] in [-1, 1] -> [N, 128]."""
        x = F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x))))))
        return F.relu(self.fc1(torch.flatten(F.adaptive_avg_pool2d(x, 2), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _to_model_space(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float32 [N, C, H, W] in [-1, 1] (the training scale of the diffusion model)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return x.to(torch.float32) / 127.5 - 1.0


def _rotations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image at 0, 90, 180, 270 degrees, labelled 0..3 (the rotation pretext task)."""
    xs = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
    return xs, torch.arange(4).repeat_interleave(len(x))


@dataclass
class ClassifierFeatures:
    """The proxy feature space: a trained SmallCNN and what it was trained to predict.

    Attributes:
        net: the classifier (eval mode, CPU).
        labelled: True when trained on class labels; False for the rotation pretext (no class metrics).
        space: the feature-space name recorded in reports and cached reference statistics.
    """

    net: SmallCNN
    labelled: bool
    space: str

    @property
    def n_classes(self) -> int:
        return int(self.net.head.out_features)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = _to_model_space(images)
        return np.concatenate([self.net.features(c).double().numpy() for c in x.split(1024)])

    @torch.no_grad()
    def class_probs(self, features: np.ndarray) -> np.ndarray:
        """Softmax of the label head on features [N, 128] -> [N, n_classes]."""
        logits = self.net.head(torch.from_numpy(np.asarray(features, np.float32)))
        return torch.softmax(logits, dim=1).double().numpy()

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Weights and settings as plain arrays (cached statistics are read with allow_pickle=False)."""
        arrays = {f"clf.{k}": v.numpy() for k, v in self.net.state_dict().items()}
        arrays["clf_labelled"] = np.array(self.labelled)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], space: str, where: str) -> ClassifierFeatures:
        try:
            sd = {k[4:]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith("clf.")}
            net = SmallCNN(sd["conv1.weight"].shape[1], sd["head.weight"].shape[0])
            net.load_state_dict(sd)
            labelled = bool(arrays["clf_labelled"])
        except (KeyError, RuntimeError, IndexError) as e:
            raise ArtifactError(
                f"{where}: the stored proxy classifier is incomplete or damaged ({e})"
            ) from None
        return cls(net.eval(), labelled, space)


def train_classifier(
    images: np.ndarray, labels: np.ndarray | None, *, dataset: str, seed: int = 0, steps: int | None = None
) -> ClassifierFeatures:
    """Train the proxy on uint8 images [N, H, W, C] with class ``labels`` [N] (None: rotation pretext).

    Adam, batch 128, ``steps`` (default about 8 epochs, at least 200, at most 2000 steps): 2-3 s on the 8x8
    digits (whose training loss is below 0.01 by step 200), a few minutes on MNIST, on one CPU thread. Deterministic for a seed: the weights and batch order come from a
    generator seeded here, and the global RNG is left as it was.
    """
    x = _to_model_space(images)
    if labels is None:
        x, y = _rotations(x)
        n_classes, kind = 4, "rotation"
    else:
        y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        n_classes, kind = int(y.max()) + 1, "labels"
    if steps is None:
        steps = min(2000, max(200, math.ceil(8 * len(x) / _BATCH)))
    threads = torch.get_num_threads()
    # One thread: a net this small gains little from intra-op threads, and where the cores are shared each
    # step's OpenMP barriers wait on descheduled threads (100 digits steps: 61 s on 2 busy cores, 4-8 s on 1).
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = SmallCNN(x.shape[1], n_classes)
            g = torch.Generator().manual_seed(seed)
            opt = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-4)
            for _ in range(steps):
                idx = torch.randint(len(x), (_BATCH,), generator=g)
                loss = F.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    space = f"classifier({kind}) on {dataset}, seed {seed}"
    return ClassifierFeatures(net.eval(), labels is not None, space)


@dataclass
class InceptionFeatures:
    """FID's pool3 space; ``fingerprint`` identifies the weights file."""

    net: FIDInceptionV3
    fingerprint: str
    device: str = "cpu"

    @property
    def space(self) -> str:
        return f"inception-v3 pool3 ({FEATURE_DIM}-d), weights sha256 {self.fingerprint}"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return inception_pool3(self.net, images, device=self.device)


def reference_labels(spec: str, count: int) -> np.ndarray | None:
    """Class labels [count] of a labelled dataset, in ``load_dataset``'s order; None for unlabelled ones
    (ddpm.trainer.data.load_labels)."""
    labels = load_labels(spec)
    if labels is not None and len(labels) != count:
        raise ArtifactError(f"{spec}: {len(labels)} labels for {count} images")
    return labels
