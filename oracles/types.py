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
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tomli_w
import torch

from invarbench.datasets import SPHERE_INNER_RADIUS, SPHERE_OUTER_RADIUS, spheres_label
from invarbench.errors import ConfigError, DataError, did_you_mean
from invarbench.io import atomic_write_text, read_toml
from invarbench.models import get_card, load_model, registry
from invarbench.neighbours import nearest

ABSTAIN = -1


class Oracle(ABC):
    name: str
    #: True for a data set's own labelling function or people's own labels, which need no calibration.
    exact: bool = False
    #: Calibration against people's labels (``Calibration.to_dict()`` per labelled set), where measured.
    calibration: tuple[dict, ...] = ()

    @abstractmethod
    def label(self, images: torch.Tensor) -> torch.Tensor:
        """One label per image (int64), ``ABSTAIN`` where the oracle does not decide."""

    def decide(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Labels and, for a vote, how many votes would have to change to change each outcome (1: one
        vote from its threshold); None for an oracle that does not vote."""
        return self.label(images), None

    def describe(self) -> dict:
        return {"name": self.name, "exact": self.exact, "calibration": list(self.calibration)}

    def to(self, device: torch.device | str) -> Oracle:
        """This oracle with its networks on ``device`` (it still takes and returns CPU tensors); an oracle
        without networks stays as it is."""
        return self


class ExactOracle(Oracle):
    """A data set's own labelling function, e.g. :func:`invarbench.datasets.spheres_label`.

    ``margin(images, labels)``, if given, is differentiable and positive exactly where the true label
    differs from ``labels``: invariance searches can then climb it (the exact search on synthetic data).
    """

    exact = True

    def __init__(
        self,
        name: str,
        labelling: Callable[[torch.Tensor], torch.Tensor],
        margin: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ):
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


def image_key(image: torch.Tensor) -> bytes:
    # Images are compared at 8-bit precision, the precision of the published files.
    return hashlib.sha1(
        np.round(image.detach().cpu().numpy().astype(np.float64) * 255).astype(np.int16).tobytes()
    ).digest()


class LabelFileOracle(Oracle):
    """Labels for exactly the images of one or more invariance sets; abstains on any other image."""

    exact = True

    def __init__(self, sets: Sequence[InvarianceSet]):
        self.name = "label-file:" + "+".join(item.name for item in sets)
        self.labels: dict[bytes, int] = {}
        for item in sets:
            for image, label in zip(item.images, item.labels.tolist()):
                self.labels[image_key(image)] = int(label)

    def label(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.labels.get(image_key(image), ABSTAIN) for image in images], dtype=torch.long)


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
        raise DataError(
            f"invariance set directory {root} does not exist; pass a folder holding NAME.npy and NAME_labels.npy files"
        )
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
            raise DataError(
                f"{labels_path} holds {labels.dtype} of shape {labels.shape}; expected {len(images)} integer labels,"
                f" one per image of {images_path.name}"
            )
        if len(labels) and (labels.min() < 0 or labels.max() > 9):
            raise DataError(
                f"{labels_path} holds labels from {labels.min()} to {labels.max()}; people's labels are digits 0-9"
                " (leave out images nobody read as a digit)"
            )
        if images.min() < 0 or images.max() > 255:
            raise DataError(f"{images_path} has pixel values outside 0..255; store uint8 or floats in 0..255")
        scale = 255.0 if (images.dtype == np.uint8 or images.max() > 1.0) else 1.0
        indices = _load_indices(root, images_path, name, len(images))
        relative = images_path.relative_to(root).with_suffix("").as_posix()
        sets.append(
            InvarianceSet(
                relative,
                torch.from_numpy(images.astype(np.float32) / scale).unsqueeze(1),
                torch.from_numpy(labels.astype(np.int64)),
                indices,
            )
        )
    if not sets:
        raise DataError(
            f"no invariance set found in {root}: expected NAME.npy beside NAME_labels.npy (and an index file such as"
            " indexs.npy)"
        )
    return sets


def _load_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"{path} is not a NumPy .npy array ({error}); re-save it with numpy.save") from error


def _load_indices(root: Path, images_path: Path, name: str, count: int) -> torch.Tensor:
    prefix = name.split("_")[0]
    candidates = [
        f"{name}_indexs.npy",
        f"{name}_indices.npy",
        f"{prefix}_indexs.npy",
        f"{prefix}_indices.npy",
        *INDEX_FILE_NAMES,
    ]
    folder = images_path.parent
    while True:
        for candidate in candidates:
            path = folder / candidate
            if path.exists():
                indices = _load_array(path).astype(np.int64).reshape(-1)
                if len(indices) < count:
                    raise DataError(
                        f"index file {path} lists {len(indices)} test points but {images_path} holds {count} images;"
                        " one index per image is needed"
                    )
                return torch.from_numpy(indices[:count])
        if folder == root or root not in folder.parents:
            break
        folder = folder.parent
    raise DataError(
        f"no index file for {images_path}: add {name}_indexs.npy or indexs.npy (the test-set index of each image)"
        f" beside it or in {root}"
    )


@dataclass(frozen=True)
class View:
    """How an oracle member looks at an image, as a person would.

    ``stretch`` t: contrast stretched so that brightness t and above is full ink (``min(1, x / t)``):
    people read a grey stroke on black as a stroke, where a classifier trained on MNIST's near-white
    strokes discounts it. ``closing`` k: a k x k grey closing (dilation then erosion) bridges gaps
    narrower than the window, as people read a stroke with a small break as one stroke. The default
    view is the image as it is.
    """

    stretch: float = 1.0
    closing: int = 0

    def __post_init__(self):
        if not 0 < self.stretch <= 1:
            raise ConfigError(f"oracle view stretch={self.stretch} must be a brightness in (0, 1]")
        if self.closing < 0 or (self.closing and self.closing % 2 == 0):
            raise ConfigError(f"oracle view closing={self.closing} must be 0 (none) or an odd window size such as 3")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        seen = images if self.stretch == 1.0 else (images / self.stretch).clamp(max=1.0)
        if self.closing:
            pad = self.closing // 2
            dilated = torch.nn.functional.max_pool2d(seen, self.closing, stride=1, padding=pad)
            seen = -torch.nn.functional.max_pool2d(-dilated, self.closing, stride=1, padding=pad)
        return seen

    def to_dict(self) -> dict:
        return {"stretch": self.stretch, "closing": self.closing}


class ProxyOracle(Oracle):
    """A vote of independently trained classifiers; abstains when they disagree.

    ``members`` are callables mapping images to logits; each reads every :class:`View` of an image
    (by default the image as it is). ``knn`` adds a k-nearest-neighbour classifier
    on the training pixels as one more voter. A label is returned only when at least ``agreement``
    (a fraction) of the voters give the majority label.
    """

    def __init__(
        self,
        name: str,
        members: Sequence[torch.nn.Module],
        *,
        views: Sequence[View] = (View(),),
        train_images: torch.Tensor | None = None,
        train_labels: torch.Tensor | None = None,
        k: int = 3,
        agreement: float = 0.8,
        num_classes: int = 10,
        batch_size: int = 1000,
    ):
        if not 0 < agreement <= 1:
            raise ConfigError(f"proxy oracle agreement {agreement} must be in (0, 1]")
        if not views:
            raise ConfigError("a proxy oracle needs at least one view")
        self.name = name
        self.members = list(members)
        self.views = tuple(views)
        self.train_images = None if train_images is None else train_images.flatten(1)
        self.train_labels = train_labels
        self.k = k
        self.agreement = agreement
        self.num_classes = num_classes
        self.batch_size = batch_size
        #: Member card name -> checkpoint sha256, for an oracle built from a definition file.
        self.member_checkpoints: dict[str, str] = {}
        self.device = torch.device("cpu")

    def to(self, device: torch.device | str) -> ProxyOracle:
        """The members' passes on ``device`` (a GPU judges many candidates faster); images in and labels out
        stay on the CPU, and so does the k-NN vote."""
        device = torch.device(device)
        if device.type != "cpu" and not all(isinstance(member, torch.nn.Module) for member in self.members):
            raise ConfigError(
                f"oracle {self.name}: only torch.nn.Module members can move to {device}; give modules or judge on"
                " the CPU"
            )
        self.device = device
        self.members = [member.to(device) if isinstance(member, torch.nn.Module) else member for member in self.members]
        return self

    @property
    def voters(self) -> int:
        return len(self.members) * len(self.views) + (self.train_images is not None)

    def _member_outputs(self, images: torch.Tensor):
        """Each member's logits on each view, batch by batch: (member x view) tensors of (N, classes)."""
        for member in self.members:
            for view in self.views:
                seen = view(images)
                yield torch.cat(
                    [
                        member(seen[start : start + self.batch_size].to(self.device)).cpu()
                        for start in range(0, len(images), self.batch_size)
                    ]
                )

    def votes(self, images: torch.Tensor) -> torch.Tensor:
        """(images, voters) labels, one column per member and view (the k-NN vote last)."""
        with torch.no_grad():
            columns = [logits.argmax(1) for logits in self._member_outputs(images)]
            if self.train_images is not None:
                assert self.train_labels is not None, "a k-NN vote needs the training labels"
                _, neighbours = nearest(images.flatten(1), self.train_images, k=self.k)
                neighbour_labels = self.train_labels[neighbours]
                counts = torch.nn.functional.one_hot(neighbour_labels, self.num_classes).sum(1)
                # Ties go to the nearer neighbour's label.
                counts = counts * 2 + torch.nn.functional.one_hot(neighbour_labels[:, 0], self.num_classes)
                columns.append(counts.argmax(1))
        return torch.stack(columns, dim=1)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Mean softmax of the members over their views: how convincingly the ensemble reads each class."""
        total = torch.zeros(len(images), self.num_classes)
        with torch.no_grad():
            for logits in self._member_outputs(images):
                total += logits.softmax(1).cpu()
        return total / max(1, len(self.members) * len(self.views))

    @property
    def required(self) -> int:
        """Votes the majority label needs."""
        return math.ceil(self.agreement * self.voters - 1e-9)

    def decide(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = torch.nn.functional.one_hot(self.votes(images), self.num_classes).sum(1)
        best, majority = counts.max(1)
        decided = best >= self.required
        # A decided label is lost when its count falls below the threshold; an abstention becomes a label
        # when the leading count reaches it.
        margins = torch.where(decided, best - self.required + 1, self.required - best)
        return torch.where(decided, majority, torch.full_like(majority, ABSTAIN)), margins

    def label(self, images: torch.Tensor) -> torch.Tensor:
        return self.decide(images)[0]

    def describe(self) -> dict:
        members = {"members": dict(self.member_checkpoints)} if self.member_checkpoints else {}
        return {
            **super().describe(),
            "voters": self.voters,
            "views": [view.to_dict() for view in self.views],
            "agreement": self.agreement,
            "k": self.k if self.train_images is not None else 0,
            **members,
        }


def spheres_margin(points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How far past the midpoint between the spheres a point lies, towards the other class than ``labels``."""
    outward = points.flatten(1).norm(dim=1) - (SPHERE_INNER_RADIUS + SPHERE_OUTER_RADIUS) / 2
    return torch.where(labels == 0, outward, -outward)


@dataclass(frozen=True)
class OracleDefinition:
    """A named proxy oracle, read from ``models/oracles/FILE.toml``: its member models (registered
    cards with role "oracle"), views, k-NN voter, agreement, notes, and its calibration against people's
    labels as measured by ``invarbench oracle evaluate NAME --labels DIR --update``."""

    name: str
    dataset: str
    members: tuple[str, ...]
    views: tuple[View, ...]
    knn: int
    agreement: float
    notes: str
    calibration: tuple[dict, ...] = ()
    path: Path | None = None

    @classmethod
    def from_toml(cls, path: Path) -> OracleDefinition:
        data = read_toml(path, "oracle file", ConfigError)
        missing = [key for key in ("name", "dataset", "members", "agreement", "notes") if key not in data]
        if missing:
            raise ConfigError(
                f"oracle file {path} lacks {', '.join(missing)}; add them (see models/oracles/mnist-readers.toml)"
            )
        return cls(
            name=str(data["name"]),
            dataset=str(data["dataset"]),
            members=tuple(str(member) for member in data["members"]),
            views=tuple(_view(view, path) for view in data.get("views", [{}])),
            knn=int(data.get("knn", 0)),
            agreement=float(data["agreement"]),
            notes=str(data["notes"]),
            calibration=tuple(dict(item) for item in data.get("calibration", ())),
            path=path,
        )

    def to_toml(self) -> str:
        data = {
            "name": self.name,
            "dataset": self.dataset,
            "notes": self.notes,
            "members": list(self.members),
            "views": [view.to_dict() for view in self.views],
            "knn": self.knn,
            "agreement": self.agreement,
        }
        if self.calibration:
            data["calibration"] = [dict(item) for item in self.calibration]
        return tomli_w.dumps(data, multiline_strings=True)

    def save(self) -> Path:
        if self.path is None:
            raise ConfigError(f"oracle {self.name} has no file to save to")
        return atomic_write_text(self.path, self.to_toml())

    def build(self, dataset) -> ProxyOracle:
        if dataset.name != self.dataset:
            raise ConfigError(
                f"oracle {self.name} judges {self.dataset} images, not {dataset.name}; pick an oracle of that data set"
                " (invarbench oracle list)"
            )
        members = [load_model(member).eval() for member in self.members]
        knn = (
            {"train_images": dataset.train_images, "train_labels": dataset.train_labels, "k": self.knn}
            if self.knn
            else {}
        )
        oracle = ProxyOracle(
            self.name, members, views=self.views, agreement=self.agreement, num_classes=dataset.num_classes, **knn
        )
        oracle.calibration = self.calibration
        oracle.member_checkpoints = self.member_checkpoints()
        return oracle

    def member_checkpoints(self) -> dict[str, str]:
        """Each member's checkpoint sha256, by card name: what a regression check compares."""
        return {member: get_card(member).checkpoint_sha256 for member in self.members}


def _view(data: dict, path: Path) -> View:
    unknown = sorted(set(data) - {"stretch", "closing"})
    if not isinstance(data, dict) or unknown:
        raise ConfigError(
            f"oracle file {path}: a view is a table of stretch and closing, e.g. {{stretch = 0.5, closing = 3}}; got"
            f" {data!r}"
        )
    return View(stretch=float(data.get("stretch", 1.0)), closing=int(data.get("closing", 0)))


def oracles_dir() -> Path:
    # Read when called: tests (and users) point registry.CARDS_DIR elsewhere after import.
    return registry.CARDS_DIR.parent / "oracles"


def list_oracles() -> dict[str, OracleDefinition]:
    """Every named oracle, by name (``proxy:mnist-readers``, ...)."""
    definitions = (OracleDefinition.from_toml(path) for path in sorted(oracles_dir().glob("*.toml")))
    return {definition.name: definition for definition in definitions}


def get_oracle_definition(name: str) -> OracleDefinition:
    known = list_oracles()
    if name not in known:
        raise ConfigError(
            f"unknown oracle {name!r}; named oracles: {', '.join(sorted(known))} (or people:DB for a labels database,"
            f" exact:spheres).{did_you_mean(name, known)}"
        )
    return known[name]


def oracle_members(name: str) -> dict[str, str]:
    """The members of a named proxy oracle by card name, with their checkpoints' sha256; none for others."""
    definition = list_oracles().get(name)
    return definition.member_checkpoints() if definition else {}


#: The oracle each data set's invariance figures are judged by unless another is asked for.
DEFAULT_ORACLES = {"mnist": "proxy:mnist-readers"}


def load_oracle(name: str, dataset) -> Oracle:
    """A named oracle for a data set: ``exact:spheres`` or a proxy oracle of ``models/oracles``."""
    if name == "exact:spheres":
        if dataset.name != "spheres":
            raise ConfigError(f"oracle exact:spheres judges spheres points, not {dataset.name}")
        return ExactOracle("exact:spheres", spheres_label, spheres_margin)
    return get_oracle_definition(name).build(dataset)


def default_oracle(dataset) -> Oracle:
    """The oracle a data set is judged by: its exact labelling function, else its default proxy oracle."""
    if dataset.name == "spheres":
        return load_oracle("exact:spheres", dataset)
    if dataset.name in DEFAULT_ORACLES:
        return load_oracle(DEFAULT_ORACLES[dataset.name], dataset)
    raise ConfigError(
        f"data set {dataset.name!r} has no oracle for invariance attacks; use mnist or spheres, or pass"
        " --invariance-set DIR with labelled images"
    )
