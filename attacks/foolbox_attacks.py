"""Perturbation attacks through Foolbox 3: FGSM, PGD (with restarts) and FMN (minimum norm)."""

from __future__ import annotations

import eagerpy as ep
import foolbox
import torch
from foolbox.devutils import atleast_kd, flatten

from invarbench.attacks.base import Attack, MinimumNormAttack, PerturbationResult, register_attack
from invarbench.attacks.norms import perturbation_norm
from invarbench.errors import ConfigError
from invarbench.evaluation import label_margins, logits, model_device


def foolbox_model(model: torch.nn.Module) -> foolbox.PyTorchModel:
    device = model_device(model)
    return foolbox.PyTorchModel(model, bounds=model.bounds, device=device)


def _batches(count: int, batch_size: int):
    for start in range(0, count, batch_size):
        yield slice(start, min(start + batch_size, count))


@torch.no_grad()
def _predict(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(images).argmax(dim=1)


class _FoolboxFixedEpsilon(Attack):
    """Shared driver for Foolbox attacks that take a list of eps and return one example per eps."""

    def _foolbox_attack(self, norm: str):
        raise NotImplementedError

    def _attempts(self) -> int:
        return 1

    def run(self, model, images, labels, *, norm, epsilons, seed, active, workspace=None):
        attack = self._foolbox_attack(norm)
        fmodel = foolbox_model(model)
        device = model_device(model)
        success = torch.zeros(len(epsilons), len(labels), dtype=torch.bool)
        norms = torch.zeros(len(epsilons), len(labels))
        predictions = torch.zeros(len(epsilons), len(labels), dtype=torch.long)
        adversarials = images.detach().cpu().unsqueeze(0).repeat(len(epsilons), *[1] * images.dim())
        for attempt in range(self._attempts()):
            # Foolbox draws random starts from torch's global generator: seeding it makes runs repeatable.
            torch.manual_seed(seed + attempt)
            for batch in _batches(len(labels), self.batch_size):
                x, y = images[batch].to(device), labels[batch].to(device)
                _, clipped, batch_success = attack(fmodel, x, y, epsilons=list(epsilons))
                for index, adversarial in enumerate(clipped):
                    # Keep the first successful example per point; until one exists, the latest attempt.
                    update = ~success[index, batch]
                    norms[index, batch] = torch.where(
                        update, perturbation_norm((adversarial - x).cpu(), norm), norms[index, batch]
                    )
                    predictions[index, batch] = torch.where(
                        update, _predict(model, adversarial).cpu(), predictions[index, batch]
                    )
                    adversarials[index, batch] = torch.where(
                        update.view(-1, *[1] * (adversarial.dim() - 1)), adversarial.cpu(), adversarials[index, batch]
                    )
                    success[index, batch] |= batch_success[index].cpu()
        return PerturbationResult(
            self.name,
            norm,
            epsilons,
            success,
            norms,
            predictions,
            {**self.options(), "implementation": f"foolbox {foolbox.__version__}"},
            adversarials,
        )


@register_attack
class FGSM(_FoolboxFixedEpsilon):
    """One gradient step (FGSM for l_inf, FGM for l_2): the cheap baseline."""

    name = "fgsm"

    def __init__(self, *, batch_size: int = 500):
        self.batch_size = batch_size

    def _foolbox_attack(self, norm):
        return foolbox.attacks.FGSM() if norm == "linf" else foolbox.attacks.FGM()


# Foolbox's own defaults (LinfPGD: Madry et al.'s 40 steps of eps/30; L2PGD: 50 steps of eps/40).
PGD_DEFAULT_STEPS = {"linf": 40, "l2": 50}
PGD_DEFAULT_REL_STEPSIZE = {"linf": 0.01 / 0.3, "l2": 0.025}


def check_pgd_options(
    name: str, *, steps: int | None, rel_stepsize: float | None, restarts: int, batch_size: int
) -> None:
    """The options both PGDs (``pgd``, ``foolbox-pgd``) take, refused with the fix when out of range."""
    if restarts < 1:
        raise ConfigError(f"{name}: restarts={restarts} must be at least 1")
    if steps is not None and steps < 1:
        raise ConfigError(f"{name}: steps={steps} must be at least 1")
    if rel_stepsize is not None and not rel_stepsize > 0:
        raise ConfigError(f"{name}: rel_stepsize={rel_stepsize} must be positive (a fraction of eps, e.g. 0.0333)")
    if batch_size < 1:
        raise ConfigError(f"{name}: batch_size={batch_size} must be at least 1")


@register_attack
class PGD(_FoolboxFixedEpsilon):
    """Untargeted PGD through Foolbox (``LinfPGD`` / ``L2PGD``) with a random start; a point counts as
    broken if any restart broke it. The reference for invarbench's own ``pgd`` (attacks/pgd.py), and what
    the stored entries made before that engine were evaluated with under the name ``pgd``.

    ``steps`` and ``rel_stepsize`` default to Foolbox's per-norm defaults (recorded in the results).
    """

    name = "foolbox-pgd"

    def __init__(
        self, *, steps: int | None = None, rel_stepsize: float | None = None, restarts: int = 1, batch_size: int = 500
    ):
        check_pgd_options(self.name, steps=steps, rel_stepsize=rel_stepsize, restarts=restarts, batch_size=batch_size)
        self.steps, self.rel_stepsize, self.restarts, self.batch_size = steps, rel_stepsize, restarts, batch_size

    def _attempts(self) -> int:
        return self.restarts

    def _foolbox_attack(self, norm):
        steps = PGD_DEFAULT_STEPS[norm] if self.steps is None else self.steps
        rel_stepsize = PGD_DEFAULT_REL_STEPSIZE[norm] if self.rel_stepsize is None else self.rel_stepsize
        attack_class = foolbox.attacks.LinfPGD if norm == "linf" else foolbox.attacks.L2PGD
        return attack_class(steps=steps, rel_stepsize=rel_stepsize, random_start=True)

    def run(self, model, images, labels, *, norm, epsilons, seed, active, workspace=None):
        result = super().run(
            model, images, labels, norm=norm, epsilons=epsilons, seed=seed, active=active, workspace=workspace
        )
        result.options.update(
            steps=PGD_DEFAULT_STEPS[norm] if self.steps is None else self.steps,
            rel_stepsize=PGD_DEFAULT_REL_STEPSIZE[norm] if self.rel_stepsize is None else self.rel_stepsize,
            random_start=True,
        )
        return result


@torch.no_grad()
def _other_class_starts(model, x: torch.Tensor, y: torch.Tensor, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """For each point, the nearest image of the batch (distance in ``norm``) that the model assigns to
    a class other than the point's label: an adversarial starting point. ``has_start`` is False where
    the batch holds none."""
    predictions = _predict(model, x)
    distances = torch.cdist(x.flatten(1), x.flatten(1), p=float("inf") if norm == "linf" else 2.0)
    distances[predictions[None, :] == y[:, None]] = float("inf")
    nearest = distances.argmin(1)
    return x[nearest], torch.isfinite(distances.min(1).values)


class _L2FMNProjected(foolbox.attacks.L2FMNAttack):
    """Foolbox 3.3.4's L2FMNAttack with its l_2 projection fixed.

    Upstream ``project`` scales by ``min(1, norms / norms)`` (always 1) of the norm of ``x`` rather
    than of ``x - x0``, so the eps-ball never shrinks and the returned norms come out as multiples of
    the step size (found by the closed-form linear-model test). This projects ``x - x0`` onto the ball.
    """

    def project(self, x, x0, epsilon):
        delta = x - x0
        norms = ep.maximum(flatten(delta).norms.l2(axis=-1), 1e-12)
        factor = atleast_kd(ep.minimum(1, epsilon / norms), x.ndim)
        return x0 + delta * factor


@register_attack
class FMN(MinimumNormAttack):
    """Fast Minimum-Norm attack (Pintor et al.) through Foolbox: each point's smallest adversarial norm.

    One run gives the whole robust-accuracy-versus-eps curve: a point is broken at eps when the
    perturbation FMN found is no larger than eps. ``minimal_norm`` is +inf where FMN found none.

    Started at the clean point, FMN's l_2 ball grows only by the linear estimate of the distance to
    the boundary while no adversarial is known, and on MNIST CNNs it found none within 100 or 300
    steps for about a third of the points. With ``restart`` (default) such points are attacked again
    from an adversarial starting point, as the FMN paper allows: the nearest image of the batch (in
    the threat norm) that the model assigns to another class; FMN then walks it back towards the
    clean point.
    """

    name = "fmn"

    def __init__(self, *, steps: int = 100, batch_size: int = 500, restart: bool = True):
        self.steps, self.batch_size, self.restart = steps, batch_size, bool(restart)

    def minimal_norms(self, model, images, labels, *, norm: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Each point's smallest adversarial norm found (+inf where none) and the model's label there."""
        minimal, predictions, _ = self._search(model, images, labels, norm=norm, seed=seed)
        return minimal, predictions

    def _search(
        self, model, images, labels, *, norm: str, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``minimal_norms`` and the label margin at each returned example."""
        attack = (foolbox.attacks.LInfFMNAttack if norm == "linf" else _L2FMNProjected)(steps=self.steps)
        fmodel = foolbox_model(model)
        device = model_device(model)
        torch.manual_seed(seed)
        minimal = torch.full((len(labels),), float("inf"))
        predictions = torch.zeros(len(labels), dtype=torch.long)
        margins = torch.full((len(labels),), float("nan"))
        for batch in _batches(len(labels), self.batch_size):
            x, y = images[batch].to(device), labels[batch].to(device)
            _, (adversarial,), (found,) = attack(fmodel, x, y, epsilons=[None])
            if self.restart and not bool(found.all()):
                starts, has_start = _other_class_starts(model, x, y, norm)
                again = ~found & has_start
                if bool(again.any()):
                    _, (restarted,), (found_again,) = attack(
                        fmodel, x[again], y[again], epsilons=[None], starting_points=starts[again]
                    )
                    adversarial, found = adversarial.clone(), found.clone()
                    adversarial[again], found[again] = restarted, found_again
            found = found.cpu()
            minimal[batch] = torch.where(found, perturbation_norm((adversarial - x).cpu(), norm), minimal[batch])
            output = logits(model, adversarial)
            predictions[batch] = output.argmax(1)
            margins[batch] = label_margins(output, y.cpu())
        return minimal, predictions, margins

    def run(self, model, images, labels, *, norm, epsilons, seed, active, workspace=None):
        minimal, predictions, margins = self._search(model, images, labels, norm=norm, seed=seed)
        # A small tolerance absorbs float rounding of the norm of a perturbation clipped to exactly eps.
        success = torch.stack([minimal <= eps * (1 + 1e-5) for eps in epsilons])
        norms = minimal.expand(len(epsilons), -1).clone()
        return PerturbationResult(
            self.name,
            norm,
            epsilons,
            success,
            norms,
            predictions.expand(len(epsilons), -1).clone(),
            {**self.options(), "implementation": f"foolbox {foolbox.__version__}"},
            margins=margins.expand(len(epsilons), -1).clone(),
        )
