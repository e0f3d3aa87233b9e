"""Type-check invarbench's core modules with mypy.

The package is assembled from top-level folders (``package-dir`` in pyproject.toml: ``invarbench`` is
``benchmark/``, ``invarbench.attacks`` is ``attacks/``, ...), a layout mypy cannot read from the folders
themselves. This script mirrors the package, as symbolic links, into ``build/typecheck/invarbench`` and
runs mypy there on the modules given (default ``CORE``), so that each module is checked under its
import name and its imports of other invarbench modules resolve.

    python tools/typecheck.py [MODULE ...]
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIRROR = ROOT / "build" / "typecheck"

#: The core: configuration, planning, jobs, the runner, executors, the store, results and the oracles.
CORE = (
    "invarbench.config",
    "invarbench.plan",
    "invarbench.jobs",
    "invarbench.runner",
    "invarbench.executors",
    "invarbench.store",
    "invarbench.results",
    "invarbench.tracks",
    "invarbench.oracles",
)


def mirror() -> Path:
    """``build/typecheck/invarbench``: every package of pyproject.toml's layout as a folder of links."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = setuptools["package-dir"]
    for package in setuptools["packages"]:
        root = max((name for name in roots if package == name or package.startswith(name + ".")), key=len)
        source = ROOT / roots[root] / Path(*package[len(root) :].split(".")[1:])
        target = MIRROR / Path(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for stale in target.glob("*.py"):
            if stale.is_symlink() and not stale.resolve().exists():
                stale.unlink()
        for path in source.glob("*.py"):
            link = target / path.name
            if not link.is_symlink():
                link.unlink(missing_ok=True)
                link.symlink_to(path)
    return MIRROR


def main(argv: list[str]) -> int:
    modules = argv or list(CORE)
    folder = mirror()
    arguments = [a for module in modules for a in ("-p" if _is_package(module) else "-m", module)]
    command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), *arguments]
    return subprocess.call(command, cwd=folder)


def _is_package(module: str) -> bool:
    return (MIRROR / Path(*module.split(".")) / "__init__.py").exists()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
