"""Training recipes: standard training, PGD adversarial training (Madry et al.), l_inf and l_2, the iCE
objective for invertible networks, and ``reader`` (standard training on images augmented with the changes
a person reading a digit does not notice, for oracle members; see ``augmentation.py``).

Training is deterministic given the card's seed and thread count on CPU, so
``invarbench models train NAME`` reproduces a committed checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from invarbench.attacks.norms import project
from invarbench.datasets import load_dataset
from invarbench.environment import resolve_device
from invarbench.errors import ConfigError
from invarbench.measure import measure_card
from invarbench.models.augmentation import ReaderAugmentation, reader_augment
from invarbench.models.registry import ModelCard, build_network, load_model, save_state_dict, wrap

RECIPES = ("standard", "pgd", "ice", "reader")


@dataclass(frozen=True)
class TrainingReport:
    card: ModelCard
    clean_accuracy: float
    n: int
    seconds: float


def pgd_training_examples(
    model,
    images,
    labels,
    *,
    norm: str,
    eps: float,
    steps: int,
    step_size: float,
    bounds: tuple[float, float],
    generator: torch.Generator,
) -> torch.Tensor:
    """Adversarial examples for the training loop: PGD with a random start inside the eps-ball.

    Its own loop, apart from the evaluation attacks (Foolbox, invarbench's PGD), so that evaluation does
    not run the training procedure it evaluates; only the norm-ball projection (``attacks/norms.py``,
    plain geometry) is shared.
    """
    low, high = bounds
    if norm == "linf":
        delta = ((torch.rand(images.shape, generator=generator) * 2 - 1) * eps).to(images.device)
    else:
        direction = torch.randn(images.shape, generator=generator).to(images.device)
        direction /= direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (images.dim() - 1))
        delta = (
            direction
            * eps
            * torch.rand(len(images), generator=generator).to(images.device).view(-1, *[1] * (images.dim() - 1))
        )
    adversarial = (images + delta).clamp(low, high)
    for _ in range(steps):
        adversarial.requires_grad_(True)
        loss = F.cross_entropy(model(adversarial), labels)
        (gradient,) = torch.autograd.grad(loss, adversarial)
        with torch.no_grad():
            if norm == "linf":
                adversarial = adversarial + step_size * gradient.sign()
            else:
                shape = (-1, *[1] * (images.dim() - 1))
                adversarial = adversarial + step_size * gradient / gradient.flatten(1).norm(dim=1).clamp_min(
                    1e-12
                ).view(shape)
            # l_2: scales down only the perturbations outside the ball; safe for eps = 0 (start of the eps ramp).
            adversarial = project(adversarial, images, norm=norm, eps=eps, bounds=(low, high))
    return adversarial.detach()


def nuisance_penalty(scores: torch.Tensor, labels: torch.Tensor, objective: str) -> torch.Tensor:
    """What the network minimises against the nuisance classifier's ``scores`` (see
    :class:`IndependenceCrossEntropy`): ``"uniform"``, the cross-entropy of its prediction against the
    uniform distribution (log C at the uniform prediction, larger for any other, right or wrong);
    ``"capped-ce"``, minus its cross-entropy with the labels, capped at chance (-log C)."""
    if objective == "uniform":
        return -F.log_softmax(scores, dim=1).mean(1).mean()
    if objective == "capped-ce":
        chance = torch.log(torch.tensor(float(scores.shape[1]), device=scores.device))
        return -torch.minimum(F.cross_entropy(scores, labels), chance)
    raise ValueError(f"nuisance objective {objective!r} is not one of capped-ce, uniform")


class IndependenceCrossEntropy:
    """The iCE objective of Jacobsen et al. for an invertible network with logits z_s and nuisance z_n.

    A nuisance classifier learns to predict the label from z_n (on detached z_n); the network is
    trained on cross-entropy on z_s, minus the nuisance classifier's cross-entropy (capped at chance,
    log C, so that the network is not rewarded for making it confidently wrong), plus a maximum-
    likelihood term (the flow's negative log-likelihood of x under a standard normal on z, per
    dimension), so that the network cannot hide label information by shrinking z_n. The prior covers
    z_s too: with the log-determinant but no prior on z_s, the flow can grow its volume along z_s
    without bound and the term has no minimum (seen in a first attempt: loss below -2 within an epoch).
    Pixels are dequantised with uniform noise of one grey level (MNIST stores k/256) so that the
    likelihood of the discrete images is bounded too.

    ``objective`` chooses what the network does against the nuisance classifier: ``"capped-ce"``
    maximises its cross-entropy up to chance (the form above); ``"uniform"`` pulls its prediction to
    the uniform distribution (cross-entropy against a uniform target, minimal only there). With the
    capped form a nuisance classifier that is confidently *wrong* costs the network nothing although it
    still reads the label (a permuted answer is as informative as the right one); the uniform form
    leaves no such way out. ``steps`` is the number of the nuisance classifier's own steps per batch
    (a stronger adversary). ``nuisance_accuracy`` is the classifier's accuracy on the last batch,
    before its steps: a diagnostic shown during training.
    """

    OBJECTIVES = ("capped-ce", "uniform")

    def __init__(
        self,
        model,
        *,
        num_classes: int,
        nuisance_weight: float,
        likelihood_weight: float,
        hidden: int,
        learning_rate: float,
        objective: str = "capped-ce",
        steps: int = 1,
    ):
        if objective not in self.OBJECTIVES:
            raise ValueError(f"nuisance objective {objective!r} is not one of {', '.join(self.OBJECTIVES)}")
        if steps < 1:
            raise ValueError(f"nuisance classifier steps must be >= 1, not {steps}")
        self.objective = objective
        self.steps = int(steps)
        self.nuisance_accuracy = float("nan")
        self.model = model
        self.num_classes = num_classes
        self.nuisance_weight = nuisance_weight
        self.likelihood_weight = likelihood_weight
        dimension = int(torch.tensor(model.network.input_shape).prod())
        self.dimension = dimension
        self.nuisance_classifier = torch.nn.Sequential(
            torch.nn.Linear(dimension - num_classes, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, num_classes),
        )
        self.optimizer = torch.optim.Adam(self.nuisance_classifier.parameters(), lr=learning_rate)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, *, ramp: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's loss on a batch (the nuisance classifier takes its own step inside); ``ramp``
        in [0, 1] scales the nuisance and likelihood terms during the warm-up."""
        low, high = self.model.bounds
        dequantised = (
            images + torch.rand(images.shape, generator=generator).to(images.device) * (high - low) / 256
        ).clamp(low, high)
        z, log_det = self.model.encode(dequantised)
        logits, nuisance = z[:, : self.num_classes], z[:, self.num_classes :]
        # The nuisance classifier's own steps, on z_n detached from the network.
        detached = nuisance.detach()
        for step in range(self.steps):
            scores = self.nuisance_classifier(detached)
            if step == 0:
                self.nuisance_accuracy = float((scores.argmax(1) == labels).float().mean())
            nuisance_loss = F.cross_entropy(scores, labels)
            self.optimizer.zero_grad(set_to_none=True)
            nuisance_loss.backward()
            self.optimizer.step()
        penalty = nuisance_penalty(self.nuisance_classifier(nuisance), labels, self.objective)
        negative_log_likelihood = (0.5 * z.pow(2).sum(1) - log_det).mean() / self.dimension
        loss = F.cross_entropy(logits, labels) + ramp * (
            self.likelihood_weight * negative_log_likelihood + self.nuisance_weight * penalty
        )
        return loss, logits


