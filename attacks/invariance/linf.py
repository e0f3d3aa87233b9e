"""``invariance-linf``: Tramèr et al.'s excessive-invariance search in the l_inf ball."""

from __future__ import annotations

import torch

from invarbench.attacks.base import register_attack
from invarbench.attacks.invariance.base import InvarianceAttack, InvarianceResult
from invarbench.attacks.invariance.transforms import (
    ROTATIONS,
    SHIFTS,
    _cache_path,
    _cached,
    _is_image,
    affine_matrices,
    transform_grid,
    warp,
)
from invarbench.attacks.norms import project
from invarbench.errors import ConfigError
from invarbench.neighbours import ClassIndex, nearest_per_class

# Tramèr et al.'s allowed target classes for the l_inf search: the changes a person reads as a new digit.
TRAMER_TARGETS = {
    0: (4, 6, 8, 9),
    1: (4, 6, 7, 9),
    2: (8,),
    3: (8,),
    4: (8, 9),
    5: (3, 8),
    6: (0,),
    7: (2, 3),
    8: (3,),
    9: (3, 4, 5),
}


def search_neighbours(
    images: torch.Tensor,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    *,
    transforms: torch.Tensor | None,
    points_per_chunk: int = 4,
) -> dict[str, torch.Tensor]:
    """For every point and class: the nearest training image of that class over the transforms of the
    point. Returns distance, train index and transform index, each (points, classes)."""
    count = len(images)
    if transforms is None or not _is_image(images):
        distances, indices = nearest_per_class(images.flatten(1), train_images.flatten(1), train_labels, num_classes)
        return {"distance": distances, "index": indices, "transform": torch.zeros_like(indices)}
    size = images.shape[-1]
    matrices = affine_matrices(transforms, size)
    count_transforms = len(transforms)
    best_distance = torch.empty(count, num_classes)
    best_index = torch.empty(count, num_classes, dtype=torch.long)
    best_transform = torch.empty(count, num_classes, dtype=torch.long)
    # Sorted and normed once: re-doing it per chunk copied the whole training set 125 times for 500 points.
    index = ClassIndex(train_images, train_labels, num_classes)
    for start in range(0, count, points_per_chunk):
        chunk = images[start : start + points_per_chunk]
        repeated = chunk.repeat_interleave(count_transforms, dim=0)
        queries = warp(repeated, matrices.repeat(len(chunk), 1, 1))
        distances, indices = index.nearest(queries, chunk_size=4096)
        distances = distances.view(len(chunk), count_transforms, num_classes)
        indices = indices.view(len(chunk), count_transforms, num_classes)
        value, transform = distances.min(dim=1)
        best_distance[start : start + len(chunk)] = value
        best_transform[start : start + len(chunk)] = transform
        best_index[start : start + len(chunk)] = indices.gather(1, transform.unsqueeze(1)).squeeze(1)
    return {"distance": best_distance, "index": best_index, "transform": best_transform}


def allowed_targets(label: int, num_classes: int, targets: str) -> tuple[int, ...]:
    if targets == "tramer" and num_classes == 10:
        return TRAMER_TARGETS[label]
    return tuple(c for c in range(num_classes) if c != label)


