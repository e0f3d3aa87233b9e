"""aa-fast: an AutoAttack-strength cascade that costs less, built from pyautoattack's own attacks.

Per eps, on the points still robust:

1. APGD-CE (pyautoattack's ``APGDAttack``, 100 steps, 1 restart: AutoAttack's first stage);
2. targeted APGD on the DLR-targeted loss (pyautoattack's ``APGDAttack_targeted``) against only the
   ``targets`` most promising classes, ranked at the clean point: by default by the logit margin
   z_y - z_t (pyautoattack's own order, so its first ``targets`` targets), or with ``ranking="malt"`` by
   MALT's (Melamed et al., 2023) margin normalised by its gradient, (z_y - z_t) / ||grad z_y - grad z_t||_dual,
   a linear estimate of the distance to class t's decision boundary (docs/perturbation.md compares the
   two on the zoo);
3. Square (a gradient-free search) with ``square_queries`` queries, invarbench's own (attacks/square.py:
   the same algorithm, each point's own windows, seeded, forward passes through an inference-optimised
   copy of the model where one matches it) or with ``square="pyautoattack"`` pyautoattack's
   ``SquareAttack``; so robustness that masked gradients hide is still found. A point's search ends
   early (:class:`SquareStopping`) only where its margin stayed above the lowest margin the gradient
   stages reached on it and above ``close`` times its clean margin, and could not reach zero in the queries
   left at ``square_stop`` times its fall over the last ``square_every`` queries;
4. the guarantee: AutoAttack's remaining targeted stages, APGD-T against the other targets and FAB-T
   against every target, on each survivor where they can matter: its closest example (the lowest
   margin any stage reached) is within ``close`` (0.25) of its clean margin, or Square came closer
   than the gradient stages on it; and on every survivor where Square broke more than
   ``escalate_above`` (5%) of the points the gradient stages left (gradient masking; pyautoattack warns
   from 0.2%; ``escalate=false`` leaves this out), then with FAB-T first;
5. FAB restarts: every (survivor, target) whose FAB-T example, inside the ball or not, lay within
   ``fab_near`` (1.2) x eps gets FAB-T again from a random start, up to ``fab_restarts`` (3) times: FAB-T
   from the clean point can end just outside the ball where a random start ends well inside (test point
   103 of ``mnist-cnn-pgd-linf-0.3`` at l_2 2: 2.34 from the clean point, 1.75 from a random start);
6. boundary restarts: every point still robust with a target whose gap z_y - z_t came within
   ``restart_close`` (0.15) of its clean gap in any stage's example gets APGD-CE, and targeted APGD against
   each such target, with fresh random starts, up to ``restarts`` (16) times. AutoAttack's single run
   breaks some such points by the luck of its start (one APGD-CE start breaks test point 108 of
   ``mnist-cnn-pgd-linf-0.1`` at l_2 2 15% of the time); more starts make aa-fast break them more often
   than AutoAttack does. With ``restart_decay`` < 1 (default 1: off), start k goes only to the pairs whose
   gap stayed within ``restart_close`` x ``restart_decay``^k of the clean gap (A3's discarding);
7. Square restarts: every survivor whose Square search came within ``close`` of its clean margin gets
   Square again from the clean point with fresh seeds, up to ``square_restarts`` (2) times.

Each stage runs only on the points every earlier stage left robust, one eps at a time from the
smallest; a point broken at a smaller eps is broken at the larger ones by the same example. Each
stage's entry in ``stage_statistics`` names the points it ran on, why (for the remaining stages), the
points it broke, its seconds and, for Square, each point's queries; ``passes`` counts the forward and
backward passes (in points) through the model. For points left robust the result keeps the closest
example, so its margin says how near the attack came. The other savings are in how the model runs:
every stage but the remaining ones on a channels-last copy of it (where that gives its logits,
:func:`channels_last_copy`), invarbench's Square through a traced copy and, at l_inf, the incremental
forward pass for small windows (attacks/square.py). Success is judged on the model.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable

import pyautoattack
import torch
from pyautoattack import checks
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
from pyautoattack.fab_pt import FABAttack_PT
from pyautoattack.square import SquareAttack

from invarbench.attacks.autoattack import NORM_NAMES, PassCounter, UnitBox, _batches, collected_warnings, image_shape
from invarbench.attacks.base import Attack, Outcome, register_attack
from invarbench.attacks.incremental import IncrementalForward
from invarbench.attacks.square import square_l2, square_linf, traced_forward
from invarbench.errors import ConfigError
from invarbench.evaluation import label_margins, logits, model_device, same_logits

RANKINGS = ("malt", "logits")
DUAL_NORMS = {"linf": 1, "l2": 2}
# The targeted DLR loss compares the four largest logits.
TARGETED_MIN_CLASSES = 4
SQUARE_L2_MIN_SIDE = 5
# Square's implementations: invarbench's (attacks/square.py) or pyautoattack's ``SquareAttack``.
SQUARE_IMPLEMENTATIONS = ("invarbench", "pyautoattack")


@register_attack
class AAFast(Attack):
    """APGD-CE, targeted APGD against the top ``targets`` classes and Square on every point still robust;
    then AutoAttack's remaining targeted stages (APGD-T against the other targets, FAB-T) on the points
    where they can matter: those the earlier stages brought close to the decision boundary, and every
    survivor where Square beat the gradient stages; then more random starts on the targets whose
    boundary an example came close to.

    ``targets=0`` or ``square_queries=0`` leaves that stage out. ``close`` is the guarantee's threshold: a
    survivor whose closest example's margin is at most ``close`` times its clean margin gets the remaining
    stages and a Square search to its end. ``square_stop`` ends a point's Square search early where, at a
    checkpoint, its margin stayed above the gradient stages' and above ``close`` times its clean margin, and
    could not reach zero in the queries left even falling ``square_stop`` times as fast as over the last
    ``square_every`` queries (0 runs every search to the end).
    ``restarts`` and ``restart_close``: APGD-CE and targeted APGD with fresh random starts, at most ``restarts``
    times, on each (point, target) whose gap z_y - z_t came within ``restart_close`` of its clean gap;
    ``restart_decay`` < 1 gives start k only to the pairs still within ``restart_close * restart_decay**k``.
    ``fab_restarts`` and ``fab_near``: FAB-T from random starts, at most ``fab_restarts`` times, against each
    (survivor, target) whose FAB-T example lay within ``fab_near`` x eps. ``fab_close``:
    FAB-T attacks a chosen survivor's target only where that target's gap came within ``fab_close`` of its
    clean gap (every target where Square beat the gradient stages). ``square_restarts``: Square again from
    the clean point with a fresh seed, at most that many times, on each survivor whose Square search came
    within ``close`` of its clean margin (Square's luck: a search that ran to its end beside the boundary
    may cross it with another random path). ``escalate``
    runs the remaining stages on every survivor where Square broke more than ``escalate_above`` of the
    points the gradient stages left. Models with fewer than 4 classes skip the targeted stages (their
    loss needs 4; recorded in the results).
    """

    name = "aa-fast"

    def __init__(
        self,
        *,
        targets: int = 3,
        ranking: str = "logits",
        steps: int = 100,
        square_queries: int = 5000,
        close: float = 0.25,
        restarts: int = 16,
        restart_close: float = 0.15,
        restart_decay: float = 1.0,
        fab_close: float = 0.25,
        fab_restarts: int = 3,
        fab_near: float = 1.2,
        square_restarts: int = 2,
        square_stop: float = 1.5,
        square_every: int = 250,
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
            ("square_every", square_every, 1),
            ("restarts", restarts, 0),
            ("square_restarts", square_restarts, 0),
            ("fab_restarts", fab_restarts, 0),
            ("batch_size", batch_size, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(
                    f"aa-fast: {option} must be an integer >= {least}, got {value!r} "
                    f"(e.g. aa-fast:{option}={max(least, 1)})"
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
                "aa-fast: escalate_above is the fraction of points Square must break for the full targeted stages "
                f"to run, in [0, 1), got {escalate_above!r} (e.g. aa-fast:escalate_above=0.002, pyautoattack's "
                "warning threshold)"
            )
        if isinstance(close, bool) or not isinstance(close, (int, float)) or close < 0:
            raise ConfigError(
                "aa-fast: close is the share of a point's clean margin under which AutoAttack's remaining stages "
                f"run on it, a number >= 0, got {close!r} (e.g. aa-fast:close=0.25; a large value such as 1e9 runs "
                "them on every survivor)"
            )
        if isinstance(square_stop, bool) or not isinstance(square_stop, (int, float)) or square_stop < 0:
            raise ConfigError(
                "aa-fast: square_stop is how many times faster than lately a point's Square margin must be able to "
                f"fall to keep searching, a number >= 0 (0: never stop early), got {square_stop!r} "
                "(e.g. aa-fast:square_stop=2)"
            )
        self.targets, self.ranking, self.steps, self.square_queries, self.batch_size = (
            targets,
            ranking,
            steps,
            square_queries,
            batch_size,
        )
        if isinstance(restart_close, bool) or not isinstance(restart_close, (int, float)) or restart_close < 0:
            raise ConfigError(
                "aa-fast: restart_close is the share of a target's clean gap z_y - z_t under which that target "
                f"gets more random starts, a number >= 0, got {restart_close!r} (e.g. aa-fast:restart_close=0.05; 0 "
                "turns the restarts off)"
            )
        if isinstance(restart_decay, bool) or not isinstance(restart_decay, (int, float)) or not 0 < restart_decay <= 1:
            raise ConfigError(
                "aa-fast: restart_decay is the factor by which a boundary pair's threshold shrinks at each restart "
                f"(A3-style discarding of the pairs furthest from the boundary), in (0, 1], got {restart_decay!r} "
                "(e.g. aa-fast:restart_decay=0.8; 1 gives every pair all its restarts)"
            )
        if isinstance(fab_close, bool) or not isinstance(fab_close, (int, float)) or fab_close < 0:
            raise ConfigError(
                "aa-fast: fab_close is the share of a target's clean gap z_y - z_t under which FAB-T attacks that "
                f"target on a chosen survivor, a number >= 0, got {fab_close!r} (e.g. aa-fast:fab_close=0.25; a "
                "large value such as 1e9 attacks every target, as AutoAttack does)"
            )
        if isinstance(fab_near, bool) or not isinstance(fab_near, (int, float)) or fab_near < 1:
            raise ConfigError(
                "aa-fast: fab_near is how far outside the eps-ball, as a multiple of eps, FAB-T's minimal-norm example "
                f"against a target may lie for that target to get FAB-T's random restarts, a number >= 1, got "
                f"{fab_near!r} (e.g. aa-fast:fab_near=1.25; aa-fast:fab_restarts=0 turns them off)"
            )
        self.fab_close, self.fab_restarts, self.fab_near = fab_close, fab_restarts, fab_near
        self.close, self.square_stop, self.square_every = close, square_stop, square_every
        self.restarts, self.restart_close, self.square_restarts = restarts, restart_close, square_restarts
        self.restart_decay = restart_decay
        self.escalate, self.escalate_above = escalate, escalate_above
        if square not in SQUARE_IMPLEMENTATIONS:
            raise ConfigError(
                f"aa-fast: square is the Square implementation, one of {', '.join(SQUARE_IMPLEMENTATIONS)}, got "
                f"{square!r} (e.g. aa-fast:square=pyautoattack)"
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
        remaining = ["apgd-t-rest"] * (all_targets > targets) + ["fab-t"] * (model.num_classes >= 3)
        statistics: list[dict] = []
        messages: list[str] = []
        logger = logging.getLogger("auto-attack")
        logger.setLevel(logging.WARNING)
        low, high = model.bounds
        counter = PassCounter()
        fast, layout = channels_last_copy(model, images[:8].to(device))
        box, given = UnitBox(fast, tuple(images.shape[1:]), counter), UnitBox(model, tuple(images.shape[1:]), counter)
        order = sorted(range(len(epsilons)), key=lambda index: epsilons[index])
        # pyautoattack seeds torch's global generator: keep the caller's random state as it was.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            broken_below: dict[int, torch.Tensor] = {}
            for index in order:
                eps = epsilons[index]
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
                        points=points,
                    )
                    cascade.carry_over(broken_below)
                    cascade.check_model()
                    for stage in stages:
                        cascade.run_stage(stage, **self._stage_options(stage, targets, norm))
                    checks.check_square_sr(cascade.accuracies, logger=logger)
                    masked = self.escalate and "square" in stages and cascade.square_beat_gradients(self.escalate_above)
                    chosen, why = cascade.choose_for_remaining(self.close, every_survivor=masked)
                    # Where gradients are masked FAB-T breaks most survivors: it goes first there, APGD-T first
                    # elsewhere.
                    for stage in sorted(remaining, key=lambda stage: stage != "fab-t") if masked else remaining:
                        if not (cascade.robust & chosen).any():
                            break
                        cascade.run_stage(
                            stage,
                            chosen=chosen,
                            why=why,
                            **self._stage_options(stage, targets, norm, classes=model.num_classes, masked=masked),
                        )
                    if "fab-t" in remaining and self.fab_restarts:
                        cascade.restart_fab(near=self.fab_near, restarts=self.fab_restarts, steps=self.steps)
                    if targets and self.restarts and self.restart_close > 0:
                        cascade.restart_on_boundary(
                            close=self.restart_close, restarts=self.restarts, steps=self.steps, decay=self.restart_decay
                        )
                    if "square" in stages and self.square_restarts:
                        cascade.restart_square(
                            restarts=self.square_restarts, **self._stage_options("square", targets, norm)
                        )
                messages.extend(f"eps {eps:g}: {message}" for message in raised)
                statistics.extend({"eps": eps, **entry} for entry in cascade.statistics)
                broken_below.update(cascade.broken())
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
            "remaining_stages": remaining,
            "square_implementation": self.square,
            "memory_format": layout,
            "n_target_classes": targets,
            "stage_statistics": statistics,
            "passes": counter.as_dict(),
            "square_counted": True,
            "implementation": f"pyautoattack {pyautoattack.__version__}: "
            + " -> ".join(self._describe(stage, targets) for stage in stages)
            + (
                f"; on survivors within {self.close:g} of their clean margin, and on every survivor where Square "
                f"beat the gradient stages: {' -> '.join(self._describe(stage, targets) for stage in remaining)}"
                if remaining
                else ""
            )
            + (
                f"; FAB-T from up to {self.fab_restarts} random starts against each target whose FAB-T example "
                f"lay within {self.fab_near:g} x eps"
                if "fab-t" in remaining and self.fab_restarts
                else ""
            )
            + (
                f"; APGD-CE and APGD-T with up to {self.restarts} fresh random starts on each target whose gap came "
                f"within {self.restart_close:g} of its clean gap"
                + (
                    f" (after restart k only where it stays within {self.restart_close:g} x {self.restart_decay:g}^k)"
                    if self.restart_decay < 1
                    else ""
                )
                if targets and self.restarts and self.restart_close > 0
                else ""
            )
            + (
                f"; Square again with up to {self.square_restarts} fresh seeds on each survivor whose Square search "
                f"came within {self.close:g} of its clean margin"
                if "square" in stages and self.square_restarts
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
            stopping = (
                f", a search ended early where its margin could not reach zero at {self.square_stop:g}x its recent fall"
                if self.square_stop
                else ""
            )
            return f"Square ({self.square_queries} queries{stopping})"
        if stage == "fab-t":
            return (
                f"FAB-T (the targets whose gap z_y - z_t came within {self.fab_close:g} of its clean gap; every "
                "target where Square beat the gradient stages)"
            )
        return "APGD-T (the other targets)"

    def _stage_options(self, stage: str, targets: int, norm: str, classes: int = 0, masked: bool = False) -> dict:
        if stage == "apgd-ce":
            return {"steps": self.steps}
        if stage in ("apgd-t", "apgd-t-rest"):
            first, last = (0, targets) if stage == "apgd-t" else (targets, classes - 1)
            return {"steps": self.steps, "ranks": range(first, last), "ranking": self.ranking, "dual": DUAL_NORMS[norm]}
        if stage == "fab-t":
            return {"steps": self.steps, "targets": classes - 1, "close": None if masked else self.fab_close}
        return {
            "queries": self.square_queries,
            "implementation": self.square,
            "stop": self.square_stop,
            "every": self.square_every,
            "close": self.close,
        }


class SquareStopping:
    """When a point's Square search ends before its budget: at every ``every``-th query from the
    ``2 * every``-th on, where its margin is still above ``floor`` and could not reach zero in the queries
    left even if it fell ``factor`` times as fast as over the last ``every`` queries. aa-fast's floor is
    the larger of the lowest margin the gradient stages reached (Square is not beating them) and ``close``
    times the clean margin: a search that came near the boundary runs to the end, as Square's margin can
    sit on a plateau for hundreds of queries and then fall again."""

    def __init__(self, floor: torch.Tensor, *, queries: int, every: int, factor: float):
        self.floor, self.queries, self.every, self.factor = floor, queries, every, factor
        self.previous: torch.Tensor | None = None

    def __call__(self, query: int, margin: torch.Tensor) -> torch.Tensor:
        ended = torch.zeros(len(margin), dtype=torch.bool)
        if query % self.every or self.factor == 0:
            return ended
        margin = margin.cpu()
        if self.previous is not None:
            fall = (self.previous - margin).clamp_min(0) / self.every
            ended = (margin > self.floor) & (margin - self.factor * fall * (self.queries - query) > 0)
        self.previous = margin.clone()
        return ended


class _Cascade:
    """The points of one eps in pyautoattack's unit box: which are still robust, their best adversarials,
    and for the others the closest example any stage found (lowest margin) and its margin.

    ``box`` is the model as the cascade runs it (a channels-last copy where one matches it), ``given`` the
    model as given: the remaining stages (AutoAttack's own APGD-T and FAB-T) run on that one, so that
    on the points they attack they compute what AutoAttack computes: FAB-T's path is sensitive to the
    last bits of the logits, and a point it breaks on the model as given it may miss on the copy.
    ``points`` are the points' indices in the evaluation, which the statistics name."""

    def __init__(self, box, unit, labels, *, given, norm, eps, seed, batch_size, device, logger, points=None):
        self.box, self.given, self.x, self.y = box, given, unit, labels
        self.norm, self.eps, self.seed, self.batch_size, self.device, self.logger = (
            NORM_NAMES[norm],
            eps,
            seed,
            batch_size,
            device,
            logger,
        )
        self.points = torch.arange(len(labels)) if points is None else points.cpu()
        self.adversarial = unit.clone()
        with torch.no_grad():
            clean = logits(box, unit, batch_size=batch_size)
        self.clean_margin = label_margins(clean, labels)
        # Per point and class: z_y - z_t when clean, and the lowest any stage's examples reached.
        self.clean_gaps = (clean.gather(1, labels.view(-1, 1)) - clean).cpu()
        self.closest_gaps = self.clean_gaps.clone()
        self.robust = self.clean_margin > 0
        self.closest = self.clean_margin.clone()
        self.gradient_closest = self.clean_margin.clone()
        self.square_closest = self.clean_margin.clone()
        # Per point and class: the size of the smallest example FAB-T found that fools the model (inf: none).
        self.fab_sizes = torch.full_like(self.clean_gaps, float("inf"))
        self.accuracies = {"clean": self.robust.float().mean().item()}
        self.statistics: list[dict] = []
        self.square_forward = "eager"

    def carry_over(self, broken: dict[int, torch.Tensor]) -> None:
        """Points broken at a smaller eps (``broken``: evaluation index -> example in the unit box) are
        broken here too, by the same example: they are not attacked again."""
        carried = [
            (local, broken[int(point)])
            for local, point in enumerate(self.points.tolist())
            if int(point) in broken and self.robust[local]
        ]
        for local, example in carried:
            self.robust[local] = False
            self.adversarial[local] = example
        if carried:
            self.statistics.append(
                {
                    "stage": "smaller eps",
                    "attacked": len(carried),
                    "broken": len(carried),
                    "points": self.points[[local for local, _ in carried]].tolist(),
                    "why": "broken at a smaller eps, by an example inside this ball",
                }
            )

    def broken(self) -> dict[int, torch.Tensor]:
        """Evaluation index -> adversarial example, of the points no longer robust that were correct when clean."""
        fooled = (~self.robust & (self.clean_margin > 0)).nonzero().flatten()
        return {int(self.points[local]): self.adversarial[local].clone() for local in fooled.tolist()}

    def check_model(self) -> None:
        """pyautoattack's checks of the model (randomised, probability outputs, dynamic), on the first batch."""
        x, y = self.x[: self.batch_size].to(self.device), self.y[: self.batch_size].to(self.device)
        checks.check_randomized(self.box, x, y, bs=self.batch_size, logger=self.logger)
        checks.check_range_output(self.box, x, logger=self.logger)
        checks.check_dynamic(self.box, x, False, logger=self.logger)

    def gap_ratios(self) -> torch.Tensor:
        """Per point and class: the lowest gap z_y - z_t any stage's example reached, as a share of the clean gap."""
        return self.closest_gaps / self.clean_gaps.clamp_min(1e-12)

    def run_stage(self, stage: str, chosen: torch.Tensor | None = None, why: str | None = None, **options) -> None:
        """Run one stage on the points still robust (of ``chosen``, where given, for the reason ``why``)."""
        selected = self.robust.clone() if chosen is None else self.robust & chosen
        attacked = int(selected.sum())
        ran_on = self.points[selected.nonzero().flatten()].tolist()
        extra: dict = {}
        started = time.perf_counter()
        if attacked == 0:
            pass
        elif stage == "apgd-ce":
            apgd = self._apgd(self.box, steps=options["steps"], seed=self.seed)
            self._on_survivors(lambda x, y, _: _single_run(apgd, x, y), selected, gradient=True)
        elif stage in ("apgd-t", "apgd-t-rest"):
            ranks = options["ranks"]
            ranked = torch.full((len(self.y), ranks.stop), -1, dtype=torch.long)
            survivors = selected.nonzero().flatten()
            for batch in _batches(len(survivors), self.batch_size):
                picked = survivors[batch]
                ranked[picked] = rank_targets(
                    self.box,
                    self.x[picked].to(self.device),
                    self.y[picked].to(self.device),
                    dual=options["dual"],
                    ranking=options["ranking"],
                )[:, : ranks.stop].cpu()
            box = self.given if stage == "apgd-t-rest" else self.box
            apgd = self._apgd(box, steps=options["steps"], seed=self.seed, targeted=True)
            broken = []
            for rank in ranks:
                before = int(self.robust.sum())
                self._on_survivors(
                    lambda x, y, picked, rank=rank: _single_run(apgd, x, y, ranked[picked, rank].to(self.device)),
                    selected,
                    box,
                    gradient=True,
                )
                broken.append(before - int(self.robust.sum()))
            extra["broken_per_target"] = broken
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
            # Target by target as FAB-T's ``perturb`` runs them (close=None: every target).
            extra.update(self._fab_near_targets(fab, selected, options["targets"], options.get("close")))
        else:
            extra.update(self._square(selected, self.seed, options))
        self.accuracies[stage] = self.robust.float().mean().item()
        entry = {
            "stage": stage,
            "attacked": attacked,
            "broken": attacked - int((self.robust & selected).sum()),
            "seconds": round(time.perf_counter() - started, 3),
            "points": ran_on,
        }
        if why is not None:
            entry["why"] = why
        if stage == "square":
            entry["implementation"] = options["implementation"] + (
                f", {self.square_forward} forward" if options["implementation"] == "invarbench" else ""
            )
        self.statistics.append({**entry, **extra})

    def _apgd(self, model: UnitBox, *, steps: int, seed: int, targeted: bool = False) -> APGDAttack:
        """pyautoattack's APGD on ``model`` as AutoAttack configures it (1 restart, rho 0.75): APGD-CE, or
        with ``targeted`` APGD on the DLR-targeted loss."""
        options = {
            "n_iter": steps,
            "norm": self.norm,
            "n_restarts": 1,
            "eps": self.eps,
            "seed": seed,
            "rho": 0.75,
            "device": self.device,
            "logger": self.logger,
        }
        return APGDAttack_targeted(model, **options) if targeted else APGDAttack(model, loss="ce", **options)

    def restart_square(self, *, restarts: int, **options) -> None:
        """Square again from the clean points, with seeds ``seed + 1``, ``seed + 2``, ..., at most
        ``restarts`` times, on each survivor whose Square search came within ``close`` of its clean margin:
        Square breaks such a point or not by its random path (AutoAttack's own Square among them), so it
        gets more paths than AutoAttack gives it. A point's restarts end once it is broken."""
        near = self.robust & (self.square_closest <= options["close"] * self.clean_margin)
        if not near.any():
            return
        started, before = time.perf_counter(), int(self.robust.sum())
        entry = {
            "stage": "square restarts",
            "attacked": int(near.sum()),
            "points": self.points[near.nonzero().flatten()].tolist(),
            "why": f"its Square search came within {options['close']:g} x its clean margin",
        }
        runs, broken, queries = 0, [], []
        for restart in range(restarts):
            if not (near & self.robust).any():
                break
            runs += 1
            alive = int(self.robust.sum())
            queries.append(self._square(near, self.seed + 1 + restart, options).get("queries"))
            broken.append(alive - int(self.robust.sum()))
        entry.update(
            broken=before - int(self.robust.sum()),
            broken_per_restart=broken,
            queries_per_restart=queries,
            restarts_run=runs,
            seconds=round(time.perf_counter() - started, 3),
        )
        self.accuracies["square restarts"] = self.robust.float().mean().item()
        self.statistics.append(entry)

    def _square(self, selected: torch.Tensor, seed: int, options: dict) -> dict:
        """One Square search, seeded with ``seed``, on the ``selected`` survivors; returns its statistics."""
        extra: dict = {}
        if options["implementation"] == "invarbench":
            forward, incremental, self.square_forward = _unit_forward(
                self.box, self.x[selected & self.robust][:8].to(self.device), local=self.norm == "Linf"
            )
            generator = torch.Generator().manual_seed(seed)
            search = square_linf if self.norm == "Linf" else square_l2
            local = {"incremental": incremental} if self.norm == "Linf" else {}
            used: list[torch.Tensor] = []

            def square(x, y, picked):
                stop = (
                    # A search near the boundary (margin within ``close`` of the clean one) runs to the end.
                    SquareStopping(
                        torch.maximum(self.gradient_closest[picked], options["close"] * self.clean_margin[picked]),
                        queries=options["queries"],
                        every=options["every"],
                        factor=options["stop"],
                    )
                    if options["stop"]
                    else None
                )
                best, margin, queries = search(
                    forward,
                    x,
                    y,
                    eps=self.eps,
                    queries=options["queries"],
                    generator=generator,
                    p_init=0.8,
                    stop=stop,
                    **local,
                )
                used.append(queries.cpu())
                self.square_closest[picked] = torch.minimum(self.square_closest[picked], margin.cpu())
                # Its queries ran through the traced copy (or the incremental pass), not through ``box``: one
                # forward pass per query and point, the start included.
                if self.box.counter is not None:
                    self.box.counter.forward += int(queries.sum())
                return best

            survivors = (selected & self.robust).nonzero().flatten()
            self._on_survivors(square, selected)
            queries_used = torch.cat(used) if used else torch.zeros(0, dtype=torch.long)
            extra["queries"] = queries_used.tolist()
            extra["ended_early"] = (
                int(((queries_used < options["queries"] + 1) & self.robust[survivors]).sum()) if len(used) else 0
            )
        else:
            square = SquareAttack(
                self.box,
                p_init=0.8,
                n_queries=options["queries"],
                eps=self.eps,
                norm=self.norm,
                n_restarts=1,
                seed=seed,
                verbose=False,
                device=self.device,
                resc_schedule=False,
            )

            def square_perturb(x, y, picked):
                # As its perturb runs one restart on points it classifies correctly (every survivor), but
                # returning the example of lowest margin on the others too.
                square.init_hyperparam(x)
                torch.random.manual_seed(seed)
                if x.is_cuda:
                    torch.cuda.random.manual_seed(seed)
                _, closest = square.attack_single_run(x, y)
                with torch.no_grad():
                    margin = label_margins(self.box(closest), y).cpu()
                self.square_closest[picked] = torch.minimum(self.square_closest[picked], margin)
                return closest

            self._on_survivors(square_perturb, selected)
        return extra

    def _fab_near_targets(self, fab: FABAttack_PT, selected: torch.Tensor, targets: int, close: float | None) -> dict:
        """FAB-T, rank by rank as AutoAttack runs it (targets ordered by the clean logits of the model as
        given), against each target only on the selected survivors whose gap z_y - z_t to it came within
        ``close`` of its clean gap (``None``: every target, as FAB-T's ``perturb``): FAB-T is the most
        expensive stage per point, and a target no stage came near is where it breaks nothing. The size of
        each minimal-norm example FAB-T finds, inside the ball or not, is kept (``fab_sizes``)."""
        survivors = selected.nonzero().flatten()
        ranked = self._ranked_by_given(survivors)
        ratio = self.gap_ratios()
        attacked, broken = [], []
        torch.random.manual_seed(self.seed)
        for rank in range(1, targets + 1):
            near = torch.zeros_like(selected)
            near[survivors] = (
                True
                if close is None
                else ratio[survivors].gather(1, ranked[survivors, rank : rank + 1]).flatten() <= close
            )
            attacked.append(int((near & self.robust).sum()))
            before = int(self.robust.sum())
            fab.target_class = rank + 1
            self._on_survivors(
                lambda x, y, picked, rank=rank: self._fab_single_run(fab, x, y, picked, ranked[picked, rank]),
                near,
                self.given,
            )
            broken.append(before - int(self.robust.sum()))
        return {
            "targets_attacked": attacked,
            "broken_per_target": broken,
            "target_rule": "every target"
            if close is None
            else f"a target whose gap z_y - z_t came within {close:g} of its clean gap",
        }

    def _ranked_by_given(self, picked: torch.Tensor) -> torch.Tensor:
        """(N, classes) class indices by descending clean logit of the model as given, filled for ``picked``
        (-1 elsewhere): the order in which FAB-T's ``target_class`` picks its target."""
        ranked = torch.full_like(self.clean_gaps, -1, dtype=torch.long)
        with torch.no_grad():
            clean = logits(self.given, self.x[picked], batch_size=self.batch_size).cpu()
        ranked[picked] = clean.argsort(dim=-1, descending=True)
        return ranked

    def _fab_single_run(
        self,
        fab: FABAttack_PT,
        x: torch.Tensor,
        y: torch.Tensor,
        picked: torch.Tensor,
        aimed: torch.Tensor,
        *,
        random_start: bool = False,
    ) -> torch.Tensor:
        """One targeted FAB run, from the clean points (as ``perturb`` runs its first) or from a random start
        (as its restarts), against classes ``aimed`` (points ``picked`` of the cascade). FAB is a minimum-norm
        attack: like ``perturb``, keep only the examples inside the eps-ball; the size of each example that
        fools the model goes into ``fab_sizes``."""
        adversarial = fab.attack_single_run(x, y, use_rand_start=random_start, is_targeted=True)
        change = (adversarial - x).flatten(1)
        size = change.abs().amax(1) if self.norm == "Linf" else change.norm(dim=1)
        with torch.no_grad():
            fooled = (self.given(adversarial).argmax(1) != y).cpu()
        found = torch.where(fooled, size.cpu(), torch.full_like(size.cpu(), float("inf")))
        self.fab_sizes[picked, aimed] = torch.minimum(self.fab_sizes[picked, aimed], found)
        return torch.where((size <= self.eps).view(-1, *[1] * (x.dim() - 1)), adversarial, x)

    def restart_fab(self, *, near: float, restarts: int, steps: int) -> None:
        """FAB-T from random starts (seeds ``seed + 1``, ...), at most ``restarts`` times, against each
        (survivor, target) whose FAB-T example lay within ``near`` x eps: FAB-T from the clean point can end
        just outside the ball where a random start ends inside it (AutoAttack's own FAB-T breaks some such
        points by the last bits of its arithmetic). A pair ends once its point is broken."""
        pairs = (self.fab_sizes <= near * self.eps) & self.robust.view(-1, 1)
        points = pairs.any(1).nonzero().flatten()
        if len(points) == 0:
            return
        started, before = time.perf_counter(), int(self.robust.sum())
        entry = {
            "stage": "fab restarts",
            "attacked": len(points),
            "points": self.points[points].tolist(),
            "pairs": [[int(self.points[p]), int(t)] for p, t in zip(*pairs.nonzero(as_tuple=True))],
            "why": f"FAB-T's example against the target lay within {near:g} x eps",
        }
        ranked = self._ranked_by_given(points)
        runs, broken_per_restart = 0, []
        for restart in range(restarts):
            if not (pairs & self.robust.view(-1, 1)).any():
                break
            runs += 1
            alive_before = int(self.robust.sum())
            fab = FABAttack_PT(
                self.given,
                norm=self.norm,
                n_restarts=1,
                n_iter=steps,
                eps=self.eps,
                seed=self.seed + 1 + restart,
                targeted=True,
                device=self.device,
                n_target_classes=self.clean_gaps.shape[1] - 1,
            )
            torch.random.manual_seed(self.seed + 1 + restart)
            for rank in range(1, self.clean_gaps.shape[1]):
                chosen = torch.zeros_like(self.robust)
                chosen[points] = pairs[points].gather(1, ranked[points, rank : rank + 1]).flatten()
                if not (chosen & self.robust).any():
                    continue
                fab.target_class = rank + 1
                self._on_survivors(
                    lambda x, y, picked, rank=rank, fab=fab: self._fab_single_run(
                        fab, x, y, picked, ranked[picked, rank], random_start=True
                    ),
                    chosen,
                    self.given,
                )
            broken_per_restart.append(alive_before - int(self.robust.sum()))
        entry.update(
            broken=before - int(self.robust.sum()),
            restarts_run=runs,
            broken_per_restart=broken_per_restart,
            seconds=round(time.perf_counter() - started, 3),
        )
        self.accuracies["fab restarts"] = self.robust.float().mean().item()
        self.statistics.append(entry)

    def square_beat_gradients(self, fraction: float) -> bool:
        """Square broke more than ``fraction`` of the points after every gradient stage: a sign of gradient masking."""
        before = min(accuracy for stage, accuracy in self.accuracies.items() if stage != "square")
        return "square" in self.accuracies and self.accuracies["square"] < before - fraction

    def choose_for_remaining(self, close: float, *, every_survivor: bool) -> tuple[torch.Tensor, str]:
        """The survivors AutoAttack's remaining stages run on, and why: every one where Square beat the
        gradient stages (``every_survivor``), else those whose closest example (any stage's) has a margin
        of at most ``close`` times their clean margin, or where Square came closer than the gradient
        stages (a point of its own where gradients may be masked)."""
        if every_survivor:
            return self.robust.clone(), "Square beat the gradient stages on this eps (gradient masking): every survivor"
        near = self.closest <= close * self.clean_margin
        square_closer = self.closest < self.gradient_closest
        return (
            self.robust & (near | square_closer),
            f"closest example's margin at most {close:g} x the clean margin, or Square came closer than the "
            "gradient stages",
        )

    def boundary_pairs(self, close: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(points, targets) still robust whose gap to that target, z_y - z_t, came within ``close`` of its
        clean gap in some stage's example: where one more random start may cross the boundary."""
        ratio = self.gap_ratios()
        near = (ratio <= close) & (self.clean_gaps > 0) & self.robust.view(-1, 1)
        points, targets = near.nonzero(as_tuple=True)
        return points, targets

    def restart_on_boundary(self, *, close: float, restarts: int, steps: int, decay: float = 1.0) -> None:
        """APGD-CE and targeted APGD with fresh random starts, ``restarts`` times: APGD-CE on each point of
        :meth:`boundary_pairs`, targeted APGD on each of its pairs (on the model as given, as AutoAttack runs
        them). AutoAttack's own runs break such points by the luck of their start (on the zoo, one APGD-CE
        start breaks some of them 15% of the time), so they get more starts than AutoAttack gives them. A
        point's starts end once it is broken. With ``decay`` < 1, start ``k`` (from 0) goes only to the pairs
        whose gap, over every example so far, came within ``close * decay**k`` of its clean gap (A3's
        discarding, Liu et al. 2022: starts are spent where the boundary is nearest); a point's APGD-CE start
        goes with its pairs."""
        points, targets = self.boundary_pairs(close)
        started = time.perf_counter()
        entry = {
            "stage": "boundary restarts",
            "attacked": len(set(points.tolist())),
            "points": sorted({int(self.points[point]) for point in points}),
            "pairs": [[int(self.points[point]), int(target)] for point, target in zip(points, targets)],
            "why": f"a target's gap came within {close:g} x its clean gap"
            + (f", after restart k within {close:g} x {decay:g}^k" if decay < 1 else ""),
        }
        before = int(self.robust.sum())
        runs, pairs_per_restart, broken_per_restart = 0, [], []
        for restart in range(restarts):
            kept = self.robust[points] & (self.gap_ratios()[points, targets] <= close * decay**restart)
            points, targets = points[kept], targets[kept]
            if len(points) == 0:
                break
            runs += 1
            alive_before = int(self.robust.sum())
            pairs_per_restart.append(len(points))
            near = torch.zeros_like(self.robust)
            near[points] = True
            seed = self.seed + 1 + restart
            untargeted = self._apgd(self.given, steps=steps, seed=seed)
            self._on_survivors(lambda x, y, _, untargeted=untargeted: _single_run(untargeted, x, y), near, self.given)
            alive = self.robust[points]
            points, targets = points[alive], targets[alive]
            apgd = self._apgd(self.given, steps=steps, seed=seed, targeted=True)
            for batch in _batches(len(points), self.batch_size):
                picked, aimed = points[batch], targets[batch]
                x, y = self.x[picked].to(self.device), self.y[picked].to(self.device)
                adversarial, highest = _single_run(apgd, x, y, aimed.to(self.device))
                with torch.no_grad():
                    for candidate in (adversarial, highest):
                        output = self.given(candidate.detach()).cpu()
                        gaps = output.gather(1, y.cpu().view(-1, 1)) - output
                        # A point may stand in several pairs of the batch: the lowest gap of each counts.
                        self.closest_gaps.index_reduce_(0, picked, gaps, "amin")
                        # Any example that fools the model will do.
                        fooled = (label_margins(output, y.cpu()) < 0) & self.robust[picked]
                        self.robust[picked[fooled]] = False
                        self.adversarial[picked[fooled]] = candidate.detach().cpu()[fooled]
            broken_per_restart.append(alive_before - int(self.robust.sum()))
        entry.update(
            broken=before - int(self.robust.sum()),
            restarts_run=runs,
            pairs_per_restart=pairs_per_restart,
            broken_per_restart=broken_per_restart,
            seconds=round(time.perf_counter() - started, 3),
        )
        self.accuracies["boundary restarts"] = self.robust.float().mean().item()
        self.statistics.append(entry)

    def _on_survivors(
        self,
        attack: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
        selected: torch.Tensor,
        box: UnitBox | None = None,
        *,
        gradient: bool = False,
    ) -> None:
        """Run ``attack(x, y, indices)`` on the ``selected`` points still robust, in batches; keep what
        fools the model (``box``, by default the cascade's) and, for the others, the example of lowest
        margin. ``attack`` returns its adversarials, or (adversarials, examples of highest loss)."""
        survivors = (selected & self.robust).nonzero().flatten()
        for batch in _batches(len(survivors), self.batch_size):
            chosen = survivors[batch]
            x, y = self.x[chosen].to(self.device), self.y[chosen].to(self.device)
            returned = attack(x, y, chosen)
            candidates = [part.detach() for part in (returned if isinstance(returned, tuple) else (returned,))]
            with torch.no_grad():
                outputs = [(box or self.box)(candidate).cpu() for candidate in candidates]
            margins = [label_margins(output, y.cpu()) for output in outputs]
            for output in outputs:
                gaps = output.gather(1, y.cpu().view(-1, 1)) - output
                self.closest_gaps[chosen] = torch.minimum(self.closest_gaps[chosen], gaps)
            margin, which = torch.stack(margins).min(0)
            lowest = torch.stack(candidates)[which.to(self.device), torch.arange(len(chosen), device=self.device)].cpu()
            fooled = margin < 0
            self.robust[chosen[fooled]] = False
            self.adversarial[chosen[fooled]] = lowest[fooled]
            nearer = ~fooled & (margin < self.closest[chosen])
            self.closest[chosen[nearer]] = margin[nearer]
            self.adversarial[chosen[nearer]] = lowest[nearer]
            if gradient:
                self.gradient_closest[chosen] = torch.minimum(self.gradient_closest[chosen], margin)


def channels_last_copy(model: torch.nn.Module, example: torch.Tensor) -> tuple[torch.nn.Module, str]:
    """A copy of ``model`` in channels-last memory format, where its logits on ``example`` match the
    model's (:func:`invarbench.evaluation.same_logits`); else ``model``; and which one. On the CPU,
    oneDNN's pooling and convolutions are faster in that format."""
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


def _single_run(
    apgd: APGDAttack, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One run of pyautoattack's APGD on points it classifies correctly, seeded as its ``perturb`` seeds
    it; targeted APGD with a chosen target per point (its ``perturb`` takes the k-th largest logit for
    every point instead). Returns its adversarials and its examples of highest loss."""
    apgd.init_hyperparam(x)
    if target is not None:
        apgd.y_target = target
    torch.random.manual_seed(apgd.seed)
    if x.is_cuda:
        torch.cuda.random.manual_seed(apgd.seed)
    highest_loss, _, _, adversarial = apgd.attack_single_run(x, y)
    return adversarial, highest_loss


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
