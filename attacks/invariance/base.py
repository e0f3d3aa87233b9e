"""What every invariance attack shares: its result, its context, the attack class and its device bridge."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from invarbench.attacks.base import BaseAttack, Budget, ThreatModel, frozen_parameters
from invarbench.errors import ConfigError
from invarbench.evaluation import logits, model_device, top_margins
from invarbench.oracles import Oracle


@dataclass(frozen=True)
class InvarianceResult:
    """Per-sample outcome of an invariance attack at each eps (or budget).

    ``candidates[e, i]`` is the changed input for point i; ``target_classes`` the class it was built
    towards, ``source_indices`` where its content came from (a training index, or a test index for
    metamers); ``oracle_labels`` the oracle's label (``ABSTAIN`` = -1); ``model_predictions`` the
    attacked model's; ``logit_errors`` the largest |logit difference| to the source of the logits
    (metamers only, else NaN).
    """

    attack: str
    norm: str
    epsilons: tuple[float, ...]
    candidates: torch.Tensor
    target_classes: torch.Tensor
    source_indices: torch.Tensor
    oracle: str
    oracle_labels: torch.Tensor
    model_predictions: torch.Tensor
    perturbation_norms: torch.Tensor
    logit_errors: torch.Tensor
    options: dict[str, Any] = field(default_factory=dict)
    #: (eps, points) False where the attack had no candidate for a point (fixed invariance sets); None = all ran.
    ran: torch.Tensor | None = None
    #: One oracle name per eps when they differ (one label-file oracle per invariance set).
    oracles: tuple[str, ...] | None = None
    #: (eps, points) how firmly each outcome was decided, from the judging pass itself: the model's
    #: top-two logit gap, and the votes the oracle's outcome is from changing (-1 where unknown).
    #: None where the attack did not judge (fixed sets: the runner measures the model's margins).
    model_margins: torch.Tensor | None = None
    oracle_margins: torch.Tensor | None = None


@dataclass
class InvarianceContext:
    """What an invariance attack needs beyond the model and points: the data set (training images are
    the source of candidates), the oracle, the points' indices in the test set and a cache folder."""

    dataset: Any
    oracle: Oracle | None
    indices: torch.Tensor
    cache_dir: Path | None = None


class InvarianceAttack(BaseAttack):
    """An attack that changes the true label (judged by an oracle) while the model's prediction may stay
    put. Called with an :class:`InvarianceContext` (``context=``), it runs at :class:`Budget` settings:
    a norm ball's eps, or its own pseudo-norm's budget (``l0:25``, ``metamer:0``, ``set:0``)."""

    track: ClassVar[str] = "invariance"
    norms: ClassVar[tuple[str, ...]] = ("linf",)
    #: False for attacks that bring their own judge (fixed sets with people's labels).
    needs_oracle: ClassVar[bool] = True

    def budgets(self, threat: ThreatModel, invertible: bool) -> tuple[Budget, ...]:
        """The settings this attack runs at for a configured threat model (none: it skips it): the
        threat's eps values where its norm is one of the attack's; attacks with a pseudo-norm give their
        own budgets instead (once, whatever threats are configured)."""
        return tuple(Budget(threat.norm, eps) for eps in threat.epsilons) if threat.norm in self.norms else ()

    def __call__(
        self,
        model: torch.nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        norm: str,
        epsilons: tuple[float, ...],
        seed: int = 0,
        context: InvarianceContext | None = None,
    ) -> InvarianceResult:
        """Search every point at each eps (or budget) and judge the candidates; ``context`` gives the data
        set the candidates come from, the oracle and the points' indices."""
        if context is None:
            raise ConfigError(
                f"attack {self.name!r} needs context=InvarianceContext(dataset, oracle, indices) (the data set its"
                " candidates come from, the oracle that judges them, the points' indices in the test set); pass it in"
                " the call, or run the attack through `invarbench run` or invarbench.evaluate"
            )
        if len(images) != len(labels):
            raise ConfigError(f"attack {self.name!r} got {len(images)} images but {len(labels)} labels")
        with frozen_parameters(model):
            return self.run(
                _on_cpu_tensors(model),
                images,
                labels,
                norm=norm,
                epsilons=tuple(float(eps) for eps in epsilons),
                seed=seed,
                context=context,
            )

    @abstractmethod
    def run(
        self,
        model,
        images,
        labels,
        *,
        norm: str,
        epsilons: tuple[float, ...],
        seed: int,
        context: InvarianceContext,
    ) -> InvarianceResult: ...

    def _judge(
        self, model, candidates: torch.Tensor, oracle: Oracle
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The oracle's labels and the model's predictions for (eps, points, ...) candidates, and the
        margins that decided them (``InvarianceResult`` keyword arguments)."""
        shape = candidates.shape[:2]
        flat = candidates.reshape(-1, *candidates.shape[2:])
        if not len(flat):
            empty = torch.zeros(shape, dtype=torch.long)
            return (
                empty,
                empty.clone(),
                {"model_margins": torch.zeros(shape), "oracle_margins": torch.full(shape, -1, dtype=torch.long)},
            )
        output = logits(model, flat)
        oracle_labels, votes = oracle.decide(flat)
        margins = {
            "model_margins": top_margins(output).view(shape),
            "oracle_margins": (torch.full_like(oracle_labels, -1) if votes is None else votes).view(shape),
        }
        return oracle_labels.view(shape), output.argmax(1).view(shape), margins


class _DeviceBridge(torch.nn.Module):
    """A model on an accelerator seen through CPU tensors: the searches, oracles and candidate images
    stay on the CPU, only the attacked model's passes run on its device (gradients flow through)."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        super().__init__()
        self.model = model
        self.device = device
        self.bounds, self.num_classes, self.name = model.bounds, model.num_classes, getattr(model, "name", "model")
        self.invertible = getattr(model, "invertible", False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.device)).cpu()

    def encode(self, x: torch.Tensor):
        z, log_det = self.model.encode(x.to(self.device))
        return z.cpu(), log_det.cpu()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z.to(self.device)).cpu()


def _on_cpu_tensors(model: torch.nn.Module) -> torch.nn.Module:
    device = model_device(model)
    return model if device.type == "cpu" else _DeviceBridge(model, device)
