"""invarbench.attacks: perturbation attacks (FGSM, PGD, FMN, AutoAttack) and invariance attacks
(invariance-linf, invariance-l0, metameric) behind one protocol, and the oracles that judge the latter.

Importing this package registers every attack; ``create_attack(name, **options)`` builds one.
"""

from invarbench.attacks import autoattack, foolbox_attacks, invariance  # noqa: F401  (registers the attacks)
from invarbench.attacks import pgd  # noqa: F401,E402  (registers pgd, invarbench's engine; foolbox-pgd is Foolbox's)
from invarbench.attacks import aa_fast  # noqa: F401,E402  (registers aa-fast)
from invarbench.attacks.base import ATTACKS, Attack, PerturbationResult, ThreatModel, create_attack, perturbation_norm, register_attack

__all__ = ["ATTACKS", "Attack", "PerturbationResult", "ThreatModel", "create_attack", "perturbation_norm", "register_attack"]
