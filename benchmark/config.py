"""A run's configuration: the attacks, models and threat models to evaluate, and how they are parsed."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from invarbench import oracles
from invarbench.attacks import ATTACKS, ThreatModel, create_attack
from invarbench.errors import ConfigError
from invarbench.models import BenchmarkModel, get_card, list_models, load_model
from invarbench.models.registry import checkpoint_sha256

# Options the runner reads itself and does not pass to the attack: ``eps`` restricts an attack to some
# of the configured eps values (e.g. AutoAttack only at the headline ones), ``cascade=false`` runs it on
# every correctly classified point whatever the attacks before it found (a full minimum-norm curve).
RUNNER_OPTIONS = ("eps", "cascade")

# The field's headline threat models per data set, the first being the default of `invarbench run`.
HEADLINE_THREATS = {
    "mnist": ("linf:0.3", "l2:2.0"),
    "spheres": ("linf:0.025",),
    "digits": ("linf:0.1",),
    "cifar10": ("linf:0.03137254901960784", "l2:0.5"),
}  # CIFAR-10: 8/255


@dataclass(frozen=True)
class AttackSpec:
    name: str
    options: tuple[tuple[str, Any], ...] = ()
    #: The registered attack that runs under ``name`` where that is another one: a regression check re-runs
    #: an entry's ``pgd`` stored before invarbench's engine with ``foolbox-pgd``, under the name (so the
    #: label, the jobs' seeds and the records' attack) the entry has.
    runs_as: str | None = None

    @classmethod
    def parse(cls, spec: str) -> AttackSpec:
        """``NAME`` or ``NAME:key=value,key=value``; list values are joined with ``+``."""
        name, _, rest = spec.partition(":")
        options = []
        for item in filter(None, rest.split(",")):
            key, separator, value = item.partition("=")
            if not separator or not key:
                raise ConfigError(
                    f"attack specification {spec!r}: options are key=value pairs, e.g. pgd:restarts=5,steps=100"
                )
            options.append((key.strip(), _parse_value(value.strip())))
        attack = cls(name.strip(), tuple(options))
        attack.create()
        return attack

    def create(self):
        return create_attack(
            self.runs_as or self.name, **{key: value for key, value in self.options if key not in RUNNER_OPTIONS}
        )

    @property
    def only_epsilons(self) -> tuple[float, ...] | None:
        """The eps values this attack is restricted to (``eps=0.3+2.0``), or None for every configured one."""
        for key, value in self.options:
            if key == "eps":
                values = value if isinstance(value, list) else [value]
                try:
                    return tuple(float(item) for item in values)
                except (TypeError, ValueError) as error:
                    raise ConfigError(
                        f"attack {self.label()!r}: eps= takes numbers joined by '+', e.g. autoattack:eps=0.3+2.0"
                    ) from error
        return None

    @property
    def cascades(self) -> bool:
        """False for ``cascade=false``: the attack runs on every correctly classified point."""
        return dict(self.options).get("cascade", True) is not False

    def provenance(self) -> dict[str, str]:
        """What the settings record beside the given options, so that a check re-runs an entry with what
        made it: the implementation of attacks that declare one (``pgd``), and the guide of attacks that
        choose by one (``invariance-l0``), the default included."""
        declared = getattr(ATTACKS[self.runs_as or self.name], "implementation", None)
        guide = self.create().options().get("guide")
        return {**({"implementation": declared} if declared else {}), **({"guide": guide} if guide else {})}

    def label(self) -> str:
        return (
            self.name
            if not self.options
            else f"{self.name}:{','.join(f'{key}={value}' for key, value in self.options)}"
        )


def _parse_value(text: str) -> Any:
    if "+" in text:
        return [_parse_value(part) for part in text.split("+")]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: a registry name, a checkpoint path with what is needed to load it, or an
    in-memory model (``ModelSpec.from_module``, for ``invarbench.evaluate``)."""

    reference: str
    dataset: str
    architecture: str | None = None
    architecture_args: tuple[tuple[str, Any], ...] = ()
    #: An in-memory model, evaluated as it is (a copy: the caller's module is never moved or changed).
    module: BenchmarkModel | None = field(default=None, compare=False, repr=False)
    #: The key of an in-memory model.
    name: str | None = None

    @classmethod
    def from_module(cls, module: BenchmarkModel, dataset: str, name: str | None = None) -> ModelSpec:
        """An in-memory model, known by ``name`` (default: its network's class name)."""
        network = type(module.network)
        return cls(
            f"in-memory:{network.__module__}.{network.__qualname__}",
            dataset,
            module=module,
            name=name or network.__name__,
        )

    @property
    def key(self) -> str:
        if self.module is not None:
            return self.name or self.reference
        return self.reference if self.is_registered else Path(self.reference).stem

    @cached_property
    def is_registered(self) -> bool:
        return self.module is None and self.reference in list_models(role=None)

    def load(self, num_classes: int, bounds: tuple[float, float]) -> BenchmarkModel:
        if self.module is not None:
            return copy.deepcopy(self.module)
        if self.is_registered:
            return load_model(self.reference)
        args = dict(self.architecture_args)
        return load_model(
            self.reference,
            architecture=self.architecture,
            architecture_args=args,
            num_classes=num_classes,
            bounds=bounds,
        )

    @property
    def invertible(self) -> bool:
        if self.module is not None:
            return self.module.invertible
        return get_card(self.reference).invertible if self.is_registered else self.architecture == "fi-revnet"

    def checkpoint_sha256(self) -> str:
        return self._module_sha256 if self.module is not None else checkpoint_sha256(self.reference)

    @cached_property
    def _module_sha256(self) -> str:
        """The sha256 of an in-memory model's state_dict as torch.save writes it."""
        assert self.module is not None, "only in-memory models have a module"
        buffer = io.BytesIO()
        torch.save(self.module.network.state_dict(), buffer)
        return hashlib.sha256(buffer.getvalue()).hexdigest()

    def module_settings(self) -> dict[str, Any]:
        """What identifies an in-memory model in a run's configuration (nothing for other models, so
        their configurations and digests are as before): its weights' sha256, bounds, classes and
        normalisation."""
        if self.module is None:
            return {}
        module = self.module
        return {
            "checkpoint_sha256": self._module_sha256,
            "bounds": list(module.bounds),
            "num_classes": module.num_classes,
            "mean": module.mean.flatten().tolist(),
            "std": module.std.flatten().tolist(),
        }


