"""aa-fast: an AutoAttack-strength cascade that costs less, built from pyautoattack's own attacks.

Per eps, on the points still robust:

1. APGD-CE (pyautoattack's ``APGDAttack``, 100 steps, 1 restart: AutoAttack's first stage);
2. targeted APGD on the DLR-targeted loss (pyautoattack's ``APGDAttack_targeted``) against only the
   ``targets`` most promising classes, ranked at the clean point: by default by the logit margin
   z_y - z_t (pyautoattack's own order, so its first ``targets`` targets), or with ``ranking="malt"`` by
   MALT's (Melamed et al., 2023) margin normalised by its gradient, (z_y - z_t) / ||grad z_y - grad z_t||_dual,
   a linear estimate of the distance to class t's decision boundary. Measured on MNIST zoo models (see
   docs/perturbation.md), the top 3 by logits caught at least as many of the points that any target
   breaks as the top 3 by MALT;
3. Square (a gradient-free search) with ``square_queries`` queries, invarbench's own (attacks/square.py:
   the same algorithm, each point's own windows, seeded, forward passes through an inference-optimised
   copy of the model where one matches it) or with ``square="pyautoattack"`` pyautoattack's
   ``SquareAttack``; so robustness that masked gradients hide is still found;
4. only where Square broke more than ``escalate_above`` (5%) of the points that the gradient stages
   left (a sign of gradient masking; pyautoattack warns from 0.2%), AutoAttack's full targeted stages on
   the survivors: APGD-T against the other targets, then FAB-T against every target (``escalate=false``
   leaves this out). Measured: on ``mnist-cnn-pgd-linf-0.3`` at l_2 2 (first 20 points) Square broke 45%
   and FAB-T then 3 of the 4 points left; on ``mnist-cnn-pgd-linf-0.4`` at l_inf 0.3 (first 100) Square
   broke 1% and these stages nothing.

Each stage runs only on the points every earlier stage left robust, one eps at a time. Without masking,
FAB-T (AutoAttack's third stage) and APGD-T's other targets are left out: that is where the time goes.
The other savings are in how the model runs: every stage on a channels-last copy of it (where that
gives its logits, :func:`channels_last_copy`), invarbench's Square through a traced copy and, at l_inf,
the incremental forward pass for small windows (attacks/square.py). Success is judged on the model.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import pyautoattack
import torch
from pyautoattack import checks
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
from pyautoattack.fab_pt import FABAttack_PT
from pyautoattack.square import SquareAttack

from invarbench.attacks.autoattack import NORM_NAMES, UnitBox, _batches, collected_warnings, image_shape
from invarbench.attacks.base import Attack, Outcome, register_attack
from invarbench.attacks.incremental import IncrementalForward
from invarbench.attacks.square import square_l2, square_linf, traced_forward
from invarbench.errors import ConfigError
from invarbench.evaluation import logits, model_device, same_logits

RANKINGS = ("malt", "logits")
DUAL_NORMS = {"linf": 1, "l2": 2}
# The targeted DLR loss compares the four largest logits.
TARGETED_MIN_CLASSES = 4
SQUARE_L2_MIN_SIDE = 5
# Square's implementations: invarbench's (attacks/square.py) or pyautoattack's ``SquareAttack``.
SQUARE_IMPLEMENTATIONS = ("invarbench", "pyautoattack")


@register_attack
class AAFast(Attack):
    """APGD-CE, then targeted APGD against the top ``targets`` classes, then Square, each on the survivors.

    ``targets=0`` or ``square_queries=0`` leaves that stage out; ``escalate`` runs AutoAttack's full targeted
    stages after Square where Square broke more than ``escalate_above`` of the points. Models with fewer than 4 classes skip the
    targeted stage (its loss needs 4; recorded in the results).
    """

    name = "aa-fast"

    def __init__(
        self,
        *,
        targets: int = 3,
        ranking: str = "logits",
        steps: int = 100,
        square_queries: int = 5000,
        escalate: bool = True,
        escalate_above: float = 0.05,
        batch_size: int = 500,
        square: str = "invarbench",
    ):
        if ranking not in RANKINGS:
            raise ConfigError(
                f"aa-fast: unknown ranking {ranking!r}; use one of {', '.join(RANKINGS)} (e.g. aa-fast:ranking=malt)"
            )
        for option, value, least in (
            ("targets", targets, 0),
            ("steps", steps, 1),
            ("square_queries", square_queries, 0),
            ("batch_size", batch_size, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(
                    f"aa-fast: {option} must be an integer >= {least}, got {value!r} (e.g. aa-fast:{option}={max(least, 1)})"
                )
        if not isinstance(escalate, bool):
            raise ConfigError(
                f"aa-fast: escalate must be true or false, got {escalate!r} (e.g. aa-fast:escalate=false)"
            )
        if (
            isinstance(escalate_above, bool)
            or not isinstance(escalate_above, (int, float))
            or not 0 <= escalate_above < 1
        ):
            raise ConfigError(
                f"aa-fast: escalate_above is the fraction of points Square must break for the full targeted stages to run, in [0, 1), got {escalate_above!r} (e.g. aa-fast:escalate_above=0.002, pyautoattack's warning threshold)"
            )
        self.targets, self.ranking, self.steps, self.square_queries, self.batch_size = (
            targets,
            ranking,
            steps,
            square_queries,
            batch_size,
        )
        self.escalate, self.escalate_above = escalate, escalate_above
        if square not in SQUARE_IMPLEMENTATIONS:
            raise ConfigError(
                f"aa-fast: square is the Square implementation, one of {', '.join(SQUARE_IMPLEMENTATIONS)}, got {square!r} (e.g. aa-fast:square=pyautoattack)"
            )
        self.square = square

    def run(self, model, images, labels, *, norm, epsilons, seed, active, workspace=None):
        outcome = Outcome.unattacked(images, epsilons)
        device = model_device(model)
        targets = min(self.targets, model.num_classes - 1) if model.num_classes >= TARGETED_MIN_CLASSES else 0
        # pyautoattack's l_2 Square tiles the image with 5x5 windows: smaller images (flat inputs) cannot have it.
        square_fits = norm != "l2" or min(image_shape(images.shape[1:])[1:]) >= SQUARE_L2_MIN_SIDE
        stages = ["apgd-ce"] + ["apgd-t"] * (targets > 0) + ["square"] * (self.square_queries > 0 and square_fits)
        all_targets = model.num_classes - 1 if targets else 0
        escalation = (
            (["apgd-t-rest"] * (all_targets > targets) + ["fab-t"]) if self.escalate and "square" in stages else []
        )
        statistics: list[dict] = []
        messages: list[str] = []
        logger = logging.getLogger("auto-attack")
        logger.setLevel(logging.WARNING)
        low, high = model.bounds
        fast, layout = channels_last_copy(model, images[:8].to(device))
        box, given = UnitBox(fast, tuple(images.shape[1:])), UnitBox(model, tuple(images.shape[1:]))
        # pyautoattack seeds torch's global generator: keep the caller's random state as it was.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for index, eps in enumerate(epsilons):
                points = active[index].nonzero().flatten()
                if len(points) == 0:
                    continue
                x, y = images[points].cpu(), labels[points].cpu()
                unit = ((x - low) / (high - low)).reshape(len(x), *image_shape(x.shape[1:]))
                raised: list[str] = []
                with collected_warnings(logger, raised):
                    cascade = _Cascade(
                        box,
                        unit,
                        y,
                        given=given,
                        norm=norm,
                        eps=eps / (high - low),
                        seed=seed,
                        batch_size=self.batch_size,
                        device=device,
                        logger=logger,
                    )
                    cascade.check_model()
                    for stage in stages:
                        cascade.run_stage(stage, **self._stage_options(stage, targets, norm))
                    checks.check_square_sr(cascade.accuracies, logger=logger)
                    if escalation and cascade.square_beat_gradients(self.escalate_above) and cascade.robust.any():
                        for stage in escalation:
                            cascade.run_stage(
                                stage, **self._stage_options(stage, targets, norm, classes=model.num_classes)
                            )
                messages.extend(f"eps {eps:g}: {message}" for message in raised)
                statistics.extend({"eps": eps, **entry} for entry in cascade.statistics)
                outcome.judge(
                    model,
                    index,
                    points,
                    x,
                    y,
                    low + cascade.adversarial.reshape(x.shape) * (high - low),
                    norm=norm,
                    eps=eps,
                    batch_size=self.batch_size,
                )
        details = {
            "stages": stages,
            "escalation_stages": escalation,
            "square_implementation": self.square,
            "memory_format": layout,
            "n_target_classes": targets,
            "stage_statistics": statistics,
            "implementation": f"pyautoattack {pyautoattack.__version__}: "
            + " -> ".join(self._describe(stage, targets) for stage in stages)
            + (
                f"; where Square beat the gradient stages: {' -> '.join(self._describe(stage, targets) for stage in escalation)}"
                if escalation
                else ""
            ),
        }
        if 0 < self.targets and targets == 0:
            details["left_out_for_num_classes"] = ["apgd-t"]
        if self.square_queries > 0 and not square_fits:
            details["left_out_for_input_shape"] = ["square"]
        return outcome.result(self.name, norm, epsilons, {**self.options(), **details}, tuple(dict.fromkeys(messages)))

    def _describe(self, stage: str, targets: int) -> str:
        if stage == "apgd-ce":
            return f"APGD-CE ({self.steps} steps)"
        if stage == "apgd-t":
            return f"APGD-T ({self.steps} steps, top {targets} targets by {self.ranking})"
        if stage == "square":
            return f"Square ({self.square_queries} queries)"
        return {"apgd-t-rest": "APGD-T (the other targets)", "fab-t": "FAB-T (every target)"}[stage]

    def _stage_options(self, stage: str, targets: int, norm: str, classes: int = 0) -> dict:
        if stage == "apgd-ce":
            return {"steps": self.steps}
        if stage in ("apgd-t", "apgd-t-rest"):
            first, last = (0, targets) if stage == "apgd-t" else (targets, classes - 1)
            return {"steps": self.steps, "ranks": range(first, last), "ranking": self.ranking, "dual": DUAL_NORMS[norm]}
        if stage == "fab-t":
            return {"steps": self.steps, "targets": classes - 1}
        return {"queries": self.square_queries, "implementation": self.square}


class _Cascade:
    """The points of one eps in pyautoattack's unit box: which are still robust, their best adversarials.

    ``box`` is the model as the cascade runs it (a channels-last copy where one matches it), ``given`` the
    model as given: the escalation stages (AutoAttack's own APGD-T and FAB-T) run on that one, so that
    on the points they attack they compute what AutoAttack computes. FAB-T's path is sensitive to the
    last bits of the logits: measured with a one-off script on ``mnist-cnn-pgd-linf-0.3`` at l_2 2, test point 13, it broke the
    point on the model as given and not on the channels-last copy."""

    def __init__(self, box, unit, labels, *, given, norm, eps, seed, batch_size, device, logger):
        self.box, self.given, self.x, self.y = box, given, unit, labels
        self.norm, self.eps, self.seed, self.batch_size, self.device, self.logger = (
            NORM_NAMES[norm],
            eps,
            seed,
            batch_size,
            device,
            logger,
        )
        self.adversarial = unit.clone()
        self.robust = logits(box, unit, batch_size=batch_size).argmax(1) == labels
        self.accuracies = {"clean": self.robust.float().mean().item()}
        self.statistics: list[dict] = []
        self.square_forward = "eager"

    def check_model(self) -> None:
        """pyautoattack's checks of the model (randomised, probability outputs, dynamic), on the first batch."""
        x, y = self.x[: self.batch_size].to(self.device), self.y[: self.batch_size].to(self.device)
        checks.check_randomized(self.box, x, y, bs=self.batch_size, logger=self.logger)
        checks.check_range_output(self.box, x, logger=self.logger)
        checks.check_dynamic(self.box, x, False, logger=self.logger)

    def run_stage(self, stage: str, **options) -> None:
        attacked = int(self.robust.sum())
        if stage == "apgd-ce":
            apgd = APGDAttack(
                self.box,
                n_iter=options["steps"],
                norm=self.norm,
                n_restarts=1,
                eps=self.eps,
                seed=self.seed,
                loss="ce",
                rho=0.75,
                device=self.device,
                logger=self.logger,
            )
            self._on_survivors(lambda x, y, _: apgd.perturb(x, y))
        elif stage in ("apgd-t", "apgd-t-rest"):
            ranks = options["ranks"]
            ranked = torch.full((len(self.y), ranks.stop), -1, dtype=torch.long)
            survivors = self.robust.nonzero().flatten()
            for batch in _batches(len(survivors), self.batch_size):
                chosen = survivors[batch]
                ranked[chosen] = rank_targets(
                    self.box,
                    self.x[chosen].to(self.device),
                    self.y[chosen].to(self.device),
                    dual=options["dual"],
                    ranking=options["ranking"],
                )[:, : ranks.stop].cpu()
            box = self.given if stage == "apgd-t-rest" else self.box
            apgd = APGDAttack_targeted(
                box,
                n_iter=options["steps"],
                norm=self.norm,
                n_restarts=1,
                eps=self.eps,
                seed=self.seed,
                rho=0.75,
                device=self.device,
                logger=self.logger,
            )
            broken = []
            for rank in ranks:
                before = int(self.robust.sum())
                self._on_survivors(
                    lambda x, y, chosen: _targeted(apgd, x, y, ranked[chosen, rank].to(self.device)), box
                )
                broken.append(before - int(self.robust.sum()))
        elif stage == "fab-t":
            fab = FABAttack_PT(
                self.given,
                norm=self.norm,
                n_restarts=1,
                n_iter=options["steps"],
                eps=self.eps,
                seed=self.seed,
                targeted=True,
                device=self.device,
                n_target_classes=options["targets"],
            )
            self._on_survivors(lambda x, y, _: fab.perturb(x, y), self.given)
        elif options["implementation"] == "invarbench":
            if self.robust.any():
                forward, incremental, self.square_forward = _unit_forward(
                    self.box, self.x[self.robust][:8].to(self.device), local=self.norm == "Linf"
                )
                generator = torch.Generator().manual_seed(self.seed)
                if self.norm == "Linf":
                    self._on_survivors(
                        lambda x, y, _: square_linf(
                            forward,
                            x,
                            y,
                            eps=self.eps,
                            queries=options["queries"],
                            generator=generator,
                            p_init=0.8,
                            incremental=incremental,
                        )[0]
                    )
                else:
                    self._on_survivors(
                        lambda x, y, _: square_l2(
                            forward, x, y, eps=self.eps, queries=options["queries"], generator=generator, p_init=0.8
                        )[0]
                    )
        else:
            square = SquareAttack(
                self.box,
                p_init=0.8,
                n_queries=options["queries"],
                eps=self.eps,
                norm=self.norm,
                n_restarts=1,
                seed=self.seed,
                verbose=False,
                device=self.device,
                resc_schedule=False,
            )
            self._on_survivors(lambda x, y, _: square.perturb(x, y))
        self.accuracies[stage] = self.robust.float().mean().item()
        entry = {"stage": stage, "attacked": attacked, "broken": attacked - int(self.robust.sum())}
        if stage == "square":
            entry["implementation"] = options["implementation"] + (
                f", {self.square_forward} forward" if options["implementation"] == "invarbench" else ""
            )
        self.statistics.append({**entry, "broken_per_target": broken} if stage.startswith("apgd-t") else entry)

    def square_beat_gradients(self, fraction: float) -> bool:
        """Square broke more than ``fraction`` of the points after every gradient stage: a sign of gradient masking."""
        before = min(accuracy for stage, accuracy in self.accuracies.items() if stage != "square")
        return "square" in self.accuracies and self.accuracies["square"] < before - fraction

    def _on_survivors(
        self, attack: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], box: UnitBox | None = None
    ) -> None:
        """Run ``attack(x, y, indices)`` on the points still robust, in batches; keep what fools the model
        (``box``, by default the cascade's)."""
        survivors = self.robust.nonzero().flatten()
        for batch in _batches(len(survivors), self.batch_size):
            chosen = survivors[batch]
            x, y = self.x[chosen].to(self.device), self.y[chosen].to(self.device)
            adversarial = attack(x, y, chosen).detach()
            with torch.no_grad():
                fooled = ((box or self.box)(adversarial).argmax(1) != y).cpu()
            self.robust[chosen[fooled]] = False
            self.adversarial[chosen[fooled]] = adversarial[fooled].cpu()


