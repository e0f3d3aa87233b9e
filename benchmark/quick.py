"""The quick benchmark behind ``make bench``: clean and PGD robust accuracy of the zoo on a subset."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from invarbench.attacks import ThreatModel, create_attack
from invarbench.config import HEADLINE_THREATS
from invarbench.datasets import Dataset, load_dataset
from invarbench.evaluation import clean_accuracy
from invarbench.models import get_card, list_models, load_model


@dataclass(frozen=True)
class QuickRow:
    model: str
    dataset: str
    n: int
    clean_accuracy: float
    threat: str
    robust_accuracy: float


def threats_for(card) -> list[tuple[str, float]]:
    """The data set's headline threat models, and the one the model was trained against."""
    threats = [
        (threat.norm, eps)
        for threat in map(ThreatModel.parse, HEADLINE_THREATS.get(card.dataset, ()))
        for eps in threat.epsilons
    ]
    own = (card.threat_model["norm"], float(card.threat_model["eps"]))
    if own[0] != "none" and own not in threats:
        threats.append(own)
    return threats


def quick_benchmark(
    *, models: list[str] | None = None, n: int = 100, seed: int = 0, progress: bool = True
) -> list[QuickRow]:
    datasets: dict[tuple, Dataset] = {}
    rows = []
    for name in models or list_models():
        card = get_card(name)
        key = (card.dataset, tuple(sorted(card.dataset_options.items())))
        if key not in datasets:
            datasets[key] = load_dataset(card.dataset, **card.dataset_options)
        images, labels = datasets[key].evaluation_subset(n)
        model = load_model(name)
        clean = clean_accuracy(model, images, labels)
        for norm, eps in threats_for(card):
            result = create_attack("pgd")(model, images, labels, norm=norm, epsilons=(eps,), seed=seed)
            rows.append(QuickRow(name, card.dataset, n, clean, f"PGD {norm} {eps:g}", result.robust_accuracy()[0]))
            if progress:
                print(
                    f"  {name}: clean {100 * clean:.1f}%, PGD {norm} {eps:g} robust"
                    f" {100 * rows[-1].robust_accuracy:.1f}%",
                    file=sys.stderr,
                )
    return rows
