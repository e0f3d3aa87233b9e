"""invarbench.attacks: perturbation attacks (PGD, AutoAttack, minimum-norm) and invariance attacks."""
