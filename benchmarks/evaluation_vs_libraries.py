"""invarbench's full evaluation against calling Foolbox and pyautoattack directly, in one run.

Reference: Foolbox's LinfPGD and the official AutoAttack called the way their READMEs show, each on
every point. invarbench: ``run_benchmark`` with its own ``pgd`` (the same 40 steps of eps/30 and
random start as ``LinfPGD()``, with early exit) and the same AutoAttack in a cascade (AutoAttack only
on points PGD left robust), including its model checks, per-sample records and atomic writes.
Prints both times and the ratio (target: invarbench never slower, ratio <= 1).

    python benchmarks/evaluation_vs_libraries.py [--n 500] [--version standard] [--repeats 2]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import foolbox
import pyautoattack
import torch

from invarbench.attacks import ThreatModel
from invarbench.config import AttackSpec, ModelSpec, RunConfig
from invarbench.datasets import load_dataset
from invarbench.models import load_model
from invarbench.results import WORST_CASE, robustness_frame
from invarbench.runner import run_benchmark


def direct(model, images, labels, *, eps: float, version: str, attacks: list[str] | None, batch_size: int) -> None:
    fmodel = foolbox.PyTorchModel(model, bounds=(0, 1))
    attack = foolbox.attacks.LinfPGD()
    attack(fmodel, images, labels, epsilons=[eps])
    adversary = pyautoattack.AutoAttack(model, norm="Linf", eps=eps, version=version, attacks=attacks, seed=0)
    adversary.logger.setLevel(logging.WARNING)
    adversary.run_standard_evaluation(images, labels, batch_size=batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist-cnn-pgd-linf-0.3")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--version", default="standard", help="AutoAttack version; 'custom' with --sub-attacks")
    parser.add_argument("--sub-attacks", nargs="*", help="AutoAttack sub-attacks for version custom")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument(
        "--repeats", type=int, default=2, help="interleaved repeats; the best time of each side is reported"
    )
    args = parser.parse_args()

    images, labels = load_dataset("mnist").evaluation_subset(args.n)
    model = load_model(args.model)
    attacks = args.sub_attacks if args.version == "custom" else None

    options = (("version", args.version),) + ((("attacks", attacks),) if attacks else ())
    config = RunConfig(
        (ModelSpec(args.model, "mnist"),),
        (ThreatModel("linf", (args.eps,)),),
        (AttackSpec("pgd"), AttackSpec("autoattack", options)),
        n=args.n,
        shard_size=args.batch_size,
    )
    # Interleaved repeats, best of each: on a shared 2-core machine one repeat of the same call varied by ~15%.
    reference, ours = float("inf"), float("inf")
    for _ in range(args.repeats):
        started = time.perf_counter()
        direct(model, images, labels, eps=args.eps, version=args.version, attacks=attacks, batch_size=args.batch_size)
        reference = min(reference, time.perf_counter() - started)
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            outcome = run_benchmark(config, Path(out), progress=False, device="cpu")
            ours = min(ours, time.perf_counter() - started)
    figures = robustness_frame(outcome.summary["models"].items())
    worst = figures.loc[
        (figures["norm"] == "linf") & (figures["eps"] == float(f"{args.eps:g}")) & (figures["attack"] == WORST_CASE),
        "robust_accuracy",
    ].item()
    print(
        f"model {args.model}, first {args.n} test points, l_inf eps {args.eps}, AutoAttack {args.version}"
        f" {attacks or ''}, {torch.get_num_threads()} threads, best of {args.repeats}"
    )
    print(f"Foolbox LinfPGD + pyautoattack called directly: {reference:.1f} s")
    print(
        f"invarbench run (cascade, checks, per-sample records): {ours:.1f} s (worst-case robust accuracy"
        f" {100 * worst:.1f}%)"
    )
    print(f"ratio invarbench / direct: {ours / reference:.3f} (target <= 1)")


if __name__ == "__main__":
    main()