@register_attack
class InvarianceLinf(InvarianceAttack):
    """Tramèr et al.'s l_inf excessive-invariance search (nearest neighbour, align, project, least ink)."""

    name = "invariance-linf"

    def __init__(
        self,
        *,
        targets: str = "tramer",
        search: str = "auto",
        shifts: tuple[float, ...] = SHIFTS,
        rotations: tuple[float, ...] = ROTATIONS,
        oracle_steps: int = 20,
    ):
        if targets not in ("tramer", "all"):
            raise ConfigError(
                f"invariance-linf targets={targets!r}: use 'tramer' (the published allowed map) or 'all' (every other"
                " class)"
            )
        if search not in ("auto", "neighbours", "oracle-gradient"):
            raise ConfigError(
                f"invariance-linf search={search!r}: use auto, neighbours (Tramèr et al.) or oracle-gradient (exact"
                " oracles with a margin)"
            )
        self.targets = targets
        self.search = search
        self.oracle_steps = oracle_steps
        self.shifts = tuple(float(value) for value in shifts)
        self.rotations = tuple(float(value) for value in rotations)

    def run(self, model, images, labels, *, norm, epsilons, seed, context):
        dataset = context.dataset
        # The one search that chooses by its judge: only an exact oracle has a margin, a synthetic data set's
        # own labelling function, which has no errors for the search to exploit (its climb is the exact optimum).
        margin = getattr(context.oracle, "margin", None)
        search = self.search if self.search != "auto" else ("oracle-gradient" if margin is not None else "neighbours")
        if search == "oracle-gradient":
            if margin is None:
                raise ConfigError(
                    f"invariance-linf search=oracle-gradient needs an exact oracle with a margin; {context.oracle.name}"
                    " has none (use search=neighbours)"
                )
            return self._oracle_gradient(model, images, labels, epsilons, margin, context.oracle)
        transforms = transform_grid(self.shifts, self.rotations)
        path = _cache_path(
            context.cache_dir,
            "neighbours",
            dataset.source,
            dataset.name,
            context.indices.tolist(),
            self.shifts,
            self.rotations,
        )
        found = _cached(
            path,
            lambda: search_neighbours(
                images, dataset.train_images, dataset.train_labels, dataset.num_classes, transforms=transforms
            ),
        )
        low, high = model.bounds
        count, classes = len(labels), dataset.num_classes
        aligned = []
        for label in range(classes):
            # Each point's class-`label` neighbour, aligned back onto the point by the inverse of the best transform.
            neighbours = dataset.train_images[found["index"][:, label].clamp_min(0)]
            if _is_image(images):
                neighbours = warp(
                    neighbours,
                    affine_matrices(transforms[found["transform"][:, label]], images.shape[-1], inverse=True),
                )
            aligned.append(neighbours)
        allowed = torch.zeros(count, classes, dtype=torch.bool)
        for point, label in enumerate(labels.tolist()):
            allowed[point, list(allowed_targets(label, classes, self.targets))] = True
        allowed &= found["index"] >= 0
        candidates = torch.empty(len(epsilons), *images.shape)
        targets = torch.empty(len(epsilons), count, dtype=torch.long)
        for eps_index, eps in enumerate(epsilons):
            projected = torch.stack(
                [project(aligned[label], images, norm="linf", eps=eps, bounds=(low, high)) for label in range(classes)],
                dim=1,
            )
            ink = (images.unsqueeze(1) - projected).clamp_min(0).flatten(2).sum(2)
            ink = torch.where(allowed, ink, torch.full_like(ink, float("inf")))
            targets[eps_index] = ink.argmin(dim=1)
            candidates[eps_index] = projected[torch.arange(count), targets[eps_index]]
        # A point with no allowed target that has training images keeps itself as its candidate.
        stranded = ~allowed.any(dim=1)
        candidates[:, stranded] = images[stranded]
        sources = torch.where(stranded, -1, found["index"].gather(1, targets.T).T)
        targets[:, stranded] = -1
        return self._finish(model, images, labels, candidates, epsilons, targets, sources, context.oracle, norm="linf")

    def _oracle_gradient(self, model, images, labels, epsilons, margin, oracle):
        """Exact search on synthetic data: sign-gradient ascent on the oracle's margin inside the ball.
        On the spheres one step already reaches the optimum x + eps sign(x) (inner) or x - eps sign(x)."""
        low, high = model.bounds
        candidates = torch.empty(len(epsilons), *images.shape)
        for eps_index, eps in enumerate(epsilons):
            candidate = images.clone()
            for _ in range(self.oracle_steps):
                candidate.requires_grad_(True)
                (gradient,) = torch.autograd.grad(margin(candidate, labels).sum(), candidate)
                with torch.no_grad():
                    candidate = project(
                        candidate + eps / 4 * gradient.sign(), images, norm="linf", eps=eps, bounds=(low, high)
                    )
            candidates[eps_index] = candidate.detach()
        oracle_labels = oracle.label(candidates.flatten(0, 1)).view(len(epsilons), -1)
        targets = torch.where(oracle_labels != labels, oracle_labels, torch.full_like(oracle_labels, -1))
        return self._finish(
            model, images, labels, candidates, epsilons, targets, torch.full_like(targets, -1), oracle, norm="linf"
        )

    def _finish(self, model, images, labels, candidates, epsilons, targets, sources, oracle, *, norm):
        oracle_labels, predictions, margins = self._judge(model, candidates, oracle)
        delta = (candidates - images.unsqueeze(0)).flatten(2)
        norms = delta.abs().amax(2) if norm == "linf" else (delta != 0).sum(2).float()
        count = len(labels)
        return InvarianceResult(
            self.name,
            norm,
            epsilons,
            candidates,
            targets,
            sources,
            oracle.name,
            oracle_labels,
            predictions,
            norms,
            torch.full((len(epsilons), count), float("nan")),
            self.options(),
            **margins,
        )
