"""aa-fast against the official AutoAttack (pyautoattack standard) on the robust zoo models, in one run.

For each model and threat (l_inf 0.3 and l_2 2.0 by default), on the first N test points: the time of
invarbench's ``autoattack`` (pyautoattack standard: APGD-CE, APGD-T with 9 targets, FAB-T, Square 5000)
and of ``aa-fast``, run one after the other on the same correctly classified points (which one goes
first alternates between models), their robust accuracies, the difference, and the per-point
disagreements (indices one broke and the other did not). Targets (issue 12): aa-fast at least 3x
faster, its robust accuracy at most 0.2 points above AutoAttack's for each model.

    python benchmarks/aa_fast_vs_autoattack.py [--n 1000] [--models NAME ...] [--threats linf:0.3 l2:2.0] [--out benchmarks/results/aa_fast.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyautoattack
import torch

from invarbench.attacks import ThreatModel, create_attack
from invarbench.datasets import load_dataset
from invarbench.environment import measurement_header, resolve_device
from invarbench.evaluation import predict
from invarbench.models import load_model

MODELS = (
    "mnist-cnn-pgd-linf-0.1",
    "mnist-cnn-pgd-linf-0.3",
    "mnist-cnn-pgd-linf-0.4",
    "mnist-cnn-pgd-l2-2.0",
    "mnist-firevnet-ce",
    "mnist-firevnet-ice",
)


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
        "only_autoattack_broke": (fast_robust & ~reference_robust).nonzero().flatten().tolist(),
        "only_aa_fast_broke": (reference_robust & ~fast_robust).nonzero().flatten().tolist(),
        "order": list(order),
        "autoattack_options": reference.options,
        "aa_fast_options": fast.options,
        "autoattack_warnings": list(reference.warnings),
        "aa_fast_warnings": list(fast.warnings),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| model | threat | n | clean | AutoAttack | aa-fast | aa-fast - AA (points) | AutoAttack s | aa-fast s | speed-up | only AA broke | only aa-fast broke |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['threat']} | {row['n']} | {100 * row['clean_accuracy']:.1f}% | {100 * row['autoattack_robust_accuracy']:.1f}% | {100 * row['aa_fast_robust_accuracy']:.1f}% "
            f"| {row['difference_points']:+.1f} | {row['autoattack_seconds']:.1f} | {row['aa_fast_seconds']:.1f} | {row['speedup']:.2f}x "
            f"| {len(row['only_autoattack_broke'])} {row['only_autoattack_broke'][:10]} | {len(row['only_aa_fast_broke'])} {row['only_aa_fast_broke'][:10]} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="first N MNIST test points")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--threats", nargs="+", default=["linf:0.3", "l2:2.0"], help="NORM:EPS, one eps each")
    parser.add_argument("--targets", type=int, default=None, help="aa-fast targets (default: the attack's)")
    parser.add_argument(
        "--square-queries", type=int, default=None, help="aa-fast Square queries (default: the attack's)"
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
    images, labels = load_dataset("mnist").evaluation_subset(args.n)
    rows = []
    for position, model_name in enumerate(args.models):
        for threat in threats:
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
                )
            )
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(
        f"first {args.n} MNIST test points, {torch.get_num_threads()} threads, pyautoattack {pyautoattack.__version__}, aa-fast options {rows[0]['aa_fast_options']['implementation'] if rows else ''}"
    )
    print(table(rows))
    speedups = [row["speedup"] for row in rows]
    if rows:
        print(
            f"\nspeed-up min {min(speedups):.2f}x (target >= 3); largest robust-accuracy excess {max(row['difference_points'] for row in rows):+.1f} points (target <= +0.2)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        **measurement_header("aa_fast_vs_autoattack", device=args.device),
        "n": args.n,
        "seed": args.seed,
        "torch": torch.__version__,
        "pyautoattack": pyautoattack.__version__,
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
