"""invarbench.oracles: who decides the true label of a changed input.

An invariance attack succeeds only if the true label changed, and the attacked model cannot be the
judge. Every oracle returns one label per input, or ``ABSTAIN`` (-1) when it will not decide; every
invariance figure names the oracle that judged it.

- ``types.py``: the oracle protocol and the automatic oracles: ``ExactOracle`` (a synthetic data set's
  labelling function), ``LabelFileOracle`` (people's labels of a fixed set of images, in Tramèr et al.'s
  layout) and ``ProxyOracle`` (a vote of MNIST readers, named by a TOML file in ``models/oracles``).
- ``people.py``: people's labels collected by ``invarbench label`` (a labels database) and
  ``PeopleOracle``, which judges by their majorities (``people:DB``).
- ``calibration.py``: how well an oracle agrees with people on changed images.

:func:`resolve` turns an oracle's name (``--oracle``, a run's configuration, an entry's settings) into
an oracle for a data set; :func:`check_name` refuses a bad name before anything runs.
"""

from __future__ import annotations

from pathlib import Path

from invarbench.errors import ConfigError
from invarbench.oracles.people import PeopleOracle
from invarbench.oracles.types import (
    ABSTAIN,
    DEFAULT_ORACLES,
    ExactOracle,
    InvarianceSet,
    LabelFileOracle,
    Oracle,
    OracleDefinition,
    ProxyOracle,
    default_oracle,
    get_oracle_definition,
    list_oracles,
    load_invariance_sets,
    load_oracle,
)

#: The prefix of an oracle named by a labels database: ``people:DB``.
PEOPLE = "people:"
#: The prefix of the exact oracles of synthetic data sets: ``exact:spheres``.
EXACT = "exact:"


def check_name(name: str) -> None:
    """Refuse an oracle name that names nothing (a missing labels database, an unknown named oracle),
    naming the fix; before anything is written."""
    if name.startswith(PEOPLE):
        database = name[len(PEOPLE) :]
        if not Path(database).is_file():
            raise ConfigError(
                f"--oracle {name}: labels database {database} does not exist;"
                " create it with `invarbench label create SOURCE --db FILE`"
            )
    elif not name.startswith(EXACT):
        get_oracle_definition(name)


def resolve(name: str | None, dataset) -> Oracle:
    """The oracle named ``name`` for ``dataset``: ``people:DB`` (the majority labels of a labels
    database), ``exact:spheres``, a named proxy oracle (``invarbench oracle list``); None is the data
    set's default (:func:`default_oracle`)."""
    if name is None:
        return default_oracle(dataset)
    if name.startswith(PEOPLE):
        return PeopleOracle(name[len(PEOPLE) :])
    return load_oracle(name, dataset)


__all__ = [
    "ABSTAIN",
    "DEFAULT_ORACLES",
    "EXACT",
    "PEOPLE",
    "ExactOracle",
    "InvarianceSet",
    "LabelFileOracle",
    "Oracle",
    "OracleDefinition",
    "PeopleOracle",
    "ProxyOracle",
    "check_name",
    "default_oracle",
    "get_oracle_definition",
    "list_oracles",
    "load_invariance_sets",
    "load_oracle",
    "resolve",
]
