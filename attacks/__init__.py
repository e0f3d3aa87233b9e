"""invarbench.attacks: perturbation attacks (FGSM, PGD, FMN, AutoAttack) behind one protocol.

Importing this package registers every attack; ``create_attack(name, **options)`` builds one.
"""

from invarbench.attacks import autoattack, foolbox_attacks  # noqa: F401  (registers the attacks)
from invarbench.attacks.base import ATTACKS, Attack, PerturbationResult, ThreatModel, create_attack, perturbation_norm, register_attack

__all__ = ["ATTACKS", "Attack", "PerturbationResult", "ThreatModel", "create_attack", "perturbation_norm", "register_attack"]
