"""The attack protocol shared by every attack, threat-model specifications and the attack registry."""

from __future__ import annotations

import dataclasses
import inspect
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from invarbench.errors import ConfigError, did_you_mean
from invarbench.evaluation import label_margins, logits

NORMS = ("linf", "l2")


@dataclass(frozen=True)
class ThreatModel:
    """A norm and the eps values to evaluate, e.g. ``linf:0.1,0.2,0.3``."""

    norm: str
    epsilons: tuple[float, ...]

    @classmethod
    def parse(cls, spec: str) -> ThreatModel:
        norm, separator, values = spec.partition(":")
        norm = norm.strip().lower()
        if not separator or not values.strip():
            raise ConfigError(f"threat specification {spec!r} has no eps values; write NORM:EPS[,EPS...], e.g. linf:0.1,0.3 or l2:2.0")
        if norm not in NORMS:
            raise ConfigError(f"threat specification {spec!r}: unknown norm {norm!r}; use one of {', '.join(NORMS)} (e.g. linf:0.3)")
        try:
            epsilons = tuple(float(value) for value in values.split(","))
        except ValueError as error:
            raise ConfigError(f"threat specification {spec!r}: eps values must be numbers separated by commas, e.g. {norm}:0.1,0.3") from error
        if any(not eps > 0 for eps in epsilons):
            raise ConfigError(f"threat specification {spec!r}: every eps must be positive")
        if len(set(epsilons)) != len(epsilons):
            raise ConfigError(f"threat specification {spec!r} repeats an eps value; list each once")
        return cls(norm, tuple(sorted(epsilons)))

    def check_against_bounds(self, bounds: tuple[float, float], input_size: int, *, source: str = "model") -> None:
        """Refuse eps values so large that the ball covers the whole input domain (the attack is then trivial)."""
        width = bounds[1] - bounds[0]
        limit = width if self.norm == "linf" else width * input_size**0.5
        for eps in self.epsilons:
            if eps >= limit:
                raise ConfigError(f"eps {eps:g} for {self.norm} is out of range for inputs in {list(bounds)} of {source}: the ball would contain every input; use eps < {limit:g}")

    def __str__(self) -> str:
        # Short where that is exact (0.3, 2); every digit where it is not (8/255), so parsing the text gives the same eps back.
        return f"{self.norm}:{','.join(f'{eps:g}' if float(f'{eps:g}') == eps else repr(eps) for eps in self.epsilons)}"


@dataclass(frozen=True)
class PerturbationResult:
    """Per-sample outcome of a perturbation attack at each eps.

    ``success[e, i]`` is True when point i is misclassified within eps ``epsilons[e]`` (points already
    misclassified without perturbation count as successes). ``norms[e, i]`` is the size of the
    returned perturbation in the attack's norm and ``adversarial_predictions[e, i]`` the model's
    label for it. ``adversarials[e, i]`` (attacks that return examples at fixed eps: FGSM, PGD) is
    the example itself, for galleries; None where an attack does not keep them. ``margins[e, i]`` is
    the model's logit of the label minus its largest other logit at the returned example (negative
    where the attack succeeded): how close the outcome was, which regression checks use to tell a
    borderline flip from a regression. Computed from ``adversarials`` when an attack gives none.
    ``warnings`` are the reliability warnings the attack's implementation raised (AutoAttack's checks).
    """

    attack: str
    norm: str
    epsilons: tuple[float, ...]
    success: torch.Tensor
    norms: torch.Tensor
    adversarial_predictions: torch.Tensor
    options: dict[str, Any] = field(default_factory=dict)
    adversarials: torch.Tensor | None = None
    margins: torch.Tensor | None = None
    warnings: tuple[str, ...] = ()

    def robust_accuracy(self) -> list[float]:
        return (~self.success).float().mean(dim=1).tolist()


def perturbation_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1)


def project(images: torch.Tensor, adversarial: torch.Tensor, *, norm: str, eps: float, bounds: tuple[float, float]) -> torch.Tensor:
    """Project ``adversarial`` onto the eps-ball around ``images`` and the input bounds.

    Used after a change of coordinates, whose float rounding can leave a perturbation a hair outside the ball.
    """
    delta = adversarial - images
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        size = delta.flatten(1).norm(dim=1).view(-1, *[1] * (delta.dim() - 1))
        delta = delta * torch.where(size > eps, eps / size, torch.ones_like(size))
    return (images + delta).clamp(*bounds)


@contextmanager
def frozen_parameters(model: torch.nn.Module):
    """Turn off gradients of the model's parameters while attacking.

    Foolbox (through eagerpy) and pyautoattack call ``loss.backward()``, which would otherwise also
    compute (and accumulate) a gradient for every weight: wasted time, since attacks need only the
    gradient with respect to the input.
    """
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in parameters:
            parameter.requires_grad_(True)


class Attack(ABC):
    """An attack: a registered name, typed keyword-only options, per-sample results.

    Subclasses declare their options as keyword-only ``__init__`` parameters with defaults;
    :meth:`options` reports them (recorded in every result) and :meth:`__call__` validates inputs.
    """

    name: ClassVar[str]
    kind: ClassVar[str] = "perturbation"
    norms: ClassVar[tuple[str, ...]] = NORMS
    #: True if the same inputs and seed always give the same outcome (regression checks compare exactly).
    deterministic: ClassVar[bool] = True

    def options(self) -> dict[str, Any]:
        parameters = inspect.signature(type(self).__init__).parameters
        return {name: getattr(self, name) for name in parameters if name != "self"}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "options": self.options()}

    def __call__(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, norm: str, epsilons: tuple[float, ...], seed: int = 0, active: torch.Tensor | None = None) -> PerturbationResult:
        """Attack ``images``; ``active[e, i]`` (optional) marks the points that still need eps ``e``.

        Attacks that handle one eps at a time skip inactive points; the rest attack every point given.
        """
        if norm not in self.norms:
            raise ConfigError(f"attack {self.name!r} does not support norm {norm!r}; it supports {', '.join(self.norms)}")
        if len(images) != len(labels):
            raise ConfigError(f"attack {self.name!r} got {len(images)} images but {len(labels)} labels")
        epsilons = tuple(float(eps) for eps in epsilons)
        if active is None:
            active = torch.ones(len(epsilons), len(labels), dtype=torch.bool)
        with frozen_parameters(model):
            result = self.run(model, images, labels, norm=norm, epsilons=epsilons, seed=seed, active=active)
            if result.margins is None and result.adversarials is not None:
                margins = torch.stack([label_margins(logits(model, examples), labels.cpu()) for examples in result.adversarials])
                result = dataclasses.replace(result, margins=margins)
            return result

    @abstractmethod
    def run(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, norm: str, epsilons: tuple[float, ...], seed: int, active: torch.Tensor) -> PerturbationResult:
        ...


ATTACKS: dict[str, type[Attack]] = {}


def register_attack(cls: type[Attack]) -> type[Attack]:
    ATTACKS[cls.name] = cls
    return cls


def create_attack(name: str, **options) -> Attack:
    """Instantiate a registered attack by name, with close-match suggestions for typos."""
    if name not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r}; registered attacks: {', '.join(sorted(ATTACKS))}.{did_you_mean(name, ATTACKS)}")
    try:
        return ATTACKS[name](**options)
    except TypeError as error:
        accepted = ", ".join(inspect.signature(ATTACKS[name]).parameters) or "none"
        raise ConfigError(f"attack {name!r} does not accept the options {options} ({error}); its options are {accepted}, e.g. {name}:KEY=VALUE") from error
