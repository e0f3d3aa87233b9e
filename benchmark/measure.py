"""Measure the figures a model card states: clean accuracy and PGD robust accuracy at its threat model."""

from __future__ import annotations

from dataclasses import replace

import torch

from invarbench.attacks import create_attack
from invarbench.datasets import Dataset, load_dataset
from invarbench.evaluation import clean_accuracy
from invarbench.models.registry import ModelCard, load_model


def measure_card(
    card: ModelCard,
    *,
    model: torch.nn.Module | None = None,
    restarts: int = 5,
    seed: int = 0,
    dataset: Dataset | None = None,
    robust: bool = True,
) -> ModelCard:
    """Return ``card`` with clean accuracy (and, for robust models, PGD robust accuracy) re-measured.

    Both are measured on the first ``card.clean_accuracy_n`` test points; PGD uses Foolbox's
    defaults (l_inf: 40 steps of eps/30; l_2: 50 steps of eps/40) with ``restarts`` random starts.
    """
    dataset = dataset or load_dataset(card.dataset, **card.dataset_options)
    images, labels = dataset.evaluation_subset(card.clean_accuracy_n)
    model = model if model is not None else load_model(card.name)
    clean = clean_accuracy(model, images, labels)
    entries = []
    norm = card.threat_model["norm"]
    if robust and norm != "none":
        eps = float(card.threat_model["eps"])
        result = create_attack("pgd", restarts=restarts)(model, images, labels, norm=norm, epsilons=(eps,), seed=seed)
        entries.append(
            {
                "attack": f"PGD-{result.options['steps']}",
                "norm": norm,
                "eps": eps,
                "restarts": restarts,
                "seed": seed,
                "n": len(labels),
                "value": round(result.robust_accuracy()[0], 6),
                "implementation": result.options["implementation"],
                "command": f"invarbench models evaluate {card.name} --update-card",
            }
        )
    return replace(
        card, clean_accuracy=round(clean, 6), robust_accuracy=tuple(entries) if entries else card.robust_accuracy
    )


def nuisance_classifier_error(
    model,
    dataset: Dataset,
    *,
    epochs: int = 5,
    hidden: int = 512,
    test_points: int = 10_000,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """How much label information an invertible model's nuisance z_n holds (Jacobsen et al.): an MLP
    trained after the fact to predict the label from z_n of the training images, evaluated on the
    test images' z_n. Low error = z_n still encodes the label (plain cross-entropy); high error = it
    was pushed out (iCE). The paper reports 0.34% (CE) and 27.7% (iCE) on MNIST."""
    if not getattr(model, "invertible", False):
        raise ValueError(
            f"model {getattr(model, 'name', '')!r} is not invertible; the nuisance classifier needs z = F(x)"
        )
    classes = model.num_classes
    train_z = encode_all(model, dataset.train_images)[:, classes:]
    test_z = encode_all(model, dataset.test_images[:test_points])[:, classes:]
    error = readout_error(
        train_z,
        test_z,
        dataset.train_labels,
        dataset.test_labels[:test_points],
        classes=classes,
        epochs=epochs,
        hidden=hidden,
        seed=seed,
        progress=progress,
    )
    return {
        "error": round(error, 6),
        "n_test": len(test_z),
        "n_train": len(train_z),
        "epochs": epochs,
        "hidden": hidden,
        "seed": seed,
    }


def encode_all(model, images: torch.Tensor, *, batch_size: int = 500) -> torch.Tensor:
    """z = F(x) of an invertible model for many images, in batches, without gradients."""
    with torch.no_grad():
        return torch.cat(
            [model.encode(images[start : start + batch_size])[0] for start in range(0, len(images), batch_size)]
        )


def readout_error(
    train_features: torch.Tensor,
    test_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    classes: int,
    epochs: int = 5,
    hidden: int = 512,
    seed: int = 0,
    progress: bool = False,
) -> float:
    """Test error of an MLP (two hidden layers) trained to read the label from ``train_features``: the
    after-the-fact classifier of :func:`nuisance_classifier_error`, usable on any transform of z_n."""
    from tqdm.auto import tqdm

    # Standardised with the training statistics: the scale of the features is arbitrary for the question asked.
    mean, std = train_features.mean(0), train_features.std(0).clamp_min(1e-6)
    train_features, test_features = (train_features - mean) / std, (test_features - mean) / std
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    classifier = torch.nn.Sequential(
        torch.nn.Linear(train_features.shape[1], hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, classes),
    )
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    for _ in tqdm(range(epochs), desc="nuisance classifier", disable=not progress):
        order = torch.randperm(len(train_labels), generator=generator)
        for start in range(0, len(train_labels), 128):
            index = order[start : start + 128]
            loss = torch.nn.functional.cross_entropy(classifier(train_features[index]), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        predictions = classifier(test_features).argmax(1)
    return float((predictions != test_labels).float().mean())
