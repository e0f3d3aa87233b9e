"""Invariance attacks: change the true label while the model's prediction may stay put.

- ``invariance-linf``: Tramèr et al.'s excessive-invariance search in the l_inf ball. For each test
  point and each other class, the nearest training image of that class over a grid of shifts and
  rotations of the point (775 queries), aligned back by the inverse transform, projected into the
  eps-ball; among the allowed target classes the candidate that removes the least ink is kept.
- ``invariance-l0``: binarised images; the nearest other-class training image over random affine
  copies of the training set, then the subset of connected clusters of differing pixels, within a
  budget of k changed pixels, that the oracle finds most convincingly the target class.
- ``metameric``: Jacobsen et al.'s metamers F^-1(z_s(x_a), z_n(x_b)) for invertible models; for other
  models, gradient metamers: from x_b, inside an eps-ball around it, match the model's logits on x_a.

Candidates are judged by an oracle (see ``oracles.py``), never by the attacked model. The search
steps that do not depend on the model (nearest neighbours) are cached per data set and points.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from invarbench.attacks.base import Attack, frozen_parameters, register_attack
from invarbench.attacks.neighbours import ClassIndex, nearest_per_class
from invarbench.attacks.oracles import ABSTAIN, Oracle
from invarbench.errors import ConfigError
from invarbench.io import atomic_write

# Tramèr et al.'s allowed target classes for the l_inf search: the changes a person reads as a new digit.
TRAMER_TARGETS = {0: (4, 6, 8, 9), 1: (4, 6, 7, 9), 2: (8,), 3: (8,), 4: (8, 9), 5: (3, 8), 6: (0,), 7: (2, 3), 8: (3,), 9: (3, 4, 5)}
SHIFTS = (-3.0, -1.5, 0.0, 1.5, 3.0)
ROTATIONS = tuple(float(angle) for angle in range(-30, 31, 2))


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


@dataclass
class InvarianceContext:
    """What an invariance attack needs beyond the model and points: the data set (training images are
    the source of candidates), the oracle, the points' indices in the test set and a cache folder."""

    dataset: Any
    oracle: Oracle | None
    indices: torch.Tensor
    cache_dir: Path | None = None


