"""docs/design.md stays true to the code: every module (or module attribute) it names exists, every file
it names exists, and every module of the package is named there."""

import importlib
import re

from test_imports import MODULES, ROOT

DESIGN = ROOT / "docs" / "design.md"
#: `invarbench.x.y`, optionally followed by its submodules in parentheses: `invarbench.attacks` (`base`, `pgd`).
NAMED = re.compile(r"`(invarbench(?:\.\w+)*)`(?: \(((?:`\w+`(?:, )?)+)\))?")
#: Source files named by path, e.g. `attacks/__init__.py` or `tools/typecheck.py`.
PATH = re.compile(r"`((?:\w+/)+\w+\.\w+)`")


def _named() -> set[str]:
    names = set()
    for name, submodules in NAMED.findall(DESIGN.read_text()):
        names.add(name)
        names.update(f"{name}.{sub}" for sub in re.findall(r"`(\w+)`", submodules or ""))
    return names


def _defines(module: str, attribute: str) -> bool:
    return hasattr(importlib.import_module(module), attribute)


def test_every_module_the_design_names_exists():
    for name in sorted(_named()):
        if name in MODULES:
            continue
        module, _, attribute = name.rpartition(".")
        assert module in MODULES and _defines(module, attribute), f"docs/design.md names {name}, which does not exist"


def test_every_path_the_design_names_exists():
    for path in PATH.findall(DESIGN.read_text()):
        assert (ROOT / path).exists(), f"docs/design.md names {path}, which does not exist"


def test_every_module_of_the_package_is_in_the_design():
    named = _named()
    missing = sorted(module for module in MODULES if module not in named)
    assert not missing, f"docs/design.md does not name {missing}; add them to its layers"
