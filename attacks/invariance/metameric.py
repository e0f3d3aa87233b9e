"""``metameric``: exact metamers of invertible models (Jacobsen et al.) and gradient metamers of others."""

from __future__ import annotations

import copy

import torch

from invarbench.attacks.base import Budget, ThreatModel, register_attack
from invarbench.attacks.invariance.base import InvarianceAttack, InvarianceResult
from invarbench.attacks.norms import project
from invarbench.errors import ConfigError
from invarbench.oracles import ABSTAIN


def metamer_partners(labels: torch.Tensor) -> torch.Tensor:
    """For each point a, the position of its partner b: the next point (cyclically) with another label;
    -1 if every point has the same label."""
    count = len(labels)
    partners = torch.full((count,), -1, dtype=torch.long)
    for point in range(count):
        for step in range(1, count):
            other = (point + step) % count
            if labels[other] != labels[point]:
                partners[point] = other
                break
    return partners


@register_attack
class Metameric(InvarianceAttack):
    """Metamers: inputs on which the model's logits equal those of x_a while the content is x_b's.

    Invertible models (fi-RevNet): the exact metamer F^-1(z_s(x_a), z_n(x_b)) (Jacobsen et al.),
    computed in float64 so that its logits match x_a's to ~1e-10; it is clipped to the input bounds
    only for judging (the oracle and the model's recorded prediction see the clipped image).
    Other models: a gradient metamer, x_b changed inside the eps-ball around it (sign-gradient steps
    on the squared logit difference) so that the model's logits approach those of x_a.
    """

    name = "metameric"
    norms = ("linf", "l2")

    def __init__(self, *, steps: int = 100, step_fraction: float = 0.05):
        self.steps = steps
        self.step_fraction = step_fraction

    def budgets(self, threat: ThreatModel, invertible: bool) -> tuple[Budget, ...]:
        if invertible:
            # Exact metamers do not depend on a ball: one job, whatever threats are configured.
            return (Budget("metamer", 0),) if threat.norm in ("linf", "metamer") else ()
        return super().budgets(threat, invertible)

    def run(self, model, images, labels, *, norm, epsilons, seed, context):
        partners = metamer_partners(labels)
        has_partner = partners >= 0
        partner_positions = partners.clamp_min(0)
        sources = torch.where(has_partner, context.indices[partner_positions], torch.full_like(partners, -1))
        targets = torch.where(has_partner, labels[partner_positions], torch.full_like(partners, -1))
        low, high = model.bounds
        with torch.no_grad():
            wanted_logits = model(images)
        if norm == "metamer":
            if not getattr(model, "invertible", False):
                raise ConfigError(
                    f"exact metamers need an invertible model; {getattr(model, 'name', 'this model')} is not (gradient"
                    " metamers run with --threat linf:EPS)"
                )
            # In float64: the inverse of a mix of two codes can leave the input range by orders of
            # magnitude, where float32 rounding alone would blur the logits by ~1e-3.
            exact = copy.deepcopy(model).double()
            with torch.no_grad():
                z_a, _ = exact.encode(images.double())
                z_b, _ = exact.encode(images[partner_positions].double())
                classes = model.num_classes
                metamers = exact.decode(torch.cat([z_a[:, :classes], z_b[:, classes:]], dim=1))
                logit_errors = (exact(metamers) - exact(images.double())).abs().amax(1).float()
            candidates = metamers.clamp(low, high).float().unsqueeze(0)
            epsilons = (0.0,)
            norms = (metamers - images[partner_positions].double()).flatten(1).abs().amax(1).float().unsqueeze(0)
        else:
            starts = images[partner_positions]
            candidates = torch.empty(len(epsilons), *images.shape)
            logit_errors = torch.empty(len(epsilons), len(labels))
            for eps_index, eps in enumerate(epsilons):
                candidate = starts.clone()
                step = eps * self.step_fraction
                for _ in range(self.steps):
                    candidate.requires_grad_(True)
                    loss = (model(candidate) - wanted_logits).pow(2).sum()
                    (gradient,) = torch.autograd.grad(loss, candidate)
                    with torch.no_grad():
                        if norm == "linf":
                            candidate = candidate - step * gradient.sign()
                        else:
                            shape = (-1, *[1] * (images.dim() - 1))
                            candidate = candidate - step * gradient / gradient.flatten(1).norm(dim=1).clamp_min(
                                1e-12
                            ).view(shape)
                        candidate = project(candidate, starts, norm=norm, eps=eps, bounds=(low, high))
                candidates[eps_index] = candidate.detach()
                with torch.no_grad():
                    logit_errors[eps_index] = (model(candidates[eps_index]) - wanted_logits).abs().amax(1)
            delta = (candidates - starts.unsqueeze(0)).flatten(2)
            norms = delta.abs().amax(2) if norm == "linf" else delta.norm(dim=2)
        oracle_labels, predictions, margins = self._judge(model, candidates, context.oracle)
        # Points without a partner get no metamer: the oracle label counts as an abstention (decided by no vote).
        oracle_labels[:, ~has_partner] = ABSTAIN
        margins["oracle_margins"][:, ~has_partner] = -1
        return InvarianceResult(
            self.name,
            norm,
            epsilons,
            candidates,
            targets.repeat(len(epsilons), 1),
            sources.repeat(len(epsilons), 1),
            context.oracle.name,
            oracle_labels,
            predictions,
            norms,
            logit_errors,
            self.options(),
            **margins,
        )
