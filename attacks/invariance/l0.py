"""``invariance-l0``: Tramèr et al.'s l_0 excessive-invariance search on binarised images."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from invarbench.attacks.base import Budget, ThreatModel, register_attack
from invarbench.attacks.invariance.base import InvarianceAttack, InvarianceResult
from invarbench.attacks.invariance.transforms import _cache_path, _cached, _is_image, random_affine_copies
from invarbench.attacks.neighbours import nearest_per_class
from invarbench.errors import ConfigError


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

    def budgets(self, threat: ThreatModel, invertible: bool) -> tuple[Budget, ...]:
        # Its own budget, once, whatever norm-ball threats are configured.
        return (Budget("l0", self.pixels),)

    def run(self, model, images, labels, *, norm, epsilons, seed, active, context):
        from scipy import ndimage

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
        oracle_labels, predictions, margins = self._judge(model, candidates.unsqueeze(0), context.oracle)
        norms = (candidates != binary).flatten(1).sum(1).float().unsqueeze(0)
        return InvarianceResult(self.name, "l0", (float(self.pixels),), candidates.unsqueeze(0), found["target"].unsqueeze(0), found["source"].unsqueeze(0), context.oracle.name, oracle_labels, predictions, norms, torch.full((1, len(labels)), float("nan")), self.options(), **margins)