class InvarianceAttack(Attack):
    kind: ClassVar[str] = "invariance"
    norms: ClassVar[tuple[str, ...]] = ("linf",)
    #: False for attacks that bring their own judge (fixed sets with people's labels).
    needs_oracle: ClassVar[bool] = True
    context: InvarianceContext | None = None

    def threat_norm(self, threat_norm: str, invertible: bool) -> str | None:
        """The norm of the job this attack runs in for a configured threat norm, or None to skip it."""
        return threat_norm if threat_norm in self.norms else None

    def budgets(self) -> tuple[float, ...]:
        """The eps values of a job under the attack's own pseudo-norm (l_0 budget; 0 for exact metamers)."""
        return (0.0,)

    def __call__(self, model, images, labels, *, norm, epsilons, seed=0, active=None) -> InvarianceResult:
        if self.context is None:
            raise ConfigError(f"attack {self.name!r} needs a data set and an oracle; run it through `invarbench run` (or set .context)")
        if len(images) != len(labels):
            raise ConfigError(f"attack {self.name!r} got {len(images)} images but {len(labels)} labels")
        with frozen_parameters(model):
            return self.run(_on_cpu_tensors(model), images, labels, norm=norm, epsilons=tuple(float(eps) for eps in epsilons), seed=seed, active=active)

    def _judge(self, model, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = candidates.reshape(-1, *candidates.shape[2:])
        with torch.no_grad():
            predictions = torch.cat([model(flat[start : start + 500]).argmax(1) for start in range(0, len(flat), 500)]) if len(flat) else torch.zeros(0, dtype=torch.long)
        oracle_labels = self.context.oracle.label(flat) if len(flat) else torch.zeros(0, dtype=torch.long)
        return oracle_labels.view(candidates.shape[:2]), predictions.cpu().view(candidates.shape[:2])


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
    from invarbench.evaluation import model_device

    device = model_device(model)
    return model if device.type == "cpu" else _DeviceBridge(model, device)


# ---------------------------------------------------------------------------- transforms of images


def transform_grid(shifts=SHIFTS, rotations=ROTATIONS) -> torch.Tensor:
    """(T, 3) rows of (shift_x, shift_y, degrees): 5 x 5 shifts x 31 rotations = 775 by default."""
    return torch.tensor([(dx, dy, angle) for angle in rotations for dy in shifts for dx in shifts], dtype=torch.float32)


def affine_matrices(parameters: torch.Tensor, size: int, *, scale: torch.Tensor | None = None, shear: torch.Tensor | None = None, inverse: bool = False) -> torch.Tensor:
    """``affine_grid`` matrices (T, 2, 3) for shifts in pixels, rotations in degrees (and optional
    scale and shear): output pixel p samples the input at A p + b (normalised coordinates)."""
    angles = parameters[:, 2] * math.pi / 180
    cos, sin = torch.cos(angles), torch.sin(angles)
    linear = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    if shear is not None:
        shear_matrix = torch.zeros(len(parameters), 2, 2)
        shear_matrix[:, 0, 0] = shear_matrix[:, 1, 1] = 1
        shear_matrix[:, 0, 1] = shear
        linear = linear @ shear_matrix
    if scale is not None:
        linear = linear / scale.view(-1, 1, 1)
    # A shift of s pixels moves the content by s: sample the input s pixels back (2/size per pixel).
    offset = -parameters[:, :2] * 2 / size
    offset = (linear @ offset.unsqueeze(-1)).squeeze(-1)
    if inverse:
        linear_inverse = torch.linalg.inv(linear)
        return torch.cat([linear_inverse, (-linear_inverse @ offset.unsqueeze(-1))], dim=2)
    return torch.cat([linear, offset.unsqueeze(-1)], dim=2)


def warp(images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Apply one matrix per image ((N, C, H, W) and (N, 2, 3)), bilinear, zero outside."""
    grid = F.affine_grid(matrices, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# Part of every cache key: bump it when a cached search step changes, so old results are not reused.
CACHE_VERSION = 1


def _cache_path(cache_dir: Path | None, *parts: Any) -> Path | None:
    if cache_dir is None:
        return None
    key = hashlib.sha256(repr((CACHE_VERSION, *parts)).encode()).hexdigest()[:16]
    return cache_dir / f"{parts[0]}-{key}.pt"


def _cached(path: Path | None, compute):
    if path is not None and path.exists():
        return torch.load(path)
    value = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(value, tmp))
    return value


def _is_image(images: torch.Tensor) -> bool:
    return images.dim() == 4 and images.shape[-1] == images.shape[-2] and images.shape[-1] >= 8


def search_neighbours(images: torch.Tensor, train_images: torch.Tensor, train_labels: torch.Tensor, num_classes: int, *, transforms: torch.Tensor | None, points_per_chunk: int = 4) -> dict[str, torch.Tensor]:
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

    def __init__(self, *, targets: str = "tramer", search: str = "auto", shifts: tuple[float, ...] = SHIFTS, rotations: tuple[float, ...] = ROTATIONS, oracle_steps: int = 20):
        if targets not in ("tramer", "all"):
            raise ConfigError(f"invariance-linf targets={targets!r}: use 'tramer' (the published allowed map) or 'all' (every other class)")
        if search not in ("auto", "neighbours", "oracle-gradient"):
            raise ConfigError(f"invariance-linf search={search!r}: use auto, neighbours (Tramèr et al.) or oracle-gradient (exact oracles with a margin)")
        self.targets = targets
        self.search = search
        self.oracle_steps = oracle_steps
        self.shifts = tuple(float(value) for value in shifts)
        self.rotations = tuple(float(value) for value in rotations)

    def run(self, model, images, labels, *, norm, epsilons, seed, active):
        context = self.context
        dataset = context.dataset
        margin = getattr(context.oracle, "margin", None)
        search = self.search if self.search != "auto" else ("oracle-gradient" if margin is not None else "neighbours")
        if search == "oracle-gradient":
            if margin is None:
                raise ConfigError(f"invariance-linf search=oracle-gradient needs an exact oracle with a margin; {context.oracle.name} has none (use search=neighbours)")
            return self._oracle_gradient(model, images, labels, epsilons, margin)
        transforms = transform_grid(self.shifts, self.rotations)
        path = _cache_path(context.cache_dir, "neighbours", dataset.source, dataset.name, context.indices.tolist(), self.shifts, self.rotations)
        found = _cached(path, lambda: search_neighbours(images, dataset.train_images, dataset.train_labels, dataset.num_classes, transforms=transforms))
        low, high = model.bounds
        count, classes = len(labels), dataset.num_classes
        aligned = []
        for label in range(classes):
            # Each point's class-`label` neighbour, aligned back onto the point by the inverse of the best transform.
            neighbours = dataset.train_images[found["index"][:, label].clamp_min(0)]
            if _is_image(images):
                neighbours = warp(neighbours, affine_matrices(transforms[found["transform"][:, label]], images.shape[-1], inverse=True))
            aligned.append(neighbours)
        allowed = torch.zeros(count, classes, dtype=torch.bool)
        for point, label in enumerate(labels.tolist()):
            allowed[point, list(allowed_targets(label, classes, self.targets))] = True
        allowed &= found["index"] >= 0
        candidates = torch.empty(len(epsilons), *images.shape)
        targets = torch.empty(len(epsilons), count, dtype=torch.long)
        for eps_index, eps in enumerate(epsilons):
            projected = torch.stack([torch.min(torch.max(aligned[label], images - eps), images + eps).clamp(low, high) for label in range(classes)], dim=1)
            ink = (images.unsqueeze(1) - projected).clamp_min(0).flatten(2).sum(2)
            ink = torch.where(allowed, ink, torch.full_like(ink, float("inf")))
            targets[eps_index] = ink.argmin(dim=1)
            candidates[eps_index] = projected[torch.arange(count), targets[eps_index]]
        # A point with no allowed target that has training images keeps itself as its candidate.
        stranded = ~allowed.any(dim=1)
        candidates[:, stranded] = images[stranded]
        sources = torch.where(stranded, -1, found["index"].gather(1, targets.T).T)
        targets[:, stranded] = -1
        return self._finish(model, images, labels, candidates, epsilons, targets, sources, norm="linf")

    def _oracle_gradient(self, model, images, labels, epsilons, margin):
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
                    candidate = torch.min(torch.max(candidate + eps / 4 * gradient.sign(), images - eps), images + eps).clamp(low, high)
            candidates[eps_index] = candidate.detach()
        oracle_labels = self.context.oracle.label(candidates.flatten(0, 1)).view(len(epsilons), -1)
        targets = torch.where(oracle_labels != labels, oracle_labels, torch.full_like(oracle_labels, -1))
        return self._finish(model, images, labels, candidates, epsilons, targets, torch.full_like(targets, -1), norm="linf")

    def _finish(self, model, images, labels, candidates, epsilons, targets, sources, *, norm):
        oracle_labels, predictions = self._judge(model, candidates)
        delta = (candidates - images.unsqueeze(0)).flatten(2)
        norms = delta.abs().amax(2) if norm == "linf" else (delta != 0).sum(2).float()
        count = len(labels)
        return InvarianceResult(
            self.name, norm, epsilons, candidates, targets, sources, self.context.oracle.name, oracle_labels, predictions, norms, torch.full((len(epsilons), count), float("nan")), self.options(),
        )


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

    def threat_norm(self, threat_norm: str, invertible: bool) -> str | None:
        if invertible:
            # Exact metamers do not depend on a ball: one job, whatever threats are configured.
            return "metamer" if threat_norm == "linf" or threat_norm == "metamer" else None
        return threat_norm if threat_norm in self.norms else None

    def run(self, model, images, labels, *, norm, epsilons, seed, active):
        partners = metamer_partners(labels)
        has_partner = partners >= 0
        partner_positions = partners.clamp_min(0)
        sources = torch.where(has_partner, self.context.indices[partner_positions], torch.full_like(partners, -1))
        targets = torch.where(has_partner, labels[partner_positions], torch.full_like(partners, -1))
        low, high = model.bounds
        with torch.no_grad():
            wanted_logits = model(images)
        if norm == "metamer":
            if not getattr(model, "invertible", False):
                raise ConfigError(f"exact metamers need an invertible model; {getattr(model, 'name', 'this model')} is not (gradient metamers run with --threat linf:EPS)")
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
                            candidate = torch.min(torch.max(candidate, starts - eps), starts + eps)
                        else:
                            shape = (-1, *[1] * (images.dim() - 1))
                            candidate = candidate - step * gradient / gradient.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
                            delta = candidate - starts
                            candidate = starts + delta * (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1).view(shape)
                        candidate = candidate.clamp(low, high)
                candidates[eps_index] = candidate.detach()
                with torch.no_grad():
                    logit_errors[eps_index] = (model(candidates[eps_index]) - wanted_logits).abs().amax(1)
            delta = (candidates - starts.unsqueeze(0)).flatten(2)
            norms = delta.abs().amax(2) if norm == "linf" else delta.norm(dim=2)
        oracle_labels, predictions = self._judge(model, candidates)
        # Points without a partner get no metamer: the oracle label counts as an abstention.
        oracle_labels[:, ~has_partner] = ABSTAIN
        return InvarianceResult(self.name, norm, epsilons, candidates, targets.repeat(len(epsilons), 1), sources.repeat(len(epsilons), 1), self.context.oracle.name, oracle_labels, predictions, norms, logit_errors, self.options())


def random_affine_copies(images: torch.Tensor, copies: int, *, seed: int, max_degrees: float = 15.0, max_shift: float = 2.0, scale_range: tuple[float, float] = (0.9, 1.1), max_shear: float = 0.2, batch: int = 10_000) -> torch.Tensor:
    """``copies`` random affine versions (rotation, scale, shear, shift) of every image, stacked after
    each other: (copies * N, C, H, W)."""
    generator = torch.Generator().manual_seed(seed)
    size = images.shape[-1]
    result = []
    for _ in range(copies):
        count = len(images)
        parameters = torch.stack([(torch.rand(count, generator=generator) * 2 - 1) * max_shift, (torch.rand(count, generator=generator) * 2 - 1) * max_shift, (torch.rand(count, generator=generator) * 2 - 1) * max_degrees], dim=1)
        scale = scale_range[0] + torch.rand(count, generator=generator) * (scale_range[1] - scale_range[0])
        shear = (torch.rand(count, generator=generator) * 2 - 1) * max_shear
        matrices = affine_matrices(parameters, size, scale=scale, shear=shear)
        result.extend(warp(images[start : start + batch], matrices[start : start + batch]) for start in range(0, count, batch))
    return torch.cat(result)


@register_attack
class InvarianceL0(InvarianceAttack):
    """Tramèr et al.'s l_0 excessive-invariance search on binarised images (threshold 0.5).

    The nearest training image of another class (Hamming distance, over the training set and
    ``copies`` random affine copies of it) gives the pixels that differ; they are grouped into
    8-connected clusters and, among subsets of the ``max_clusters`` largest clusters that change at
    most ``pixels`` pixels, the one the oracle scores highest for the neighbour's class is applied.
    The perturbation norm is the number of changed pixels, counted from the binarised test image.
    """

    name = "invariance-l0"
    norms = ("l0",)

    def __init__(self, *, pixels: int = 25, copies: int = 3, max_clusters: int = 6, threshold: float = 0.5):
        if pixels < 1:
            raise ConfigError(f"invariance-l0 pixels={pixels} must be a positive number of pixels")
        self.pixels = pixels
        self.copies = copies
        self.max_clusters = max_clusters
        self.threshold = threshold

    def threat_norm(self, threat_norm: str, invertible: bool) -> str | None:
        # Its own budget, once, whatever norm-ball threats are configured.
        return "l0"

    def budgets(self) -> tuple[float, ...]:
        return (float(self.pixels),)

    def run(self, model, images, labels, *, norm, epsilons, seed, active):
        from scipy import ndimage

        context = self.context
        dataset = context.dataset
        if not _is_image(images):
            raise ConfigError(f"invariance-l0 works on images; data set {dataset.name!r} has inputs of shape {tuple(images.shape[1:])}")
        binary = (images > self.threshold).float()

        def search():
            references = dataset.train_images
            reference_labels = dataset.train_labels
            if self.copies:
                references = torch.cat([references, random_affine_copies(references, self.copies, seed=0)])
                reference_labels = reference_labels.repeat(self.copies + 1)
            distances, indices = nearest_per_class(binary.flatten(1), (references > self.threshold).float().flatten(1), reference_labels, dataset.num_classes, chunk_size=256)
            distances[torch.arange(len(labels)), labels] = float("inf")
            target = distances.argmin(1)
            chosen = indices[torch.arange(len(labels)), target]
            return {"target": target, "neighbour": (references[chosen] > self.threshold).float(), "source": chosen % len(dataset.train_labels)}

        path = _cache_path(context.cache_dir, "l0-neighbours", dataset.source, dataset.name, context.indices.tolist(), self.copies, self.threshold)
        found = _cached(path, search)
        score = getattr(context.oracle, "probabilities", None)
        candidates = binary.clone()
        for point in range(len(labels)):
            difference = (binary[point, 0] != found["neighbour"][point, 0]).numpy()
            clusters, count = ndimage.label(difference, structure=np.ones((3, 3)))
            sizes = np.bincount(clusters.ravel())[1:]
            usable = [cluster + 1 for cluster in np.argsort(-sizes, kind="stable") if sizes[cluster] <= self.pixels][: self.max_clusters]
            options = []
            for subset_size in range(1, len(usable) + 1):
                for subset in itertools.combinations(usable, subset_size):
                    if sum(sizes[cluster - 1] for cluster in subset) <= self.pixels:
                        mask = torch.from_numpy(np.isin(clusters, subset))
                        options.append(torch.where(mask, found["neighbour"][point, 0], binary[point, 0]))
            if not options:
                continue
            stacked = torch.stack(options).unsqueeze(1)
            target = int(found["target"][point])
            if score is not None:
                scores = score(stacked)[:, target]
            else:
                scores = (context.oracle.label(stacked) == target).float()
            candidates[point] = stacked[int(scores.argmax())]
        oracle_labels, predictions = self._judge(model, candidates.unsqueeze(0))
        norms = (candidates != binary).flatten(1).sum(1).float().unsqueeze(0)
        return InvarianceResult(self.name, "l0", (float(self.pixels),), candidates.unsqueeze(0), found["target"].unsqueeze(0), found["source"].unsqueeze(0), context.oracle.name, oracle_labels, predictions, norms, torch.full((1, len(labels)), float("nan")), self.options())


@register_attack
class InvarianceSetAttack(InvarianceAttack):
    """Evaluate on a fixed set of changed images with people's labels (``invarbench run --invariance-set
    DIR``): each set in DIR is one pseudo-eps (its position), each image the candidate of the test
    point it was made from, judged by that set's label-file oracle."""

    name = "invariance-set"
    norms = ("set",)
    needs_oracle = False

    def __init__(self, *, directory: str = ""):
        if not directory:
            raise ConfigError("invariance-set needs directory=DIR (a folder of NAME.npy + NAME_labels.npy files); use --invariance-set DIR")
        self.directory = str(directory)

    def sets(self):
        from invarbench.attacks.oracles import load_invariance_sets

        return load_invariance_sets(self.directory)

    def threat_norm(self, threat_norm: str, invertible: bool) -> str | None:
        return "set"

    def budgets(self) -> tuple[float, ...]:
        return tuple(float(position) for position in range(len(self.sets())))

    def run(self, model, images, labels, *, norm, epsilons, seed, active):
        from invarbench.attacks.oracles import LabelFileOracle

        sets = self.sets()
        indices = self.context.indices
        count = len(labels)
        candidates = images.unsqueeze(0).repeat(len(epsilons), *[1] * images.dim()).clone()
        ran = torch.zeros(len(epsilons), count, dtype=torch.bool)
        oracle_labels = torch.full((len(epsilons), count), ABSTAIN, dtype=torch.long)
        sources = torch.full((len(epsilons), count), -1, dtype=torch.long)
        names = []
        for eps_index, eps in enumerate(epsilons):
            item = sets[int(eps)]
            names.append(LabelFileOracle([item]).name)
            position = {int(index): row for row, index in enumerate(item.original_indices.tolist())}
            for point, index in enumerate(indices.tolist()):
                if index in position:
                    row = position[index]
                    candidates[eps_index, point] = item.images[row].view(images.shape[1:])
                    oracle_labels[eps_index, point] = int(item.labels[row])
                    sources[eps_index, point] = row
                    ran[eps_index, point] = True
        with torch.no_grad():
            predictions = torch.stack([model(candidates[e]).argmax(1).cpu() for e in range(len(epsilons))])
        norms = (candidates - images.unsqueeze(0)).flatten(2).abs().amax(2)
        targets = torch.where(ran & (oracle_labels != labels), oracle_labels, torch.full_like(oracle_labels, -1))
        return InvarianceResult(self.name, "set", epsilons, candidates, targets, sources, names[0] if names else "label-file", oracle_labels, predictions, norms, torch.full((len(epsilons), count), float("nan")), self.options(), ran=ran, oracles=tuple(names))