def _option(training: dict[str, Any], key: str, card: ModelCard):
    if key not in training:
        raise ConfigError(
            f"model card {card.path} lacks [training] {key}, needed by the {training['recipe']!r} recipe; add it"
        )
    return training[key]


def train(
    card: ModelCard, *, progress: bool = True, measure_robustness: bool = True, device: str | None = None
) -> TrainingReport:
    """Train the model a card describes, write its checkpoint atomically and update the card.

    The card's sha256, clean accuracy and, for robust recipes, PGD robust accuracy (on the first
    ``clean_accuracy.n`` test points, see :func:`measure_card`) are replaced by the values measured here.
    ``device`` (cpu or cuda) overrides the card's ``[training] device`` and is recorded in the card.
    """
    if device is not None:
        card = replace(card, training={**card.training, "device": device})
    training = card.training
    torch_device = resolve_device(str(training.get("device", "cpu")))
    recipe = training["recipe"]
    if recipe not in RECIPES:
        raise ConfigError(
            f"model card {card.path}: unknown training recipe {recipe!r}; use one of {', '.join(RECIPES)}"
        )
    epochs = int(_option(training, "epochs", card))
    batch_size = int(_option(training, "batch_size", card))
    learning_rate = float(_option(training, "learning_rate", card))
    milestones = [int(epoch) for epoch in training.get("lr_milestones", [])]
    threads = int(training.get("threads", 1))

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(int(training["seed"]))
    generator = torch.Generator().manual_seed(int(training["seed"]))
    started = time.perf_counter()
    try:
        dataset = load_dataset(card.dataset, **card.dataset_options)
        network = build_network(card)
        if "initialize_from" in training:
            # Fine-tuning recipe: start from another registered model's weights (checksum verified).
            source = load_model(str(training["initialize_from"]))
            if type(source.network) is not type(network):
                raise ConfigError(
                    f"model card {card.path}: initialize_from {training['initialize_from']!r} has architecture"
                    f" {type(source.network).__name__}, not {type(network).__name__}"
                )
            network.load_state_dict(source.network.state_dict())
        # Training runs on the card's device (default cpu, where it is deterministic for a seed and a
        # thread count); the checkpoint is always saved from the CPU.
        device = torch_device
        model = wrap(network, card).to(device)
        optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        images, labels = dataset.train_images, dataset.train_labels
        independence = None
        augmentation = None
        if recipe == "reader":
            try:
                augmentation = ReaderAugmentation.from_options(dict(training.get("augmentation", {})))
            except (TypeError, ValueError) as error:
                raise ConfigError(f"model card {card.path}: [training.augmentation] {error}; fix the card") from error
        if recipe == "ice":
            if not model.invertible:
                raise ConfigError(
                    f"model card {card.path}: the ice recipe needs an invertible architecture (fi-revnet), not"
                    f" {card.architecture!r}"
                )
            try:
                independence = IndependenceCrossEntropy(
                    model,
                    num_classes=card.num_classes,
                    nuisance_weight=float(training.get("nuisance_weight", 1.0)),
                    likelihood_weight=float(training.get("likelihood_weight", 0.1)),
                    hidden=int(training.get("nuisance_hidden", 256)),
                    learning_rate=float(training.get("nuisance_learning_rate", learning_rate)),
                    objective=str(training.get("nuisance_objective", "capped-ce")),
                    steps=int(training.get("nuisance_steps", 1)),
                )
            except ValueError as error:
                raise ConfigError(f"model card {card.path}: [training] {error}; fix the card") from error
            independence.nuisance_classifier.to(device)
        batches_per_epoch = (len(labels) + batch_size - 1) // batch_size
        bar = tqdm(total=epochs * batches_per_epoch, desc=f"train {card.name}", disable=not progress, unit="batch")
        for epoch in range(epochs):
            order = torch.randperm(len(labels), generator=generator)
            correct = seen = 0
            for batch_index in range(batches_per_epoch):
                index = order[batch_index * batch_size : (batch_index + 1) * batch_size]
                batch_x, batch_y = images[index].to(device), labels[index].to(device)
                if augmentation is not None:
                    batch_x = reader_augment(batch_x, generator, augmentation)
                if recipe == "pgd":
                    batch_x = _adversarial_batch(
                        model, batch_x, batch_y, card, epoch + batch_index / batches_per_epoch, generator
                    )
                if independence is not None:
                    warmup = float(training.get("ice_warmup_epochs", 0))
                    # The logits are learnt first: the independence terms from the start kept a first iCE model at
                    # 91% clean.
                    ramp = min(1.0, (epoch + batch_index / batches_per_epoch) / warmup) if warmup > 0 else 1.0
                    loss, logits = independence(batch_x, batch_y, generator, ramp=ramp)
                else:
                    logits = model(batch_x)
                    loss = F.cross_entropy(logits, batch_y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                correct += (logits.argmax(1) == batch_y).sum().item()
                seen += len(batch_y)
                bar.update(1)
                postfix = {"epoch": epoch + 1, "loss": f"{loss.item():.3f}", "train_acc": f"{correct / seen:.3f}"}
                if independence is not None:
                    postfix["nuisance_acc"] = f"{independence.nuisance_accuracy:.2f}"
                bar.set_postfix(**postfix)
            scheduler.step()
        bar.close()
        model.eval().cpu()
        checkpoint_sha256 = save_state_dict(network, card.checkpoint_path)
        updated = measure_card(
            replace(card, checkpoint_sha256=checkpoint_sha256), model=model, dataset=dataset, robust=measure_robustness
        )
    finally:
        torch.set_num_threads(previous_threads)
    updated.save()
    return TrainingReport(updated, updated.clean_accuracy, card.clean_accuracy_n, time.perf_counter() - started)


def _adversarial_batch(model, images, labels, card: ModelCard, progress_in_epochs: float, generator) -> torch.Tensor:
    threat = card.threat_model
    training = card.training
    norm = threat["norm"]
    if norm not in ("linf", "l2"):
        raise ConfigError(
            f"model card {card.path}: [threat_model] norm {norm!r} cannot be trained against; use linf or l2"
        )
    warmup = float(training.get("eps_warmup_epochs", 0))
    # Ramping eps up avoids the collapse to a constant classifier that PGD training at MNIST eps 0.3+ can fall into
    # at the start.
    scale = min(1.0, progress_in_epochs / warmup) if warmup > 0 else 1.0
    eps = float(threat["eps"]) * scale
    steps = int(_option(training, "pgd_steps", card))
    step_size = float(_option(training, "pgd_step_size", card)) * scale
    return pgd_training_examples(
        model,
        images,
        labels,
        norm=norm,
        eps=eps,
        steps=steps,
        step_size=step_size,
        bounds=card.bounds,
        generator=generator,
    )
