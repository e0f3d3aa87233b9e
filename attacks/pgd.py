"""invarbench's own PGD: one call over a sorted eps list with nesting and per-sample early exit.

For each batch of points the eps values are attacked in increasing order:

- a point broken at a smaller eps is broken at every larger one (its adversarial lies in every larger
  ball) and is not attacked again;
- a point that survived an eps starts the next one from its best iterate so far (highest loss), a
  random start in the ball where it has none; restarts beyond the first draw random starts and run
  only on the points still robust;
- within a run, a point leaves the working batch as soon as an iterate (the start included) is
  misclassified: that first misclassified iterate is its adversarial. A point never broken returns
  its best iterate.

Steps are Foolbox's (l_inf: ``rel_stepsize * eps`` times the gradient's sign, then clipping to the
ball; l_2: the same times the gradient scaled to unit l_2 norm, then scaling ``x - x0`` back onto the
ball), then the input bounds; the defaults are those of ``foolbox-pgd``. Random starts come from a
generator seeded with ``seed``, so a seed (and a batch size) fixes the outcome.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from invarbench.attacks.base import Attack, PerturbationResult, register_attack
from invarbench.attacks.foolbox_attacks import PGD_DEFAULT_REL_STEPSIZE, PGD_DEFAULT_STEPS, check_pgd_options
from invarbench.attacks.norms import per_sample, perturbation_norm, project
from invarbench.evaluation import label_margins, model_device


def _random_starts(
    x0: torch.Tensor, *, norm: str, eps: float, bounds: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """Uniform random points of the eps-ball around each of ``x0``, in the bounds (drawn on the CPU: the same for a
    seed on every device)."""
    if norm == "linf":
        delta = torch.rand(x0.shape, generator=generator) * (2 * eps) - eps
    else:
        direction = torch.randn(x0.shape, generator=generator)
        direction = direction / per_sample(direction.flatten(1).norm(dim=1).clamp_min(1e-12), direction)
        radius = eps * torch.rand(len(x0), generator=generator) ** (1.0 / x0[0].numel())
        delta = direction * per_sample(radius, direction)
    return (x0 + delta.to(x0.device, x0.dtype)).clamp(*bounds)


class _Batch:
    """The state of one batch across the eps sweep: which points are broken (and by which iterate),
    and each surviving point's best iterate so far (highest loss) with the logits there."""

    def __init__(self, x0: torch.Tensor, labels: torch.Tensor, clean: torch.Tensor):
        self.x0, self.labels = x0, labels
        # Points the model already misclassifies are broken at every eps by the clean input itself.
        self.broken = clean.argmax(1) != labels
        self.adversarial, self.adversarial_logits = x0.clone(), clean.clone()
        self.best, self.best_logits = x0.clone(), clean.clone()
        self.best_loss = torch.full((len(labels),), float("-inf"), device=x0.device)
        self.started = torch.zeros(len(labels), dtype=torch.bool, device=x0.device)

    def returned(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each point's example and its logits: the first misclassified iterate, else the best iterate."""
        broken = self.broken.view(-1, 1)
        return torch.where(per_sample(self.broken, self.x0), self.adversarial, self.best), torch.where(
            broken, self.adversarial_logits, self.best_logits
        )


@register_attack
class PGD(Attack):
    """Untargeted PGD, invarbench's engine: nested eps sweep, per-sample early exit, success on any iterate.

    ``steps`` and ``rel_stepsize`` default to those of ``foolbox-pgd`` (l_inf 40 steps of eps/30, l_2 50
    steps of eps/40), recorded in the results with ``implementation: invarbench``.
    """

    name = "pgd"
    #: Recorded in a run's settings: entries made before ``pgd`` was this engine (none recorded) were
    #: Foolbox's, and regression checks re-run them with ``foolbox-pgd``.
    implementation = "invarbench"

    def __init__(
        self, *, steps: int | None = None, rel_stepsize: float | None = None, restarts: int = 1, batch_size: int = 500
    ):
        check_pgd_options(self.name, steps=steps, rel_stepsize=rel_stepsize, restarts=restarts, batch_size=batch_size)
        self.steps, self.rel_stepsize, self.restarts, self.batch_size = steps, rel_stepsize, restarts, batch_size

    def resolved(self, norm: str) -> tuple[int, float]:
        """The steps and relative step size used for ``norm`` (the defaults where none was given)."""
        steps = PGD_DEFAULT_STEPS[norm] if self.steps is None else self.steps
        return steps, PGD_DEFAULT_REL_STEPSIZE[norm] if self.rel_stepsize is None else self.rel_stepsize

    def run(self, model, images, labels, *, norm, epsilons, seed, active, workspace=None):
        steps, rel_stepsize = self.resolved(norm)
        device = model_device(model)
        bounds = tuple(float(bound) for bound in model.bounds)
        generator = torch.Generator().manual_seed(seed)
        count = len(labels)
        success = torch.zeros(len(epsilons), count, dtype=torch.bool)
        norms = torch.zeros(len(epsilons), count)
        predictions = torch.zeros(len(epsilons), count, dtype=torch.long)
        margins = torch.zeros(len(epsilons), count)
        adversarials = images.detach().cpu().unsqueeze(0).repeat(len(epsilons), *[1] * images.dim())
        order = sorted(range(len(epsilons)), key=lambda index: epsilons[index])
        for start in range(0, count, self.batch_size):
            batch = slice(start, min(start + self.batch_size, count))
            x0, y = images[batch].to(device), labels[batch].to(device)
            with torch.no_grad():
                state = _Batch(x0, y, model(x0).float())
            batch_active = active[:, batch].to(device)
            for index in order:
                eps = epsilons[index]
                for restart in range(self.restarts):
                    points = (batch_active[index] & ~state.broken).nonzero().flatten()
                    if not len(points):
                        break
                    x = _random_starts(x0[points], norm=norm, eps=eps, bounds=bounds, generator=generator)
                    if restart == 0:
                        warm = state.started[points]
                        x = torch.where(per_sample(warm, x), state.best[points], x)
                    self._attack(
                        model,
                        state,
                        points,
                        x,
                        norm=norm,
                        eps=eps,
                        step_size=rel_stepsize * eps,
                        steps=steps,
                        bounds=bounds,
                    )
                example, output = state.returned()
                adversarials[index, batch] = example.cpu()
                success[index, batch] = state.broken.cpu()
                norms[index, batch] = perturbation_norm(example - x0, norm).cpu()
                predictions[index, batch] = output.argmax(1).cpu()
                margins[index, batch] = label_margins(output, y).cpu()
        options = {
            **self.options(),
            "steps": steps,
            "rel_stepsize": rel_stepsize,
            "random_start": True,
            "implementation": self.implementation,
        }
        return PerturbationResult(
            self.name, norm, tuple(epsilons), success, norms, predictions, options, adversarials, margins
        )

    @staticmethod
    def _attack(
        model,
        state: _Batch,
        points: torch.Tensor,
        x: torch.Tensor,
        *,
        norm: str,
        eps: float,
        step_size: float,
        steps: int,
        bounds: tuple[float, float],
    ) -> None:
        """PGD from ``x`` on the batch's ``points`` at ``eps``; updates ``state`` (broken points, best iterates).

        The working tensors hold only the points still robust; they shrink when an iterate breaks points.
        """
        x0, labels = state.x0[points], state.labels[points]
        best, best_logits, best_loss = state.best[points], state.best_logits[points], state.best_loss[points]
        for step in range(steps + 1):
            last = step == steps
            x.requires_grad_(not last)
            with torch.set_grad_enabled(not last):
                output = model(x).float()
                losses = F.cross_entropy(output, labels, reduction="none")
            gradient = None if last else torch.autograd.grad(losses.sum(), x)[0]
            with torch.no_grad():
                x, output, losses = x.detach(), output.detach(), losses.detach()
                better = losses > best_loss
                best = torch.where(per_sample(better, best), x, best)
                best_logits = torch.where(better.view(-1, 1), output, best_logits)
                best_loss = torch.where(better, losses, best_loss)
                broken = output.argmax(1) != labels
                if bool(broken.any()):
                    leaving = points[broken]
                    state.broken[leaving] = True
                    state.adversarial[leaving], state.adversarial_logits[leaving] = x[broken], output[broken]
                    keep = ~broken
                    points, x, x0, labels, best, best_logits, best_loss = (
                        points[keep],
                        x[keep],
                        x0[keep],
                        labels[keep],
                        best[keep],
                        best_logits[keep],
                        best_loss[keep],
                    )
                    gradient = None if gradient is None else gradient[keep]
                    if not len(points):
                        return
                if last:
                    break
                if norm == "linf":
                    direction = gradient.sign()
                else:
                    direction = gradient / per_sample(gradient.flatten(1).norm(dim=1).clamp_min(1e-12), gradient)
                x = project(x + step_size * direction, x0, norm=norm, eps=eps, bounds=bounds)
        state.best[points], state.best_logits[points], state.best_loss[points] = best, best_logits, best_loss
        state.started[points] = True
