"""The guide: the models an invariance search chooses its candidates by, never the oracle that judges them.

A search that keeps the candidate its judge scores highest optimises against that judge: the candidates
it keeps are the ones the judge reads as changed, whether or not people would (Tramèr et al. chose with
one model and let people judge). So a search that chooses is given a guide, one model or an ensemble
of them, and a guide that is the judging oracle or one of its members is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from invarbench.errors import ConfigError, ModelError
from invarbench.models import load_model
from invarbench.models.registry import checkpoint_sha256, declared_dataset

#: The l_0 search's guide unless another is asked for: the zoo's plain CNN, no member of any oracle.
DEFAULT_GUIDE = "mnist-cnn-standard"


def guide_references(guide: str | Sequence[str]) -> tuple[str, ...]:
    """The models a ``guide`` option names: one model reference, or several joined by '+' (an ensemble)."""
    references = (
        tuple(str(item) for item in guide) if isinstance(guide, (list, tuple)) else tuple(str(guide).split("+"))
    )
    if not all(references):
        raise ConfigError(
            f"guide={guide!r} names no model; pass a registered model, a checkpoint file, or several joined by '+',"
            f" e.g. guide={DEFAULT_GUIDE}"
        )
    return references


class Guide:
    """One model or an ensemble: how convincingly the guide reads each class (its members' mean softmax)."""

    def __init__(self, guide: str, references: tuple[str, ...], models: Sequence[torch.nn.Module]):
        self.guide = guide
        self.references = references
        self.models = list(models)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([model(images).softmax(1) for model in self.models]).mean(0)

    def check_fits(self, attack: str, dataset: str, num_classes: int) -> None:
        """Refuse a guide that reads another data set than the one searched."""
        for reference, model in zip(self.references, self.models):
            declared = declared_dataset(reference)
            if declared not in (None, dataset) or model.num_classes != num_classes:
                raise ConfigError(
                    f"{attack} guide={self.guide}: {reference} is a model of {declared or 'another data set'} with"
                    f" {model.num_classes} classes; the data set searched is {dataset} ({num_classes} classes): pass a"
                    f" guide trained on {dataset} (guide=MODEL)"
                )


def load_guide(attack: str, guide: str, *, judge: str, judge_members: dict[str, str]) -> Guide:
    """The guide of ``attack`` for a run judged by the oracle ``judge`` (its members by card name with their
    checkpoints' sha256), refused where it is that oracle or one of its members (by name or checkpoint)."""
    references = guide_references(guide)
    fix = (
        f"pass {attack}:guide=MODEL with a model that is neither the judge nor one of its members (`invarbench models"
        f" list`; the default is {DEFAULT_GUIDE})"
    )
    models = []
    for reference in references:
        if reference == judge:
            raise ConfigError(
                f"{attack} guide={guide}: {reference} is the oracle that judges this run; a search that chooses by its"
                f" judge keeps what the judge reads as changed; {fix}"
            )
        try:
            models.append(load_model(reference).eval())
        except ModelError as error:
            raise ConfigError(f"{attack} guide={guide}: {error}") from error
        member = next(
            (
                name
                for name, digest in judge_members.items()
                if reference == name or checkpoint_sha256(reference) == digest
            ),
            None,
        )
        if member is not None:
            raise ConfigError(
                f"{attack} guide={guide}: {reference} is {member}, a member of {judge}, the oracle that judges this"
                f" run; {fix}"
            )
    return Guide(guide, references, models)
