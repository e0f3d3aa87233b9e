"""The plan of a run: its jobs (model x threat model x attack x shard), each with a derived seed."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from invarbench.attacks import ThreatModel
from invarbench.config import AttackSpec, RunConfig
from invarbench.errors import ConfigError


@dataclass(frozen=True)
class Job:
    model: str
    threat: ThreatModel
    attack_index: int
    attack: AttackSpec
    shard: int
    start: int
    stop: int
    seed: int

    @property
    def id(self) -> str:
        model = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.model)
        return f"{model}__{self.threat.norm}__{self.attack_index:02d}-{self.attack.name}__shard{self.shard:05d}"


def derive_seed(*parts: object) -> int:
    """A seed that depends only on the job, never on the order jobs run in."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:8], 16) % 2**31


def attack_threats(attack: AttackSpec, threats: tuple[ThreatModel, ...], invertible: bool) -> list[ThreatModel]:
    """The threat models an attack runs under: perturbation attacks under every configured one;
    invariance attacks under those their norm allows (exact metamers and l_0 budgets once, as their own
    pseudo-norm)."""
    if attack.kind != "invariance":
        only = attack.only_epsilons
        if only is None:
            return list(threats)
        restricted = [
            ThreatModel(
                threat.norm, tuple(eps for eps in threat.epsilons if any(abs(eps - wanted) < 1e-12 for wanted in only))
            )
            for threat in threats
        ]
        unknown = [
            eps for eps in only if not any(abs(eps - value) < 1e-12 for threat in threats for value in threat.epsilons)
        ]
        if unknown:
            raise ConfigError(
                f"attack {attack.label()!r} asks for eps {unknown}, which no --threat configures; add them to a"
                " --threat or drop them from eps="
            )
        return [threat for threat in restricted if threat.epsilons]
    instance = attack.create()
    selected: list[ThreatModel] = []
    for threat in threats:
        budgets = instance.budgets(threat, invertible)
        if not budgets:
            continue
        # A job runs one norm (or pseudo-norm) at every budget of it.
        candidate = ThreatModel(budgets[0].norm, tuple(budget.value for budget in budgets))
        if candidate not in selected:
            selected.append(candidate)
    return selected


def plan(config: RunConfig) -> list[Job]:
    jobs = []
    for model in config.models:
        for attack_index, attack in enumerate(config.attacks):
            for threat in attack_threats(attack, config.threats, model.invertible):
                for shard, start in enumerate(range(0, config.n, config.shard_size)):
                    seed = derive_seed(config.seed, model.key, threat, attack_index, attack.label(), shard)
                    jobs.append(
                        Job(
                            model.key,
                            threat,
                            attack_index,
                            attack,
                            shard,
                            start,
                            min(start + config.shard_size, config.n),
                            seed,
                        )
                    )
    # Threat-major order within a model, as before invariance attacks existed: the cascade needs the
    # cheaper attacks of a shard first, which attack order within a threat gives.
    order = {
        (model.key, threat.norm): position
        for position, (model, threat) in enumerate((m, t) for m in config.models for t in config.threats)
    }
    return sorted(
        jobs,
        key=lambda job: (order.get((job.model, job.threat.norm), len(order)), job.model, job.attack_index, job.shard),
    )