@dataclass(frozen=True)
class RunConfig:
    models: tuple[ModelSpec, ...]
    threats: tuple[ThreatModel, ...]
    attacks: tuple[AttackSpec, ...]
    n: int = 1000
    seed: int = 0
    shard_size: int = 100
    cascade: bool = True
    #: The oracle that judges invariance candidates, by name (``invarbench oracle list``, ``people:DB``);
    #: None = each data set's default.
    oracle: str | None = None

    def __post_init__(self):
        if not self.models:
            raise ConfigError(
                "no model given; name a registered model (see `invarbench models list`) or a checkpoint path"
            )
        if not self.attacks:
            raise ConfigError("no attack given; pass --attack NAME (e.g. --attack pgd)")
        if self.n < 1 or self.shard_size < 1:
            raise ConfigError(f"--n ({self.n}) and --shard-size ({self.shard_size}) must be positive")
        # Refused before anything is written: a misspelt oracle must not leave a run directory behind.
        if self.oracle:
            oracles.check_name(self.oracle)
        keys = [model.key for model in self.models]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"models {keys} repeat a name; list each model once")

    @classmethod
    def build(
        cls,
        models: tuple[ModelSpec, ...],
        threats: str | ThreatModel | list | tuple | None,
        attacks: str | AttackSpec | list | tuple,
        **settings: Any,
    ) -> RunConfig:
        """The configuration of ``invarbench run`` and ``invarbench.evaluate`` alike: ``threats`` as
        ``"linf:0.1,0.3"`` texts or ThreatModels, one per norm once merged (None: each model's training
        threat model, else its data set's headline one); ``attacks`` as ``"pgd:steps=10"`` texts or
        AttackSpecs, in cascade order; ``settings`` the other fields (n, seed, shard_size, cascade, oracle)."""
        if threats is None:
            chosen = default_threats(models)
        else:
            listed = [threats] if isinstance(threats, (str, ThreatModel)) else list(threats)
            chosen = merge_threats(
                [item if isinstance(item, ThreatModel) else ThreatModel.parse(item) for item in listed]
            )
        listed_attacks = [attacks] if isinstance(attacks, (str, AttackSpec)) else list(attacks)
        specs = tuple(item if isinstance(item, AttackSpec) else AttackSpec.parse(item) for item in listed_attacks)
        return cls(models, chosen, specs, **settings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": [
                {
                    "reference": model.reference,
                    "key": model.key,
                    "dataset": model.dataset,
                    "architecture": model.architecture,
                    "architecture_args": dict(model.architecture_args),
                    **model.module_settings(),
                }
                for model in self.models
            ],
            "threats": [str(threat) for threat in self.threats],
            # An attack whose name once meant another implementation records its own (pgd: invarbench's engine;
            # settings without it were Foolbox's), so that checks re-run stored entries with what made them.
            # An attack that chooses by a guide records it (settings without one were made by the former search).
            "attacks": [
                {"name": attack.name, "options": dict(attack.options), **attack.provenance()} for attack in self.attacks
            ],
            "n": self.n,
            "seed": self.seed,
            "shard_size": self.shard_size,
            "cascade": self.cascade,
            # Only when chosen, so that runs made before the option existed keep their digest and resume.
            **({"oracle": self.oracle} if self.oracle else {}),
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def default_name(self) -> str:
        first = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.models[0].key)
        more = f"+{len(self.models) - 1}" if len(self.models) > 1 else ""
        return f"{first}{more}-{self.digest()[:10]}"


