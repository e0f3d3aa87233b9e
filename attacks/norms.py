"""Norms of perturbations and projections onto eps-balls and the input bounds, shared by the attacks
and adversarial training.

Two projections, which round differently and are each kept with the arithmetic of the results made
with them:

- :func:`project`, a step's projection (PGD, gradient metamers, the invariance search, adversarial
  training; Foolbox's arithmetic): l_inf clips ``x`` to ``[x0 - eps, x0 + eps]``; l_2 scales
  ``x - x0`` by ``min(1, eps / ||x - x0||)``.
- :func:`project_perturbation`, the repair after a change of coordinates (AutoAttack, aa-fast), whose
  float rounding can leave a perturbation a hair outside the ball: l_inf clips the perturbation
  ``x - x0`` and adds it back; l_2 scales only the perturbations longer than eps (those inside keep
  a factor of exactly 1).
"""

from __future__ import annotations

import torch

NORMS = ("linf", "l2")


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` (one per point) shaped to broadcast over ``like``'s points."""
    return values.view(-1, *[1] * (like.dim() - 1))


def perturbation_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """The size of each point's perturbation (first dimension: points) in ``norm``."""
    flat = delta.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1)


def project(
    x: torch.Tensor, x0: torch.Tensor, *, norm: str, eps: float, bounds: tuple[float, float] | None = None
) -> torch.Tensor:
    """``x`` moved onto the eps-ball around ``x0`` (l_inf: clipped; l_2: ``x - x0`` scaled by
    ``min(1, eps / ||x - x0||)``, safe for eps = 0), then into ``bounds`` where given."""
    if norm == "linf":
        x = torch.minimum(torch.maximum(x, x0 - eps), x0 + eps)
    else:
        delta = x - x0
        size = delta.flatten(1).norm(dim=1)
        x = x0 + delta * per_sample((eps / size.clamp_min(1e-12)).clamp(max=1.0), delta)
    return x if bounds is None else x.clamp(*bounds)


def project_perturbation(
    x0: torch.Tensor, x: torch.Tensor, *, norm: str, eps: float, bounds: tuple[float, float]
) -> torch.Tensor:
    """``x``'s perturbation ``x - x0`` moved onto the eps-ball (l_inf: clipped; l_2: scaled to eps where
    longer) and added back to ``x0``, then into ``bounds``."""
    delta = x - x0
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        size = per_sample(delta.flatten(1).norm(dim=1), delta)
        delta = delta * torch.where(size > eps, eps / size, torch.ones_like(size))
    return (x0 + delta).clamp(*bounds)
