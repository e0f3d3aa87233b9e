"""``invariance-l0``: Tramèr et al.'s l_0 excessive-invariance search on binarised images, chosen by a guide."""

from __future__ import annotations

import itertools
from abc import abstractmethod
from collections.abc import Callable

import numpy as np
import torch

from invarbench.attacks.base import Budget, ThreatModel, register_attack
from invarbench.attacks.invariance.base import InvarianceAttack, InvarianceContext, InvarianceResult
from invarbench.attacks.invariance.guide import DEFAULT_GUIDE, guide_references, load_guide
from invarbench.attacks.invariance.transforms import _cache_path, _cached, _is_image, random_affine_copies
from invarbench.errors import ConfigError
from invarbench.neighbours import nearest_per_class


class L0ClusterSearch(InvarianceAttack):
    """Tramèr et al.'s l_0 excessive-invariance search on binarised images (threshold 0.5).

    The nearest training image of another class (Hamming distance, over the training set and
    ``copies`` random affine copies of it) gives the pixels that differ; they are grouped into
    8-connected clusters and, among subsets of the ``max_clusters`` largest clusters that change at
    most ``pixels`` pixels, the one that scores highest for the neighbour's class is applied (what scores
    them is the subclass's: a guide, or in the former search the judge). The perturbation norm is the
    number of changed pixels, counted from the binarised test image.
    """

    norms = ("l0",)

    def __init__(self, *, pixels: int = 25, copies: int = 3, max_clusters: int = 6, threshold: float = 0.5):
        if pixels < 1:
            raise ConfigError(f"{self.name} pixels={pixels} must be a positive number of pixels")
        self.pixels = pixels
        self.copies = copies
        self.max_clusters = max_clusters
        self.threshold = threshold

    def budgets(self, threat: ThreatModel, invertible: bool) -> tuple[Budget, ...]:
        # Its own budget, once, whatever norm-ball threats are configured.
        return (Budget("l0", self.pixels),)

    @abstractmethod
    def scorer(self, context: InvarianceContext) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """What scores a point's candidate images (options, 1, H, W) for its target class."""

    def run(self, model, images, labels, *, norm, epsilons, seed, context):
        from scipy import ndimage

        dataset = context.dataset
        if not _is_image(images):
            raise ConfigError(
                f"{self.name} works on images; data set {dataset.name!r} has inputs of shape {tuple(images.shape[1:])}"
            )
        # Before the neighbour search: a refused guide is refused at once.
        score = self.scorer(context)
        binary = (images > self.threshold).float()

        def search():
            references = dataset.train_images
            reference_labels = dataset.train_labels
            if self.copies:
                references = torch.cat([references, random_affine_copies(references, self.copies, seed=0)])
                reference_labels = reference_labels.repeat(self.copies + 1)
            distances, indices = nearest_per_class(
                binary.flatten(1),
                (references > self.threshold).float().flatten(1),
                reference_labels,
                dataset.num_classes,
                chunk_size=256,
            )
            distances[torch.arange(len(labels)), labels] = float("inf")
            target = distances.argmin(1)
            chosen = indices[torch.arange(len(labels)), target]
            return {
                "target": target,
                "neighbour": (references[chosen] > self.threshold).float(),
                "source": chosen % len(dataset.train_labels),
            }

        path = _cache_path(
            context.cache_dir,
            "l0-neighbours",
            dataset.source,
            dataset.name,
            context.indices.tolist(),
            self.copies,
            self.threshold,
        )
        found = _cached(path, search)
        candidates = binary.clone()
        for point in range(len(labels)):
            difference = (binary[point, 0] != found["neighbour"][point, 0]).numpy()
            clusters, count = ndimage.label(difference, structure=np.ones((3, 3)))
            sizes = np.bincount(clusters.ravel())[1:]
            usable = [cluster + 1 for cluster in np.argsort(-sizes, kind="stable") if sizes[cluster] <= self.pixels][
                : self.max_clusters
            ]
            options = []
            for subset_size in range(1, len(usable) + 1):
                for subset in itertools.combinations(usable, subset_size):
                    if sum(sizes[cluster - 1] for cluster in subset) <= self.pixels:
                        mask = torch.from_numpy(np.isin(clusters, subset))
                        options.append(torch.where(mask, found["neighbour"][point, 0], binary[point, 0]))
            if not options:
                continue
            stacked = torch.stack(options).unsqueeze(1)
            candidates[point] = stacked[int(score(stacked, int(found["target"][point])).argmax())]
        oracle_labels, predictions, margins = self._judge(model, candidates.unsqueeze(0), context.oracle)
        norms = (candidates != binary).flatten(1).sum(1).float().unsqueeze(0)
        return InvarianceResult(
            self.name,
            "l0",
            (float(self.pixels),),
            candidates.unsqueeze(0),
            found["target"].unsqueeze(0),
            found["source"].unsqueeze(0),
            context.oracle.name,
            oracle_labels,
            predictions,
            norms,
            torch.full((1, len(labels)), float("nan")),
            self.options(),
            **margins,
        )


@register_attack
class InvarianceL0(L0ClusterSearch):
    """The l_0 search guided by ``guide``: a model reference (registered name or checkpoint file), or several
    joined by '+' whose mean softmax chooses. A guide that is the judging oracle or one of its members is
    refused: the judge only judges."""

    name = "invariance-l0"

    def __init__(
        self,
        *,
        pixels: int = 25,
        copies: int = 3,
        max_clusters: int = 6,
        threshold: float = 0.5,
        guide: str | list[str] = DEFAULT_GUIDE,
    ):
        super().__init__(pixels=pixels, copies=copies, max_clusters=max_clusters, threshold=threshold)
        self.guide = "+".join(guide_references(guide))

    def scorer(self, context):
        dataset, oracle = context.dataset, context.oracle
        guide = load_guide(
            self.name, self.guide, judge=oracle.name, judge_members=getattr(oracle, "member_checkpoints", {})
        )
        guide.check_fits(self.name, dataset.name, dataset.num_classes)
        return lambda candidates, target: guide.probabilities(candidates)[:, target]


@register_attack
class InvarianceL0JudgeGuided(L0ClusterSearch):
    """The former l_0 search, which chose among the candidates by its judge: the oracle's mean softmax
    (or, for an oracle without one, whether it reads the target class). Its changed counts are inflated by
    candidates made to please the judge. Kept to re-check the entries stored by it (their settings record
    no guide; ``invarbench check`` re-runs them with it) and to compare with the guided search."""

    name = "invariance-l0-judge-guided"

    def scorer(self, context):
        oracle = context.oracle
        probabilities = getattr(oracle, "probabilities", None)
        if probabilities is not None:
            return lambda candidates, target: probabilities(candidates)[:, target]
        return lambda candidates, target: (oracle.label(candidates) == target).float()
