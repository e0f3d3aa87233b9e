"""The attack protocol and its taxonomy, threat models, budgets and the attack registry.

Like Foolbox's: :class:`Attack`, a perturbation attack at fixed eps values (FGSM, PGD, AutoAttack);
:class:`MinimumNormAttack`, one that finds each point's smallest adversarial norm (FMN); and
``InvarianceAttack`` (``attacks/invariance``), which changes the true label instead, called with an
``InvarianceContext`` and run at a :class:`Budget` each.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from invarbench.attacks.norms import NORMS, perturbation_norm, project_perturbation
from invarbench.errors import ConfigError, did_you_mean
from invarbench.evaluation import label_margins, logits


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
            raise ConfigError(
                f"threat specification {spec!r} has no eps values; write NORM:EPS[,EPS...], e.g. linf:0.1,0.3 or l2:2.0"
            )
        if norm not in NORMS:
            raise ConfigError(
                f"threat specification {spec!r}: unknown norm {norm!r}; use one of {', '.join(NORMS)} (e.g. linf:0.3)"
            )
        try:
            epsilons = tuple(float(value) for value in values.split(","))
        except ValueError as error:
            raise ConfigError(
                f"threat specification {spec!r}: eps values must be numbers separated by commas, e.g. {norm}:0.1,0.3"
            ) from error
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
                raise ConfigError(
                    f"eps {eps:g} for {self.norm} is out of range for inputs in {list(bounds)} of {source}: the ball"
                    f" would contain every input; use eps < {limit:g}"
                )

    def __str__(self) -> str:
        # Short where that is exact (0.3, 2); every digit where it is not (8/255), so parsing the text gives the
        # same eps back.
        return f"{self.norm}:{','.join(f'{eps:g}' if float(f'{eps:g}') == eps else repr(eps) for eps in self.epsilons)}"


BUDGET_EXAMPLES = "e.g. linf:0.3, l2:2, l0:25, metamer:0 or set:0"
#: The pseudo-norms of invariance attacks, and what a budget under each counts.
PSEUDO_NORMS = {
    "l0": "changed pixels, a whole number from 1 (e.g. l0:25)",
    "metamer": "nothing: exact metamers do not depend on a ball (metamer:0)",
    "set": "the position of a fixed invariance set, a whole number from 0 (e.g. set:0)",
}


@dataclass(frozen=True)
class Budget:
    """One setting of an invariance attack: a norm ball's eps (``linf:0.3``, ``l2:2``) or a pseudo-norm's
    budget (``l0:25`` changed pixels, ``metamer:0`` for exact metamers, ``set:1`` for the second fixed
    invariance set). Its text, ``NORM:VALUE`` with the value as ``f"{value:g}"``, is how records,
    summaries, entries and tables name the setting; :meth:`parse` reads it back."""

    norm: str
    value: float

    def __post_init__(self):
        object.__setattr__(self, "value", float(self.value))

    @classmethod
    def parse(cls, text: str, *, lenient: bool = False) -> Budget:
        """The budget of ``NORM:VALUE``; a clear error naming the fix on a bad one. ``lenient`` (for
        reading stored settings that must not fail) keeps any norm and reads a value that is not a number as NaN."""
        norm, separator, value = str(text).strip().rpartition(":")
        norm = norm.strip().lower()
        try:
            number = float(value)
        except ValueError:
            number = None
        if lenient:
            return cls(norm, float("nan") if number is None else number)
        if not separator or not norm:
            raise ConfigError(f"budget {text!r} has no norm; write NORM:VALUE, {BUDGET_EXAMPLES}")
        if number is None or math.isnan(number):
            raise ConfigError(
                f"budget {text!r}: the value {value.strip()!r} is not a number; write NORM:VALUE, {BUDGET_EXAMPLES}"
            )
        budget = cls(norm, number)
        budget.check(text)
        return budget

    def check(self, text: str | None = None) -> None:
        """Refuse an unknown norm, or a value the norm cannot take, naming the fix."""
        name = repr(str(self) if text is None else text)
        known = (*NORMS, *PSEUDO_NORMS)
        if self.norm not in known:
            raise ConfigError(
                f"budget {name}: unknown norm {self.norm!r}; use one of {', '.join(known)}"
                f" ({BUDGET_EXAMPLES}){did_you_mean(self.norm, known)}"
            )
        if self.norm in NORMS:
            if not 0 < self.value < math.inf:
                raise ConfigError(f"budget {name}: eps must be a positive number, e.g. {self.norm}:0.3")
        elif self.norm == "metamer":
            if self.value != 0:
                raise ConfigError(f"budget {name}: exact metamers have no budget; write metamer:0")
        elif not (
            math.isfinite(self.value)
            and self.value == int(self.value)
            and self.value >= (1 if self.norm == "l0" else 0)
        ):
            raise ConfigError(f"budget {name}: {self.norm} counts {PSEUDO_NORMS[self.norm]}")

    def __str__(self) -> str:
        return f"{self.norm}:{self.value:g}"


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


@dataclass
class Outcome:
    """A perturbation result's per-eps tensors while an attack fills them in: ``success``, ``norms``,
    ``predictions``, ``margins`` (each eps x points) and ``adversarials`` (eps x points x input)."""

    success: torch.Tensor
    norms: torch.Tensor
    predictions: torch.Tensor
    margins: torch.Tensor
    adversarials: torch.Tensor

    @classmethod
    def unattacked(cls, images: torch.Tensor, epsilons: tuple[float, ...]) -> Outcome:
        """Before any attack: no success, NaN norms and margins, predictions -1, the clean images."""
        shape = (len(epsilons), len(images))
        adversarials = images.detach().cpu().unsqueeze(0).repeat(len(epsilons), *[1] * images.dim())
        return cls(
            torch.zeros(shape, dtype=torch.bool),
            torch.full(shape, float("nan")),
            torch.full(shape, -1, dtype=torch.long),
            torch.full(shape, float("nan")),
            adversarials,
        )

    def judge(
        self,
        model: torch.nn.Module,
        index: int,
        points: torch.Tensor,
        images: torch.Tensor,
        labels: torch.Tensor,
        adversarial: torch.Tensor,
        *,
        norm: str,
        eps: float,
        batch_size: int,
    ) -> None:
        """Record eps ``index`` for ``points`` from an attack's examples: moved onto the ball and bounds
        (removing float rounding from a change of coordinates), then judged by the model itself."""
        adversarial = project_perturbation(images, adversarial, norm=norm, eps=eps, bounds=model.bounds)
        output = logits(model, adversarial, batch_size=batch_size)
        self.success[index, points] = output.argmax(1) != labels
        self.norms[index, points] = perturbation_norm(adversarial - images, norm)
        self.predictions[index, points] = output.argmax(1)
        self.margins[index, points] = label_margins(output, labels)
        self.adversarials[index, points] = adversarial

    def result(
        self,
        attack: str,
        norm: str,
        epsilons: tuple[float, ...],
        options: dict[str, Any],
        warnings: tuple[str, ...] = (),
    ) -> PerturbationResult:
        return PerturbationResult(
            attack,
            norm,
            tuple(epsilons),
            self.success,
            self.norms,
            self.predictions,
            options,
            self.adversarials,
            self.margins,
            warnings,
        )


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


class BaseAttack(ABC):
    """What every registered attack has: a name, the track it belongs to (``invarbench.tracks``), the norms
    it supports and typed keyword-only options. Subclasses declare their options as keyword-only
    ``__init__`` parameters with defaults; :meth:`options` reports them (recorded in every result)."""

    name: ClassVar[str]
    #: The name of the track (``invarbench.tracks``) that plans, runs and reports the attack.
    track: ClassVar[str]
    norms: ClassVar[tuple[str, ...]] = NORMS
    #: True if the same inputs and seed always give the same outcome (regression checks compare exactly).
    deterministic: ClassVar[bool] = True

    def options(self) -> dict[str, Any]:
        parameters = inspect.signature(type(self).__init__).parameters
        return {name: getattr(self, name) for name in parameters if name != "self"}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "track": self.track, "options": self.options()}


class Attack(BaseAttack):
    """A perturbation attack at fixed eps values: looks, within each eps-ball, for a change that flips the
    model's prediction; per-sample results (:class:`PerturbationResult`). :meth:`__call__` validates inputs.
    """

    track: ClassVar[str] = "perturbation"

    def __call__(
        self,
        model: torch.nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        norm: str,
        epsilons: tuple[float, ...],
        seed: int = 0,
        active: torch.Tensor | None = None,
        workspace: Path | None = None,
    ) -> PerturbationResult:
        """Attack ``images``; ``active[e, i]`` (optional) marks the points that still need eps ``e``.

        Attacks that handle one eps at a time skip inactive points; the rest attack every point given.
        ``workspace`` (optional) is a folder of the job's own where an attack that can resume keeps
        its state (AutoAttack's state file); the others ignore it.
        """
        if norm not in self.norms:
            raise ConfigError(
                f"attack {self.name!r} does not support norm {norm!r}; it supports {', '.join(self.norms)}"
            )
        if len(images) != len(labels):
            raise ConfigError(f"attack {self.name!r} got {len(images)} images but {len(labels)} labels")
        epsilons = tuple(float(eps) for eps in epsilons)
        if active is None:
            active = torch.ones(len(epsilons), len(labels), dtype=torch.bool)
        with frozen_parameters(model):
            result = self.run(
                model, images, labels, norm=norm, epsilons=epsilons, seed=seed, active=active, workspace=workspace
            )
            if result.margins is None and result.adversarials is not None:
                margins = torch.stack(
                    [label_margins(logits(model, examples), labels.cpu()) for examples in result.adversarials]
                )
                result = dataclasses.replace(result, margins=margins)
            return result

    @abstractmethod
    def run(
        self,
        model: torch.nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        norm: str,
        epsilons: tuple[float, ...],
        seed: int,
        active: torch.Tensor,
        workspace: Path | None = None,
    ) -> PerturbationResult: ...


class MinimumNormAttack(Attack):
    """An attack that finds each point's smallest adversarial perturbation (FMN): one search gives the
    whole robust-accuracy-versus-eps curve, and a point is broken at every eps at least its norm.
    Entries store that curve, and regression checks allow a flip where the norm sits at eps."""

    @abstractmethod
    def minimal_norms(
        self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, norm: str, seed: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each point's smallest adversarial norm found (+inf where none) and the model's label there."""


ATTACKS: dict[str, type[BaseAttack]] = {}
AttackClass = TypeVar("AttackClass", bound=type[BaseAttack])


def register_attack(cls: AttackClass) -> AttackClass:
    ATTACKS[cls.name] = cls
    return cls


def create_attack(name: str, **options) -> Any:
    """Instantiate a registered attack by name, with close-match suggestions for typos."""
    if name not in ATTACKS:
        raise ConfigError(
            f"unknown attack {name!r}; registered attacks: {', '.join(sorted(ATTACKS))}.{did_you_mean(name, ATTACKS)}"
        )
    try:
        return ATTACKS[name](**options)
    except TypeError as error:
        accepted = ", ".join(inspect.signature(ATTACKS[name]).parameters) or "none"
        raise ConfigError(
            f"attack {name!r} does not accept the options {options} ({error}); its options are {accepted}, e.g."
            f" {name}:KEY=VALUE"
        ) from error
