"""invarbench.attacks: perturbation attacks at fixed eps (FGSM, PGD, AutoAttack), minimum-norm attacks
(FMN) and invariance attacks (invariance-linf, invariance-l0, metameric, invariance-set) behind one
protocol (``base.py``), the norms and projections they share (``norms.py``), and the oracles that
judge invariance attacks.

Importing this package registers every attack; ``create_attack(name, **options)`` builds one.
"""

# Importing the attack modules registers their attacks (pgd is invarbench's engine, foolbox-pgd Foolbox's;
# square is invarbench's l_inf Square; aa-fast the AutoAttack-strength cascade).
# isort: off
# In registration order (as in ATTACKS and `invarbench attacks list`).
from invarbench.attacks import autoattack, foolbox_attacks, invariance  # noqa: F401
from invarbench.attacks import pgd  # noqa: F401
from invarbench.attacks import square  # noqa: F401
from invarbench.attacks import aa_fast  # noqa: F401

# isort: on
from invarbench.attacks.base import (
    ATTACKS,
    Attack,
    BaseAttack,
    Budget,
    MinimumNormAttack,
    PerturbationResult,
    ThreatModel,
    create_attack,
    register_attack,
)
from invarbench.attacks.invariance import InvarianceAttack, InvarianceContext
from invarbench.attacks.norms import perturbation_norm, project, project_perturbation

__all__ = [
    "ATTACKS",
    "Attack",
    "BaseAttack",
    "Budget",
    "InvarianceAttack",
    "InvarianceContext",
    "MinimumNormAttack",
    "PerturbationResult",
    "ThreatModel",
    "create_attack",
    "perturbation_norm",
    "project",
    "project_perturbation",
    "register_attack",
]
