"""invarbench.attacks: perturbation attacks at fixed eps (FGSM, PGD, AutoAttack), minimum-norm attacks
(FMN) and invariance attacks (invariance-linf, invariance-l0, metameric, invariance-set) behind one
protocol (``base.py``), the norms and projections they share (``norms.py``), and the oracles that
judge invariance attacks.

Importing this package registers every attack; ``create_attack(name, **options)`` builds one.
"""

from invarbench.attacks import autoattack, foolbox_attacks, invariance  # noqa: F401  (registers the attacks)
from invarbench.attacks import pgd  # noqa: F401,E402  (registers pgd, invarbench's engine; foolbox-pgd is Foolbox's)
from invarbench.attacks import square  # noqa: F401,E402  (registers square, invarbench's l_inf Square)
from invarbench.attacks import aa_fast  # noqa: F401,E402  (registers aa-fast)
from invarbench.attacks.base import ATTACKS, Attack, Budget, MinimumNormAttack, PerturbationResult, ThreatModel, create_attack, register_attack
from invarbench.attacks.invariance import InvarianceAttack, InvarianceContext
from invarbench.attacks.norms import perturbation_norm, project, project_perturbation

__all__ = ["ATTACKS", "Attack", "Budget", "InvarianceAttack", "InvarianceContext", "MinimumNormAttack", "PerturbationResult", "ThreatModel", "create_attack", "perturbation_norm", "project", "project_perturbation", "register_attack"]
