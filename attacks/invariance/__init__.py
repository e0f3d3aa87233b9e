"""Invariance attacks: change the true label while the model's prediction may stay put.

- ``invariance-linf``: Tramèr et al.'s excessive-invariance search in the l_inf ball. For each test
  point and each other class, the nearest training image of that class over a grid of shifts and
  rotations of the point (775 queries), aligned back by the inverse transform, projected into the
  eps-ball; among the allowed target classes the candidate that removes the least ink is kept.
- ``invariance-l0``: binarised images; the nearest other-class training image over random affine
  copies of the training set, then the subset of connected clusters of differing pixels, within a
  budget of k changed pixels, that its guide (``guide.py``: a model that is not the judge) finds most
  convincingly the target class. ``invariance-l0-judge-guided`` is the former search, which chose by
  its judge; it re-checks the entries stored by it.
- ``metameric``: Jacobsen et al.'s metamers F^-1(z_s(x_a), z_n(x_b)) for invertible models; for other
  models, gradient metamers: from x_b, inside an eps-ball around it, match the model's logits on x_a.

Candidates are judged by an oracle (see ``oracles.py``), never by the attacked model; a search that
chooses among candidates chooses by a guide, never by that oracle (the one exception: an exact
oracle, a synthetic data set's own labelling function, which the l_inf search may climb). The search
steps that do not depend on the model (nearest neighbours) are cached per data set and points.
"""

# isort: off
# In the order the attacks register (as in ATTACKS and `invarbench attacks list`).
from invarbench.attacks.invariance.base import InvarianceAttack, InvarianceContext, InvarianceResult
from invarbench.attacks.invariance.transforms import (
    CACHE_VERSION,
    ROTATIONS,
    SHIFTS,
    affine_matrices,
    random_affine_copies,
    transform_grid,
    warp,
)
from invarbench.attacks.invariance.linf import TRAMER_TARGETS, InvarianceLinf, allowed_targets, search_neighbours
from invarbench.attacks.invariance.metameric import Metameric, metamer_partners
from invarbench.attacks.invariance.guide import DEFAULT_GUIDE, load_guide
from invarbench.attacks.invariance.l0 import InvarianceL0, InvarianceL0JudgeGuided
from invarbench.attacks.invariance.fixed_set import InvarianceSetAttack

# isort: on

__all__ = [
    "CACHE_VERSION",
    "DEFAULT_GUIDE",
    "ROTATIONS",
    "SHIFTS",
    "TRAMER_TARGETS",
    "InvarianceAttack",
    "InvarianceContext",
    "InvarianceL0",
    "InvarianceL0JudgeGuided",
    "InvarianceLinf",
    "InvarianceResult",
    "InvarianceSetAttack",
    "Metameric",
    "affine_matrices",
    "allowed_targets",
    "load_guide",
    "metamer_partners",
    "random_affine_copies",
    "search_neighbours",
    "transform_grid",
    "warp",
]
