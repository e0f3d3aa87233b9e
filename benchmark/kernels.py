"""The vector kernels torch computes with on a CPU, and how to ask for the level an entry was made with.

Float rounding depends on the kernels: ATen's vectorised operators, oneDNN's convolutions and MKL's matrix
products each pick AVX2 or AVX-512 code at run time, and the two round differently. Most attacks absorb
that (an outcome flips only where it sat on a boundary), but an iterative search that follows its own
gradients for hundreds of steps, such as metameric sampling, turns a last-bit difference into another
trajectory: an entry made with AVX2 kernels reproduces on an AVX-512 machine only with AVX2 kernels.

Each library reads an environment variable once, when it first runs a kernel, so the level is set
before torch is imported: ``invarbench check`` does so for the entries it checks (see
:func:`kernel_environment`). A machine cannot run above its own level; asked for more, each library
falls back to what the CPU has. This module imports no torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

#: torch's name for a kernel level (``torch.backends.cpu.get_cpu_capability()``, recorded in an entry's
#: ``machine.cpu`` as "MODEL NAME (LEVEL)") -> the variables that make ATen, oneDNN and MKL use it.
KERNEL_ENVIRONMENT: dict[str, dict[str, str]] = {
    "DEFAULT": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "AVX2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "AVX512": {
        "ATEN_CPU_CAPABILITY": "avx512",
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
        "MKL_ENABLE_INSTRUCTIONS": "AVX512",
    },
}
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")

_LEVEL = re.compile(r"\(([A-Z0-9_]+)\)\s*$")


def recorded_level(cpu: str | None) -> str | None:
    """The kernel level in a recorded CPU description ("AMD EPYC (AVX2)" -> "AVX2"); None where the
    description is missing or names a level this module cannot set."""
    match = _LEVEL.search(cpu or "")
    return match.group(1) if match and match.group(1) in KERNEL_ENVIRONMENT else None


def kernel_environment(level: str) -> dict[str, str]:
    """The environment variables that make torch's CPU kernels run at ``level`` (set before torch loads)."""
    try:
        return dict(KERNEL_ENVIRONMENT[level])
    except KeyError:
        raise ValueError(f"unknown kernel level {level!r}; expected one of {', '.join(KERNEL_ENVIRONMENT)}") from None


def entry_levels(entries_dir: str | Path, names: Iterable[str] | None = None) -> dict[str, str | None]:
    """Entry stem -> the kernel level it was evaluated with (None where unrecorded or on CUDA), for the
    entries named by stem or model name (every entry without names). Reads the entries' JSON only."""
    wanted = set(names or ())
    levels: dict[str, str | None] = {}
    for path in sorted(Path(entries_dir).glob("*.json")):
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # the check itself names an unreadable entry
        if not isinstance(entry, dict) or (wanted and path.stem not in wanted and entry.get("model") not in wanted):
            continue
        machine = entry.get("machine") or {}
        on_cuda = str(entry.get("device", "cpu")).startswith("cuda")
        levels[path.stem] = None if on_cuda else recorded_level(machine.get("cpu"))
    return levels


def level_groups(levels: dict[str, str | None]) -> dict[str | None, list[str]]:
    """Entries grouped by the kernel level to check them at. An entry that records no level can be checked
    at any, so where only one level is recorded every entry is checked at it; None is this machine's own."""
    recorded = {level for level in levels.values() if level is not None}
    if len(recorded) <= 1:
        return {next(iter(recorded), None): list(levels)}
    groups: dict[str | None, list[str]] = {}
    for stem, level in levels.items():
        groups.setdefault(level, []).append(stem)
    return groups


__all__ = ["KERNEL_VARIABLES", "entry_levels", "kernel_environment", "level_groups", "recorded_level"]
