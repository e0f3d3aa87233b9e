"""AutoAttack (Croce & Hein) through the official implementation, ``pyautoattack``."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import pyautoattack
import torch
from pyautoattack.state import EvaluationState

from invarbench.attacks.base import Attack, PerturbationResult, register_attack
from invarbench.attacks.norms import perturbation_norm, project_perturbation
from invarbench.errors import ConfigError
from invarbench.evaluation import model_device

VERSIONS = ("standard", "plus", "rand", "custom")
SUB_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
NORM_NAMES = {"linf": "Linf", "l2": "L2"}
# The DLR loss compares the largest logits: untargeted DLR needs 3 classes, targeted DLR 4.
MIN_CLASSES = {"apgd-dlr": 3, "apgd-t": 4}
# pyautoattack's own reliability checks (its checks.py), by a phrase of the message each one logs.
RELIABILITY_FLAGS = {
    "square Attack has decreased": "square_beats_white_box",
    "randomized defense": "randomised",
    "probability distribution": "probability_outputs",
    "zero gradient": "zero_gradients",
    "dynamic defense": "dynamic",
    "not possible to use": "too_few_classes",
}


def reliability_flag(message: str) -> str:
    """The short name of one of pyautoattack's warnings (``other`` for one this version does not know)."""
    return next((flag for phrase, flag in RELIABILITY_FLAGS.items() if phrase.lower() in message.lower()), "other")


class _Collect(logging.Handler):
    def __init__(self, messages: list[str]):
        super().__init__(logging.WARNING)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def collected_warnings(logger: logging.Logger, messages: list[str]):
    """Collect what pyautoattack warns about, through its logger or ``warnings.warn``, into ``messages``."""
    handler = _Collect(messages)
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        messages.extend(
            str(warning.message)
            for warning in caught
            if "pyautoattack" in (warning.filename or "") or reliability_flag(str(warning.message)) != "other"
        )
    finally:
        logger.removeHandler(handler)


