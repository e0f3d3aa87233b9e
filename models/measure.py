"""Measure the figures a model card states: clean accuracy and PGD robust accuracy at its threat model."""

from __future__ import annotations

from dataclasses import replace

import torch
from invarbench.attacks import create_attack
from invarbench.datasets import Dataset, load_dataset
from invarbench.evaluation import clean_accuracy
from invarbench.models.registry import ModelCard, load_model


def measure_card(card: ModelCard, *, model: torch.nn.Module | None = None, restarts: int = 5, seed: int = 0, dataset: Dataset | None = None, robust: bool = True) -> ModelCard:
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
    return replace(card, clean_accuracy=round(clean, 6), robust_accuracy=tuple(entries) if entries else card.robust_accuracy)
