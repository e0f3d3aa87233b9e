"""PGD (l_inf and l_2) through Foolbox 3, with random restarts and several eps values in one call."""

from __future__ import annotations

from dataclasses import dataclass, field

import foolbox
import torch

from invarbench.errors import ConfigError

NORMS = ("linf", "l2")

# Foolbox's own defaults (LinfPGD: Madry et al.'s 40 steps of 0.01 at eps 0.3; L2PGD: 50 steps of 0.025 eps).
DEFAULT_STEPS = {"linf": 40, "l2": 50}
DEFAULT_REL_STEPSIZE = {"linf": 0.01 / 0.3, "l2": 0.025}


@dataclass(frozen=True)
class PerturbationResult:
    """Per-sample outcome of a perturbation attack at each eps.

    ``success[e, i]`` is True when point i is misclassified at eps ``epsilons[e]`` (points already
    misclassified without perturbation count as successes); ``norms`` is the size of the returned
    perturbation in the attack's norm and ``adversarial_predictions`` the model's label for it.
    """

    attack: str
    norm: str
    epsilons: tuple[float, ...]
    success: torch.Tensor
    norms: torch.Tensor
    adversarial_predictions: torch.Tensor
    options: dict = field(default_factory=dict)

    def robust_accuracy(self) -> list[float]:
        return (~self.success).float().mean(dim=1).tolist()


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ConfigError(f"unknown norm {norm!r}; use one of {', '.join(NORMS)}")
    return norm


def perturbation_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1)


def pgd(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    norm: str,
    epsilons: list[float] | tuple[float, ...],
    steps: int | None = None,
    rel_stepsize: float | None = None,
    restarts: int = 1,
    seed: int = 0,
    batch_size: int = 500,
) -> PerturbationResult:
    """Untargeted PGD with a random start; a point counts as broken if any restart broke it."""
    check_norm(norm)
    if restarts < 1:
        raise ConfigError(f"restarts={restarts} must be at least 1")
    steps = DEFAULT_STEPS[norm] if steps is None else steps
    rel_stepsize = DEFAULT_REL_STEPSIZE[norm] if rel_stepsize is None else rel_stepsize
    attack_class = foolbox.attacks.LinfPGD if norm == "linf" else foolbox.attacks.L2PGD
    attack = attack_class(steps=steps, rel_stepsize=rel_stepsize, random_start=True)
    device = next(model.parameters()).device
    fmodel = foolbox.PyTorchModel(model, bounds=model.bounds, device=device)
    epsilons = [float(eps) for eps in epsilons]
    count = len(labels)
    success = torch.zeros(len(epsilons), count, dtype=torch.bool)
    norms = torch.zeros(len(epsilons), count)
    predictions = torch.zeros(len(epsilons), count, dtype=torch.long)
    for restart in range(restarts):
        # Foolbox draws the random start from torch's global generator: seeding it makes runs repeatable.
        torch.manual_seed(seed + restart)
        for start in range(0, count, batch_size):
            batch = slice(start, start + batch_size)
            x, y = images[batch].to(device), labels[batch].to(device)
            _, clipped, batch_success = attack(fmodel, x, y, epsilons=epsilons)
            for eps_index, adversarial in enumerate(clipped):
                # Keep the first successful example per point; until one exists, keep the latest attempt.
                update = ~success[eps_index, batch]
                with torch.no_grad():
                    adversarial_labels = model(adversarial).argmax(dim=1).cpu()
                norms[eps_index, batch] = torch.where(update, perturbation_norm((adversarial - x).cpu(), norm), norms[eps_index, batch])
                predictions[eps_index, batch] = torch.where(update, adversarial_labels, predictions[eps_index, batch])
                success[eps_index, batch] |= batch_success[eps_index].cpu()
    options = {"steps": steps, "rel_stepsize": rel_stepsize, "restarts": restarts, "seed": seed, "random_start": True, "implementation": f"foolbox {foolbox.__version__}"}
    return PerturbationResult(f"pgd-{norm}", norm, tuple(epsilons), success, norms, predictions, options)
