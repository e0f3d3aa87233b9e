"""Oracles: who decides the true label of a changed input.

An invariance attack succeeds only if the true label changed, and the attacked model cannot be the
judge. Every oracle returns one label per input, or ``ABSTAIN`` (-1) when it will not decide; every
invariance figure names the oracle (``Oracle.name``) that judged it.

- ``ExactOracle``: the labelling function of a synthetic data set (the spheres).
- ``LabelFileOracle``: labels people gave to a fixed set of images (the format of Tramèr et al.'s
  public MNIST invariance sets); any other image is abstained on.
- ``ProxyOracle``: a vote of MNIST classifiers trained without any norm-bounded robustness objective
  (CNNs of different widths and seeds, an MLP, k-nearest neighbours on pixels); abstains when fewer
  than ``agreement`` of them give the majority label.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from invarbench.attacks.neighbours import nearest
from invarbench.errors import ConfigError, DataError

ABSTAIN = -1


class Oracle(ABC):
    name: str

    @abstractmethod
    def label(self, images: torch.Tensor) -> torch.Tensor:
        """One label per image (int64), ``ABSTAIN`` where the oracle does not decide."""

    def describe(self) -> dict:
        return {"name": self.name}


class ExactOracle(Oracle):
    """A data set's own labelling function, e.g. :func:`invarbench.datasets.spheres_label`.

    ``margin(images, labels)``, if given, is differentiable and positive exactly where the true label
    differs from ``labels``: invariance searches can then climb it (the exact search on synthetic data).
    """

    def __init__(self, name: str, labelling: Callable[[torch.Tensor], torch.Tensor], margin: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        self.name = name
        self.labelling = labelling
        self.margin = margin

    def label(self, images: torch.Tensor) -> torch.Tensor:
        return self.labelling(images).long()


@dataclass(frozen=True)
class InvarianceSet:
    """A fixed set of changed images with people's labels and the test points they came from."""

    name: str
    images: torch.Tensor  # (N, 1, 28, 28) in [0, 1]
    labels: torch.Tensor
    original_indices: torch.Tensor


def _image_key(image: torch.Tensor) -> bytes:
    # Images are compared at 8-bit precision, the precision of the published files.
    return hashlib.sha1(np.round(image.detach().cpu().numpy().astype(np.float64) * 255).astype(np.int16).tobytes()).digest()


class LabelFileOracle(Oracle):
    """Labels for exactly the images of one or more invariance sets; abstains on any other image."""

    def __init__(self, sets: Sequence[InvarianceSet]):
        self.name = "label-file:" + "+".join(item.name for item in sets)
        self.labels: dict[bytes, int] = {}
        for item in sets:
            for image, label in zip(item.images, item.labels.tolist()):
                self.labels[_image_key(image)] = int(label)

    def label(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.labels.get(_image_key(image), ABSTAIN) for image in images], dtype=torch.long)


INDEX_FILE_NAMES = ("indexs.npy", "indices.npy", "indexes.npy")


def load_invariance_sets(directory: str | Path) -> list[InvarianceSet]:
    """Every ``NAME.npy`` + ``NAME_labels.npy`` pair under ``directory`` (searched recursively).

    Images are N x 28 x 28 (uint8 0..255 or float 0..255, or float 0..1); labels N integers. The test
    indices come from ``NAME_indexs.npy``, ``PREFIX_indexs.npy`` (PREFIX = NAME up to its first '_',
    e.g. ``manual_indexs.npy`` for ``manual_eps04.npy``) or ``indexs.npy`` in the same folder or a
    parent folder up to ``directory`` (Tramèr et al.'s layout).
    """
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"invariance set directory {root} does not exist; pass a folder holding NAME.npy and NAME_labels.npy files")
    sets = []
    for labels_path in sorted(root.rglob("*_labels.npy")):
        name = labels_path.name[: -len("_labels.npy")]
        images_path = labels_path.with_name(f"{name}.npy")
        if not images_path.exists():
            raise DataError(f"{labels_path} has no image file beside it; add {images_path} (N x 28 x 28 images)")
        images = _load_array(images_path)
        labels = _load_array(labels_path)
        if images.ndim == 4 and images.shape[-1] == 1:
            images = images[..., 0]
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataError(f"{images_path} holds an array of shape {images.shape}; expected N x 28 x 28 images")
        if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{labels_path} holds {labels.dtype} of shape {labels.shape}; expected {len(images)} integer labels, one per image of {images_path.name}")
        if images.min() < 0 or images.max() > 255:
            raise DataError(f"{images_path} has pixel values outside 0..255; store uint8 or floats in 0..255")
        scale = 255.0 if (images.dtype == np.uint8 or images.max() > 1.0) else 1.0
        indices = _load_indices(root, images_path, name, len(images))
        relative = images_path.relative_to(root).with_suffix("").as_posix()
        sets.append(InvarianceSet(relative, torch.from_numpy(images.astype(np.float32) / scale).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)), indices))
    if not sets:
        raise DataError(f"no invariance set found in {root}: expected NAME.npy beside NAME_labels.npy (and an index file such as indexs.npy)")
    return sets


