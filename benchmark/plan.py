"""The plan of a run: its jobs (model x threat model x attack x shard), each with a derived seed."""

from __future__ import annotations

import hashlib

from invarbench.attacks import ThreatModel
from invarbench.config import AttackSpec, RunConfig
from invarbench.jobs import Job
from invarbench.tracks import track_of


def derive_seed(*parts: object) -> int:
    """A seed that depends only on the job, never on the order jobs run in."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:8], 16) % 2**31


def attack_threats(attack: AttackSpec, threats: tuple[ThreatModel, ...], invertible: bool) -> list[ThreatModel]:
    """The threat models an attack runs under, as its track chooses them (see ``Track.threats``)."""
    return track_of(attack).threats(attack, threats, invertible)


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