def default_threats(specs: tuple[ModelSpec, ...]) -> tuple[ThreatModel, ...]:
    """The threat models a model was trained against, else its data set's headline threat model."""
    threats: list[ThreatModel] = []
    for spec in specs:
        card = get_card(spec.reference) if spec.is_registered else None
        if card and card.threat_model["norm"] != "none":
            candidate = ThreatModel(card.threat_model["norm"], (float(card.threat_model["eps"]),))
        else:
            candidate = ThreatModel.parse(HEADLINE_THREATS.get(spec.dataset, ("linf:0.3",))[0])
        merged = next((threat for threat in threats if threat.norm == candidate.norm), None)
        if merged is None:
            threats.append(candidate)
        else:
            threats[threats.index(merged)] = ThreatModel(
                merged.norm, tuple(sorted(set(merged.epsilons) | set(candidate.epsilons)))
            )
    return tuple(threats)


def merge_threats(threats: list[ThreatModel]) -> tuple[ThreatModel, ...]:
    """One threat model per norm: ``--threat linf:0.1 --threat linf:0.3`` is ``linf:0.1,0.3``."""
    merged: dict[str, set[float]] = {}
    for threat in threats:
        merged.setdefault(threat.norm, set()).update(threat.epsilons)
    return tuple(ThreatModel(norm, tuple(sorted(epsilons))) for norm, epsilons in merged.items())


# Names that once meant another implementation, and the attack that implementation is registered as now:
# an entry whose settings record no implementation for them (or another than today's) was made with the
# former one, and its records are re-run with it (``pgd`` was Foolbox's PGD until invarbench's engine);
# likewise an ``invariance-l0`` whose settings record no guide, made by the search that chose by its judge.
FORMER_IMPLEMENTATIONS = {"pgd": "foolbox-pgd"}
FORMER_UNGUIDED = {"invariance-l0": "invariance-l0-judge-guided"}


def entry_config(entry: dict, points: int) -> RunConfig:
    """The configuration that re-runs a leaderboard entry's settings on its first ``points`` points (what
    ``invarbench check`` and the entry's adversarial gallery evaluate)."""
    settings = entry["settings"]
    threats = [ThreatModel.parse(spec) for spec in settings["threats"]]
    attacks = tuple(
        AttackSpec(attack["name"], _recorded_options(attack), runs_as=_former(attack)) for attack in settings["attacks"]
    )
    model = ModelSpec(entry["reference"], entry["dataset"])
    return RunConfig(
        (model,),
        tuple(threats),
        attacks,
        n=points,
        seed=settings["seed"],
        shard_size=settings["shard_size"],
        cascade=settings["cascade"],
        oracle=settings.get("oracle"),
    )


def _recorded_options(attack: dict) -> tuple[tuple[str, Any], ...]:
    """An entry's attack options with the guide its settings record: the entry is re-run with its guide,
    whatever today's default."""
    guide = {"guide": attack["guide"]} if "guide" in attack else {}
    return tuple({**attack["options"], **guide}.items())


def rerun_as(attack: dict) -> str:
    """The registered attack that reproduces an entry's ``attack`` settings (``foolbox-pgd`` for a ``pgd``
    stored before ``pgd`` was invarbench's engine, which records no implementation;
    ``invariance-l0-judge-guided`` for an ``invariance-l0`` stored before it had a guide)."""
    name = attack["name"]
    if name in FORMER_IMPLEMENTATIONS and attack.get("implementation") != getattr(
        ATTACKS[name], "implementation", None
    ):
        return FORMER_IMPLEMENTATIONS[name]
    if name in FORMER_UNGUIDED and "guide" not in attack:
        return FORMER_UNGUIDED[name]
    return name


def _former(attack: dict) -> str | None:
    """``rerun_as`` where it differs from the entry's name (the spec then runs it under that name), else None."""
    registered = rerun_as(attack)
    return registered if registered != attack["name"] else None