def _load_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"{path} is not a NumPy .npy array ({error}); re-save it with numpy.save") from error


def _load_indices(root: Path, images_path: Path, name: str, count: int) -> torch.Tensor:
    prefix = name.split("_")[0]
    candidates = [f"{name}_indexs.npy", f"{name}_indices.npy", f"{prefix}_indexs.npy", f"{prefix}_indices.npy", *INDEX_FILE_NAMES]
    folder = images_path.parent
    while True:
        for candidate in candidates:
            path = folder / candidate
            if path.exists():
                indices = _load_array(path).astype(np.int64).reshape(-1)
                if len(indices) < count:
                    raise DataError(f"index file {path} lists {len(indices)} test points but {images_path} holds {count} images; one index per image is needed")
                return torch.from_numpy(indices[:count])
        if folder == root or root not in folder.parents:
            break
        folder = folder.parent
    raise DataError(f"no index file for {images_path}: add {name}_indexs.npy or indexs.npy (the test-set index of each image) beside it or in {root}")


class ProxyOracle(Oracle):
    """A vote of independently trained classifiers; abstains when they disagree.

    ``members`` are callables mapping images to logits (models of the proxy ensemble); ``knn`` adds a
    k-nearest-neighbour classifier on the training pixels as one more voter. A label is returned only
    when at least ``agreement`` (a fraction) of the voters give the majority label.
    """

    def __init__(self, name: str, members: Sequence[torch.nn.Module], *, train_images: torch.Tensor | None = None, train_labels: torch.Tensor | None = None, k: int = 3, agreement: float = 0.8, num_classes: int = 10, batch_size: int = 1000):
        if not 0 < agreement <= 1:
            raise ConfigError(f"proxy oracle agreement {agreement} must be in (0, 1]")
        self.name = name
        self.members = list(members)
        self.train_images = None if train_images is None else train_images.flatten(1)
        self.train_labels = train_labels
        self.k = k
        self.agreement = agreement
        self.num_classes = num_classes
        self.batch_size = batch_size

    @property
    def voters(self) -> int:
        return len(self.members) + (self.train_images is not None)

    def votes(self, images: torch.Tensor) -> torch.Tensor:
        """(images, voters) labels, one column per member (the k-NN vote last)."""
        columns = []
        with torch.no_grad():
            for member in self.members:
                columns.append(torch.cat([member(images[start : start + self.batch_size]).argmax(1) for start in range(0, len(images), self.batch_size)]))
            if self.train_images is not None:
                _, neighbours = nearest(images.flatten(1), self.train_images, k=self.k)
                neighbour_labels = self.train_labels[neighbours]
                counts = torch.nn.functional.one_hot(neighbour_labels, self.num_classes).sum(1)
                # Ties go to the nearer neighbour's label.
                counts = counts * 2 + torch.nn.functional.one_hot(neighbour_labels[:, 0], self.num_classes)
                columns.append(counts.argmax(1))
        return torch.stack(columns, dim=1)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Mean softmax of the model members: how convincingly the ensemble reads each class."""
        with torch.no_grad():
            total = torch.zeros(len(images), self.num_classes)
            for member in self.members:
                total += torch.cat([member(images[start : start + self.batch_size]).softmax(1) for start in range(0, len(images), self.batch_size)])
        return total / max(1, len(self.members))

    def label(self, images: torch.Tensor) -> torch.Tensor:
        votes = self.votes(images)
        counts = torch.nn.functional.one_hot(votes, self.num_classes).sum(1)
        best, majority = counts.max(1)
        decided = best >= self.agreement * self.voters - 1e-9
        return torch.where(decided, majority, torch.full_like(majority, ABSTAIN))

    def describe(self) -> dict:
        return {"name": self.name, "voters": self.voters, "agreement": self.agreement, "k": self.k}


def spheres_margin(points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How far past the midpoint between the spheres a point lies, towards the other class than ``labels``."""
    from invarbench.datasets import SPHERE_INNER_RADIUS, SPHERE_OUTER_RADIUS

    outward = points.flatten(1).norm(dim=1) - (SPHERE_INNER_RADIUS + SPHERE_OUTER_RADIUS) / 2
    return torch.where(labels == 0, outward, -outward)


PROXY_MEMBERS = {"mnist": ("oracle-mnist-cnn-narrow", "oracle-mnist-cnn-wide", "oracle-mnist-cnn-seed3", "oracle-mnist-mlp")}


def default_oracle(dataset) -> Oracle:
    """The oracle a data set is judged by: its exact labelling function, else the proxy ensemble."""
    from invarbench.datasets import spheres_label
    from invarbench.models import load_model

    if dataset.name == "spheres":
        return ExactOracle("exact:spheres", spheres_label, spheres_margin)
    if dataset.name in PROXY_MEMBERS:
        members = [load_model(name).eval() for name in PROXY_MEMBERS[dataset.name]]
        return ProxyOracle(f"proxy:{dataset.name}-ensemble", members, train_images=dataset.train_images, train_labels=dataset.train_labels, num_classes=dataset.num_classes)
    raise ConfigError(f"data set {dataset.name!r} has no oracle for invariance attacks; use mnist or spheres, or pass --invariance-set DIR with labelled images")
