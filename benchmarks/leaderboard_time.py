"""Where `make leaderboard`'s time went: per model and track, the jobs' wall time and each attack's summed
job time, read from the run folders `make leaderboard` wrote, beside the whole command's wall time.

    time make leaderboard
    python benchmarks/leaderboard_time.py --wall SECONDS [--runs DIR] [--models NAME ...]

``--wall`` is the real time `time make leaderboard` printed (the whole command: data, runs, entries,
tables, site), recorded as given. Every run's manifest must say ``complete``. A run resumed after a kill
counts in its jobs wall time only the jobs of its last start; its manifest's first start and its end
(``created``, ``finished``) are recorded beside it.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

from invarbench.environment import measurement_header
from invarbench.io import atomic_write_text

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# `make leaderboard` calls its canned recipe once per list of models: $(call regenerate,$(LIST),$(PERTURBATION
# ARGUMENTS),perturbation run name,$(INVARIANCE ARGUMENTS),invariance run name).
REGENERATE = re.compile(r"\$\(call regenerate,\$\((\w+)\),\$\((\w+)\),([\w.-]+),\$\((\w+)\),([\w.-]+)\)")


def regenerate_calls(makefile: Path = ROOT / "Makefile") -> dict[str, dict[str, tuple[str, str]]]:
    """Per list of models (``ZOO``, ``SPHERES``), per track: the run name ``make leaderboard`` gives each
    model's run (``--name``, with ``{model}``) and the Makefile variable holding that run's arguments, read
    from the ``regenerate`` calls of the Makefile, so that they are written down once."""
    calls = {
        models: {
            "perturbation": (f"{perturbation_name}-{{model}}", perturbation),
            "invariance": (f"{invariance_name}-{{model}}", invariance),
        }
        for models, perturbation, perturbation_name, invariance, invariance_name in REGENERATE.findall(
            makefile.read_text(encoding="utf-8")
        )
    }
    if not calls:
        raise SystemExit(
            f"{makefile} has no `$(call regenerate,...)` line: which runs make leaderboard makes is unknown"
        )
    return calls


def makefile_words(name: str, makefile: Path = ROOT / "Makefile") -> list[str]:
    """The words of ``NAME := ...`` or ``NAME ?= ...`` in the Makefile (one line, no make functions)."""
    for line in makefile.read_text(encoding="utf-8").splitlines():
        for operator in (":=", "?="):
            if line.startswith(f"{name} {operator}"):
                return shlex.split(line.partition(operator)[2])
    raise SystemExit(f"{makefile} has no line `{name} := ...` or `{name} ?= ...`")


def run_row(run_dir: Path, model: str, track: str) -> dict:
    """One run's figures from its manifest: jobs wall, summed job time per attack, executor, resumes."""
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.exists():
        raise SystemExit(
            f"{run_dir} has no manifest.json: `make leaderboard` has not run {model}'s {track} track there; "
            f"run it, or pass --runs with the folder it wrote to"
        )
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("status") != "complete":
        status = manifest.get("status")
        raise SystemExit(f"{manifest_path}: status {status!r}; finish the run (`make leaderboard`) first")
    timings = manifest["timings_seconds"]
    per_attack = timings.get(model) or next(iter(timings.values()))
    return {
        "model": model,
        "track": track,
        "run": run_dir.name,
        "jobs_wall_seconds": round(manifest["jobs_wall_seconds"], 1),
        "attack_seconds": {attack: round(seconds, 1) for attack, seconds in per_attack.items()},
        "executor": manifest.get("executor", {}),
        "created": manifest.get("created"),
        "finished": manifest.get("finished"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wall", type=float, required=True, help="the real time of `time make leaderboard`, seconds")
    parser.add_argument("--runs", type=Path, default=Path.home() / ".cache" / "invarbench" / "runs")
    parser.add_argument("--models", nargs="+", default=None, help="default: the Makefile's ZOO and SPHERES")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "leaderboard_time.json")
    args = parser.parse_args()
    groups = regenerate_calls()
    lists = {group: makefile_words(group) for group in groups}
    models = args.models or [model for group in groups for model in lists[group]]
    rows = []
    for model in models:
        # A model named in no list is read as a zoo model.
        group = next((group for group in groups if model in lists[group]), "ZOO")
        for track, (pattern, variable) in groups[group].items():
            rows.append({**run_row(args.runs / pattern.format(model=model), model, track), "settings": variable})
    report = {
        **measurement_header("leaderboard_time", threads=rows[0]["executor"].get("threads_per_worker")),
        "wall_seconds": args.wall,
        "models": models,
        "arguments": {variable: makefile_words(variable) for runs in groups.values() for _, variable in runs.values()},
        "rows": rows,
    }
    atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
    jobs = sum(row["jobs_wall_seconds"] for row in rows)
    print(f"{len(rows)} runs, jobs wall {jobs:.0f} s of the command's {args.wall:.0f} s; written {args.out}")


if __name__ == "__main__":
    main()
