"""What `make leaderboard`'s perturbation run of one model costs with today's attacks against the
settings its stored entry was made with, on the first N test points, in one script.

- ``stored``: the entry's own settings (``leaderboard/entries/MODEL__mnist__perturbation.json``),
  re-run as `invarbench check` re-runs them (a ``pgd`` stored before `pgd` was invarbench's engine
  runs as ``foolbox-pgd``);
- ``make leaderboard``: the Makefile's ``PERTURBATION`` arguments (read from the Makefile, so this is
  what `make leaderboard` runs), with ``--n N``.

Both run as `make leaderboard` runs them: Ray, ``--workers`` workers x 1 thread, into fresh folders,
in alternating order over ``--repeats``. Reported per configuration: the jobs' wall time (the
manifest's ``jobs_wall_seconds``), each attack's summed job time, and the worst-case robust accuracy at
every threat, so that the cost and what it buys sit side by side.

    python benchmarks/leaderboard_cost.py [--model mnist-cnn-standard] [--n 100] [--workers 2] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
from pathlib import Path

from invarbench.cli import main as invarbench
from invarbench.config import entry_config
from invarbench.environment import measurement_header
from invarbench.executors import ExecutorSettings
from invarbench.results import WORST_CASE, robustness_frame
from invarbench.runner import run_benchmark

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def makefile_variable(name: str, makefile: Path = ROOT / "Makefile") -> list[str]:
    """The words of ``NAME := ...`` in the Makefile (one line, no make functions)."""
    for line in makefile.read_text(encoding="utf-8").splitlines():
        if line.startswith(f"{name} :="):
            return shlex.split(line.partition(":=")[2])
    raise SystemExit(f"{makefile} has no line `{name} := ...`; this script reads make leaderboard's arguments from it")


def _measure(run_dir: Path) -> dict:
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    frame = robustness_frame(summary["models"].items())
    worst = frame[frame["attack"] == WORST_CASE]
    return {
        "jobs_wall_seconds": manifest["jobs_wall_seconds"],
        "attack_seconds": next(iter(manifest["timings_seconds"].values())),
        "attack_order": summary["attack_order"],
        "worst_case": {f"{row.norm}:{row.setting}": row.robust_accuracy for row in worst.itertuples()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist-cnn-standard")
    parser.add_argument("--n", type=int, default=100, help="first N test points (default 100)")
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="Ray workers, 1 thread each (default 2, make leaderboard's on this machine)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs of each configuration, alternating (default 1)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "leaderboard_cost.json")
    args = parser.parse_args()

    entry_path = ROOT / "leaderboard" / "entries" / f"{args.model}__mnist__perturbation.json"
    if not entry_path.is_file():
        raise SystemExit(
            f"no stored perturbation entry {entry_path}; pass --model with one of"
            " leaderboard/entries/*__mnist__perturbation.json"
        )
    entry = json.loads(entry_path.read_text(encoding="utf-8"))
    leaderboard_arguments = makefile_variable("PERTURBATION")
    if "--n" in leaderboard_arguments:  # the Makefile's own --n (1000), replaced by this script's
        at = leaderboard_arguments.index("--n")
        del leaderboard_arguments[at : at + 2]
    leaderboard_arguments += ["--n", str(args.n)]
    stored = entry_config(entry, args.n)
    executor = ExecutorSettings("ray", workers=args.workers, threads_per_worker=1)
    ray_arguments = ["--executor", "ray", "--workers", str(args.workers), "--threads-per-worker", "1"]
    runs: dict[str, list[dict]] = {"stored": [], "make leaderboard": []}
    with tempfile.TemporaryDirectory(prefix="leaderboard-cost-") as scratch:
        for repeat in range(args.repeats):
            order = ["stored", "make leaderboard"] if repeat % 2 == 0 else ["make leaderboard", "stored"]
            for label in order:
                name = f"{label.replace(' ', '-')}-{repeat}"
                print(f"running {label} ({repeat + 1}/{args.repeats}) ...", flush=True)
                if label == "stored":
                    run_benchmark(stored, Path(scratch), name=name, progress=False, executor=executor)
                elif (
                    invarbench(
                        [
                            "run",
                            args.model,
                            *leaderboard_arguments,
                            *ray_arguments,
                            "--out",
                            scratch,
                            "--name",
                            name,
                            "--no-progress",
                        ]
                    )
                    != 0
                ):
                    raise SystemExit(f"`invarbench run {args.model} {shlex.join(leaderboard_arguments)}` failed")
                runs[label].append(_measure(Path(scratch) / name))
    report = {
        **measurement_header("leaderboard_cost", threads=1),
        "model": args.model,
        "n": args.n,
        "workers": args.workers,
        "stored_settings": {
            "threats": entry["settings"]["threats"],
            "attacks": [attack.label() for attack in stored.attacks],
            "date": entry["date"],
        },
        "make_leaderboard_arguments": leaderboard_arguments,
        "runs": runs,
        "ratio": (
            min(run["jobs_wall_seconds"] for run in runs["make leaderboard"])
            / min(run["jobs_wall_seconds"] for run in runs["stored"])
        ),
    }
    for label, measured in runs.items():
        best = min(measured, key=lambda run: run["jobs_wall_seconds"])
        print(
            f"{label}: jobs wall {best['jobs_wall_seconds']:.1f} s; per attack"
            f" {', '.join(f'{attack} {seconds:.1f} s' for attack, seconds in best['attack_seconds'].items())}"
        )
        print(
            f"  worst case: {', '.join(f'{threat} {100 * value:.1f}%' for threat, value in best['worst_case'].items())}"
        )
    print(f"make leaderboard / stored: {report['ratio']:.2f}x the jobs' wall time")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
