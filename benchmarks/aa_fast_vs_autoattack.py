"""aa-fast against the official AutoAttack (pyautoattack standard) on the robust zoo models, in one run.

For each model and threat (l_inf 0.3 and l_2 2.0 by default), on the first N test points: the time of
invarbench's ``autoattack`` (pyautoattack standard: APGD-CE, APGD-T with 9 targets, FAB-T, Square 5000)
and of ``aa-fast``, run one after the other on the same correctly classified points (which one goes
first alternates between models), their robust accuracies, the difference, and the per-point
disagreements (indices one broke and the other did not). Targets: no point broken only by AutoAttack on
any pair; at least 5x over the summed time of all pairs, and 3x on every pair where AutoAttack takes more
than 60 s. Forward
and backward passes of both are counted (``passes``, in points). Blocks of the test set with ``--start``;
re-running with the same ``--out`` continues after the pairs already measured.

    python benchmarks/aa_fast_vs_autoattack.py [--n 1000] [--start 0] [--models NAME ...]
        [--threats linf:0.3 l2:2.0] [--option KEY=VALUE ...] [--out benchmarks/results/aa_fast.json]

``--option`` sets an aa-fast option as ``--attack aa-fast:KEY=VALUE`` does (e.g. ``--option restart_decay=0.8``),
to measure a setting before it becomes the default; the options are recorded in each row.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import pyautoattack
import torch

from invarbench.attacks import ThreatModel, create_attack
from invarbench.config import AttackSpec
from invarbench.datasets import load_dataset
from invarbench.environment import measurement_header, resolve_device
from invarbench.errors import ConfigError
from invarbench.evaluation import predict
from invarbench.models import load_model

MODELS = (
    "mnist-cnn-pgd-linf-0.1",
    "mnist-cnn-pgd-linf-0.3",
    "mnist-cnn-pgd-linf-0.4",
    "mnist-cnn-pgd-l2-2.0",
)
# The fi-RevNets (APGD-CE breaks nearly every point at l_inf 0.3 and l_2 2; AutoAttack takes under a
# minute on 200 points) are measured with --models.


def timed(
    name: str, options: dict, model, images, labels, threat: ThreatModel, active: torch.Tensor, seed: int
) -> tuple[float, torch.Tensor, object]:
    """Seconds taken and the points left robust (correctly classified and not broken)."""
    attack = create_attack(name, **options)
    started = time.perf_counter()
    result = attack(model, images, labels, norm=threat.norm, epsilons=threat.epsilons, seed=seed, active=active)
    seconds = time.perf_counter() - started
    return seconds, active[0] & ~result.success[0], result


def compare(
    model_name: str,
    threat: ThreatModel,
    images,
    labels,
    *,
    fast_options: dict,
    seed: int,
    fast_first: bool,
    device: str = "cpu",
    reference_options: dict | None = None,
    start: int = 0,
) -> dict:
    """Both attacks on ``model_name``'s correctly classified points; the reference is AutoAttack standard
    unless ``reference_options`` say otherwise (a dry run's cheaper version)."""
    model = load_model(model_name).to(resolve_device(device))
    correct = predict(model, images) == labels
    active = correct.unsqueeze(0)
    runs = {}
    order = ("aa-fast", "autoattack") if fast_first else ("autoattack", "aa-fast")
    for name in order:
        options = fast_options if name == "aa-fast" else (reference_options or {"version": "standard"})
        runs[name] = timed(name, options, model, images, labels, threat, active, seed)
    (reference_seconds, reference_robust, reference), (fast_seconds, fast_robust, fast) = (
        runs["autoattack"],
        runs["aa-fast"],
    )
    count = len(labels)
    return {
        "model": model_name,
        "threat": str(threat),
        "n": count,
        "clean_accuracy": correct.float().mean().item(),
        "autoattack_robust_accuracy": reference_robust.float().mean().item(),
        "aa_fast_robust_accuracy": fast_robust.float().mean().item(),
        "difference_points": 100 * (fast_robust.float().mean() - reference_robust.float().mean()).item(),
        "autoattack_seconds": reference_seconds,
        "aa_fast_seconds": fast_seconds,
        "speedup": reference_seconds / fast_seconds,
        "only_autoattack_broke": (start + (fast_robust & ~reference_robust).nonzero().flatten()).tolist(),
        "only_aa_fast_broke": (start + (reference_robust & ~fast_robust).nonzero().flatten()).tolist(),
        "start": start,
        "autoattack_passes": reference.options.get("passes"),
        "aa_fast_passes": fast.options.get("passes"),
        "order": list(order),
        "autoattack_options": reference.options,
        "aa_fast_options": fast.options,
        "autoattack_warnings": list(reference.warnings),
        "aa_fast_warnings": list(fast.warnings),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| model | threat | n | clean | AutoAttack | aa-fast | aa-fast - AA (points) | AutoAttack s | aa-fast s | "
        "speed-up | only AA broke | only aa-fast broke |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['threat']} | {row['n']} | {100 * row['clean_accuracy']:.1f}% | "
            f"{100 * row['autoattack_robust_accuracy']:.1f}% | {100 * row['aa_fast_robust_accuracy']:.1f}% "
            f"| {row['difference_points']:+.1f} | {row['autoattack_seconds']:.1f} | {row['aa_fast_seconds']:.1f} | "
            f"{row['speedup']:.2f}x "
            f"| {len(row['only_autoattack_broke'])} {row['only_autoattack_broke'][:10]} | "
            f"{len(row['only_aa_fast_broke'])} {row['only_aa_fast_broke'][:10]} |"
        )
    return "\n".join(lines)


def compact_json(report: dict) -> str:
    """``report`` as indented JSON with lists of numbers (points, queries, pairs) on one line each: the
    per-point statistics take half the bytes (the results are kept in the repository)."""
    text = json.dumps(report, indent=2)
    return (
        re.sub(
            r"\[\s*([-0-9.eE,\s\[\]]*?)\s*\]",
            lambda match: "[" + re.sub(r"\s+", "", match.group(1)).replace(",", ", ") + "]",
            text,
        )
        + "\n"
    )


def write_report(args: argparse.Namespace, rows: list[dict]) -> None:
    """The measurements so far, written whole (a temporary file moved into place)."""
    report = {
        **measurement_header("aa_fast_vs_autoattack", device=args.device),
        "n": args.n,
        "start": args.start,
        "seed": args.seed,
        "torch": torch.__version__,
        "pyautoattack": pyautoattack.__version__,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.out.with_suffix(".json.tmp")
    temporary.write_text(compact_json(report))
    temporary.replace(args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="N MNIST test points from --start")
    parser.add_argument("--start", type=int, default=0, help="first test point of the block (default 0)")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--threats", nargs="+", default=["linf:0.3", "l2:2.0"], help="NORM:EPS, one eps each")
    parser.add_argument("--targets", type=int, default=None, help="aa-fast targets (default: the attack's)")
    parser.add_argument(
        "--square-queries", type=int, default=None, help="aa-fast Square queries (default: the attack's)"
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an aa-fast option, as in --attack aa-fast:KEY=VALUE (repeatable; default: the attack's defaults)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both attacks run (default cpu)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/aa_fast.json"))
    args = parser.parse_args()

    threats = [ThreatModel.parse(spec) for spec in args.threats]
    if any(len(threat.epsilons) != 1 for threat in threats):
        parser.error(f"--threats: give one eps per threat, e.g. linf:0.3 l2:2.0 (got {' '.join(args.threats)})")
    fast_options = {
        key: value
        for key, value in (("targets", args.targets), ("square_queries", args.square_queries))
        if value is not None
    }
    # Checked as an --attack specification is: an unknown key or a bad value stops here, before any model runs.
    try:
        fast_options.update(AttackSpec.parse("aa-fast:" + ",".join(args.option)).options if args.option else ())
    except ConfigError as error:
        parser.error(f"--option: {error}")
    images, labels = load_dataset("mnist").evaluation_subset(args.start + args.n)
    images, labels = images[args.start :], labels[args.start :]
    # Resumable: the pairs already in --out (same block and seed) are kept, the others measured and written one by one.
    done = json.loads(args.out.read_text()) if args.out.exists() else {}
    same = done.get("n") == args.n and done.get("start", 0) == args.start and done.get("seed") == args.seed
    rows = list(done.get("rows", [])) if same else []
    for position, model_name in enumerate(args.models):
        for threat in threats:
            if any(row["model"] == model_name and row["threat"] == str(threat) for row in rows):
                continue
            rows.append(
                compare(
                    model_name,
                    threat,
                    images,
                    labels,
                    fast_options=fast_options,
                    seed=args.seed,
                    fast_first=position % 2 == 1,
                    device=args.device,
                    start=args.start,
                )
            )
            print(table(rows[-1:]).splitlines()[-1], flush=True)
            write_report(args, rows)
    print()
    print(
        f"first {args.n} MNIST test points, {torch.get_num_threads()} threads, pyautoattack "
        f"{pyautoattack.__version__}, aa-fast options {rows[0]['aa_fast_options']['implementation'] if rows else ''}"
    )
    print(table(rows))
    slow = [row["speedup"] for row in rows if row["autoattack_seconds"] > 60]
    if slow:
        print(f"\nspeed-up on the pairs where AutoAttack took more than 60 s: min {min(slow):.2f}x (target >= 3)")
    write_report(args, rows)
    if rows:
        total = sum(row["autoattack_seconds"] for row in rows) / sum(row["aa_fast_seconds"] for row in rows)
        missed = sum(len(row["only_autoattack_broke"]) for row in rows)
        print(f"summed speed-up {total:.2f}x (target >= 5); points broken only by AutoAttack: {missed} (target 0)")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