def channels_last_copy(model: torch.nn.Module, example: torch.Tensor) -> tuple[torch.nn.Module, str]:
    """A copy of ``model`` in channels-last memory format, where its logits on ``example`` match the
    model's (:func:`invarbench.evaluation.same_logits`); else ``model``; and which one. On the CPU,
    oneDNN's pooling and convolutions are faster in that format: measured with a one-off script on
    ``mnist-cnn`` (100 points, one thread), pyautoattack's APGD-CE took 8.7 s against 10.7 s."""
    if example.dim() != 4 or example.device.type != "cpu":
        return model, "as given"
    try:
        faster = copy.deepcopy(model).to(memory_format=torch.channels_last)
        with torch.no_grad():
            expected, got = model(example), faster(example)
    except Exception as error:  # noqa: BLE001  (a model that cannot be copied or converted runs as given)
        return model, f"as given ({type(error).__name__})"
    if not same_logits(got, expected):
        return model, "as given (channels last changes its logits)"
    return faster, "channels last"


def _unit_forward(
    box: UnitBox, example: torch.Tensor, *, local: bool
) -> tuple[Callable[[torch.Tensor], torch.Tensor], IncrementalForward | None, str]:
    """``box``'s forward pass through an inference-optimised copy of its model where one matches it
    (:func:`invarbench.attacks.square.traced_forward`), with ``local`` the incremental one for Square's
    small windows where it matches the model (attacks/incremental.py), and how they are computed."""
    model, how = traced_forward(box.model, box.to_model(example))
    incremental = None
    if local:
        incremental, built = IncrementalForward.build(
            box.model, example, to_model=lambda unit: box.low + unit * (box.high - box.low)
        )
        how += f"; {built}"
    return (lambda unit: model(box.to_model(unit))), incremental, how