@register_attack
class AutoAttack(Attack):
    """The AutoAttack ensemble, one eps at a time, on the points still robust at that eps.

    ``version`` is standard, plus, rand or custom (then ``attacks`` lists the sub-attacks). The number
    of target classes of APGD-T and FAB-T is derived from the model's number of classes, and
    sub-attacks whose loss needs more classes than the model has are left out (recorded in the
    results). With a ``workspace`` the official state file is kept there, so an interrupted
    evaluation resumes after the sub-attacks it completed.
    """

    name = "autoattack"
    deterministic = False

    def __init__(self, *, version: str = "standard", attacks: list[str] | None = None, batch_size: int = 500):
        if version not in VERSIONS:
            raise ConfigError(f"autoattack: unknown version {version!r}; use one of {', '.join(VERSIONS)}")
        if (version == "custom") != (attacks is not None):
            raise ConfigError(
                "autoattack: give a list of attacks exactly when version='custom' (e.g. attacks=['apgd-ce', 'square'])"
            )
        unknown = sorted(set(attacks or ()) - set(SUB_ATTACKS))
        if unknown:
            raise ConfigError(f"autoattack: unknown sub-attacks {unknown}; choose from {', '.join(SUB_ATTACKS)}")
        self.version, self.attacks, self.batch_size = version, list(attacks) if attacks else None, batch_size

    def _ensemble(
        self, model, *, norm: str, eps: float, seed: int, input_shape: tuple[int, ...], counter: PassCounter
    ) -> tuple[pyautoattack.AutoAttack, dict]:
        device = model_device(model)
        num_classes = model.num_classes
        ensemble = pyautoattack.AutoAttack(
            UnitBox(model, input_shape, counter),
            norm=NORM_NAMES[norm],
            eps=eps,
            version=self.version,
            attacks=self.attacks,
            seed=seed,
            device=device,
        )
        ensemble.logger.setLevel(logging.WARNING)
        targets = min(9, num_classes - 1)
        ensemble.apgd_targeted.n_target_classes = targets
        ensemble.fab.n_target_classes = targets
        left_out = [attack for attack in ensemble.attacks_to_run if num_classes < MIN_CLASSES.get(attack, 0)]
        ensemble.attacks_to_run = [attack for attack in ensemble.attacks_to_run if attack not in left_out]
        if not ensemble.attacks_to_run:
            raise ConfigError(
                f"autoattack: none of the sub-attacks {left_out} works with {num_classes} classes; choose "
                "version='custom' with apgd-ce, fab or square"
            )
        details = {
            "sub_attacks": list(ensemble.attacks_to_run),
            "left_out_for_num_classes": left_out,
            "n_target_classes": targets,
        }
        return ensemble, details

    def run(self, model, images, labels, *, norm, epsilons, seed, active, workspace=None):
        success = torch.ones(len(epsilons), len(labels), dtype=torch.bool)
        norms = torch.full((len(epsilons), len(labels)), float("nan"))
        predictions = torch.full((len(epsilons), len(labels)), -1, dtype=torch.long)
        details: dict = {}
        messages: list[str] = []
        device = model_device(model)
        counter = PassCounter()
        if workspace is not None:
            workspace.mkdir(parents=True, exist_ok=True)
        for index, eps in enumerate(epsilons):
            points = active[index].nonzero().flatten()
            if len(points) == 0:
                continue
            low, high = model.bounds
            # pyautoattack clips to [0, 1]: attack in unit-box coordinates, where eps scales by 1/(high - low).
            ensemble, details = self._ensemble(
                model,
                norm=norm,
                eps=eps / (high - low),
                seed=seed,
                input_shape=tuple(images.shape[1:]),
                counter=counter,
            )
            state_path = workspace / f"autoattack-{norm}-{eps:g}.json" if workspace is not None else None
            still_robust, resumed = self._resume(ensemble, state_path, len(points))
            attacked = points[still_robust]
            if len(attacked) and ensemble.attacks_to_run:
                x, y = images[attacked], labels[attacked]
                # Square expects images (C, H, W): flat inputs are shown to it as (D, 1, 1).
                unit_x = ((x - low) / (high - low)).reshape(len(x), *image_shape(x.shape[1:]))
                # A resumed evaluation runs without a state file: pyautoattack 0.2.0 cannot restore its own
                # state mid-run (its adversarial labels are only initialised on a fresh start).
                raised: list[str] = []
                with collected_warnings(ensemble.logger, raised):
                    unit_adversarial, _ = ensemble.run_standard_evaluation(
                        unit_x, y, batch_size=self.batch_size, state_path=None if resumed else state_path
                    )
                messages.extend(f"eps {eps:g}: {message}" for message in raised)
                adversarial = project_perturbation(
                    x, low + unit_adversarial.reshape(x.shape) * (high - low), norm=norm, eps=eps, bounds=model.bounds
                )
                with torch.no_grad():
                    adversarial_labels = torch.cat(
                        [
                            model(adversarial[batch].to(device)).argmax(1)
                            for batch in _batches(len(adversarial), self.batch_size)
                        ]
                    ).cpu()
                success[index, attacked] = adversarial_labels != y.cpu()
                norms[index, attacked] = perturbation_norm((adversarial - x).cpu(), norm)
                predictions[index, attacked] = adversarial_labels
        unique = tuple(dict.fromkeys(messages))
        return PerturbationResult(
            self.name,
            norm,
            epsilons,
            success,
            norms,
            predictions,
            {
                **self.options(),
                **details,
                "passes": counter.as_dict(),
                "implementation": f"pyautoattack {pyautoattack.__version__}",
            },
            warnings=unique,
        )

    @staticmethod
    def _resume(ensemble, state_path: Path | None, count: int) -> tuple[torch.Tensor, bool]:
        """Points still to attack: all of them, or those an interrupted run's state file left robust.

        Sub-attacks the state file records as completed are dropped from ``ensemble``. Points broken
        before the interruption keep success=True with unknown adversarial label (-1) and norm (NaN):
        the official state file stores robustness flags, not adversarial examples.
        """
        if state_path is None or not state_path.exists():
            return torch.ones(count, dtype=torch.bool), False
        state = EvaluationState.from_disk(state_path)
        if state.robust_flags is None or len(state.robust_flags) != count:
            state_path.unlink()
            return torch.ones(count, dtype=torch.bool), False
        ensemble.attacks_to_run = [attack for attack in ensemble.attacks_to_run if attack not in state.run_attacks]
        return state.robust_flags.clone(), True


class PassCounter:
    """Forward and backward passes through a model, counted in points (a batch of 50 counts 50)."""

    def __init__(self):
        self.forward = 0
        self.backward = 0

    def as_dict(self) -> dict[str, int]:
        return {"forward": self.forward, "backward": self.backward}


class _CountBackward(torch.autograd.Function):
    """The identity on a model's logits that counts the points of every backward pass through them."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, counter: PassCounter) -> torch.Tensor:
        ctx.counter = counter
        return output.view_as(output)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        ctx.counter.backward += len(gradient)
        return gradient, None


class UnitBox(torch.nn.Module):
    """``model`` seen through inputs rescaled to [0, 1], the only input domain pyautoattack supports;
    with a ``counter``, every forward and backward pass through it is counted."""

    def __init__(self, model: torch.nn.Module, input_shape: tuple[int, ...], counter: PassCounter | None = None):
        super().__init__()
        self.model = model
        self.input_shape = tuple(input_shape)
        self.low, self.high = model.bounds
        self.counter = counter

    def to_model(self, unit_x: torch.Tensor) -> torch.Tensor:
        """Flat inputs in [0, 1] as the model's inputs (its shape and bounds)."""
        return self.low + unit_x.reshape(len(unit_x), *self.input_shape) * (self.high - self.low)

    def forward(self, unit_x: torch.Tensor) -> torch.Tensor:
        output = self.model(self.to_model(unit_x))
        if self.counter is None:
            return output
        self.counter.forward += len(unit_x)
        return _CountBackward.apply(output, self.counter) if output.requires_grad else output


def image_shape(shape: torch.Size) -> tuple[int, ...]:
    return tuple(shape) if len(shape) == 3 else (int(torch.tensor(shape).prod()), 1, 1)


def _batches(count: int, batch_size: int):
    for start in range(0, count, batch_size):
        yield slice(start, min(start + batch_size, count))