def _targeted(apgd: APGDAttack_targeted, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One run of pyautoattack's targeted APGD with a chosen target per point (its ``perturb`` takes the
    k-th largest logit for every point instead)."""
    apgd.init_hyperparam(x)
    apgd.y_target = target
    torch.random.manual_seed(apgd.seed)
    if x.is_cuda:
        torch.cuda.random.manual_seed(apgd.seed)
    _, _, _, adversarial = apgd.attack_single_run(x, y)
    return adversarial


def rank_targets(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    dual: float,
    ranking: str = "logits",
) -> torch.Tensor:
    """Classes other than ``y``, most promising target first: ascending (z_y - z_t) / ||grad_x (z_y - z_t)||_dual
    (MALT), or ascending z_y - z_t (``ranking="logits"``). Returns (N, classes - 1) class indices."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        output = model(x)
        own = output.gather(1, y.view(-1, 1))
        differences = own - output
        if ranking == "malt":
            gradients = torch.stack(
                [
                    torch.autograd.grad(output[:, c].sum(), x, retain_graph=c < output.shape[1] - 1)[0].flatten(1)
                    for c in range(output.shape[1])
                ],
                1,
            )
            own_gradient = gradients.gather(1, y.view(-1, 1, 1).expand(-1, 1, gradients.shape[2]))
            differences = differences / ((own_gradient - gradients).norm(p=dual, dim=2) + 1e-12)
    scores = differences.detach().scatter(1, y.view(-1, 1), float("inf"))
    return scores.argsort(1)[:, :-1]
