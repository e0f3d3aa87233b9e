"""invarbench's ``pgd`` against Foolbox's ``LinfPGD`` over an eps sweep, in one run.

Both get the same first N MNIST test points, the same eps list in one call, the same 40 steps of
eps/30 and a random start. Reference: Foolbox's ``LinfPGD`` called directly (every eps on every point,
all steps). invarbench: ``create_attack("pgd")`` (nested eps, per-sample early exit, warm starts).
Repeats are interleaved (reference, then ours) and the best time of each side is kept. Prints a
markdown table of robust accuracy per model and eps (mean over repeats) and the time ratio per model,
and writes the measurement as JSON (``--out``) for the README speed table.

Targets (issue 12): at least 4x faster on mnist-cnn-standard and 1.5x on mnist-cnn-pgd-linf-0.3,
robust accuracy at most 0.5 points above Foolbox's at every eps.

    python benchmarks/pgd_sweep.py [--n 500] [--eps 0.1,0.2,0.3,0.4] [--repeats 2] \\
        [--out benchmarks/results/pgd_sweep.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import foolbox
import torch

from invarbench.attacks import create_attack
from invarbench.datasets import load_dataset
from invarbench.environment import measurement_header, resolve_device
from invarbench.models import load_model

TARGET_RATIO = {"mnist-cnn-standard": 4.0, "mnist-cnn-pgd-linf-0.3": 1.5}
ACCURACY_TOLERANCE = 0.005


def foolbox_sweep(model, images, labels, *, epsilons: list[float], steps: int, seed: int) -> list[float]:
    """Robust accuracy per eps of Foolbox's LinfPGD called directly (its random start uses the global generator)."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    attack = foolbox.attacks.LinfPGD(steps=steps, rel_stepsize=1 / 30, random_start=True)
    _, _, success = attack(
        foolbox.PyTorchModel(model, bounds=model.bounds, device=device),
        images.to(device),
        labels.to(device),
        epsilons=epsilons,
    )
    return (1 - success.float().mean(dim=1)).tolist()


def invarbench_sweep(
    model, images, labels, *, epsilons: list[float], steps: int, seed: int, batch_size: int
) -> list[float]:
    attack = create_attack("pgd", steps=steps, rel_stepsize=1 / 30, batch_size=batch_size)
    return attack(model, images, labels, norm="linf", epsilons=tuple(epsilons), seed=seed).robust_accuracy()


def timed(function):
    started = time.perf_counter()
    value = function()
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(TARGET_RATIO))
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--eps", default="0.1,0.2,0.3,0.4", help="comma-separated l_inf eps values")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument(
        "--repeats", type=int, default=2, help="interleaved repeats; the best time of each side is reported"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both sides run (default cpu)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pgd_sweep.json"))
    args = parser.parse_args()
    epsilons = sorted(float(value) for value in args.eps.split(","))
    measurement = sweep(args.models, args.n, epsilons, args.steps, args.repeats, device=args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(measurement, indent=1) + "\n")
    print(f"\nwrote {args.out}")


def sweep(models: list[str], n: int, epsilons: list[float], steps: int, repeats: int, *, device: str = "cpu") -> dict:
    """Measure every model (see the module's docstring), print the tables and return the measurement."""
    images, labels = load_dataset("mnist").evaluation_subset(n)
    measurement = {
        **measurement_header("pgd_sweep", device=device),
        "versions": {"torch": torch.__version__, "foolbox": foolbox.__version__},
        "n": n,
        "epsilons": epsilons,
        "steps": steps,
        "rel_stepsize": 1 / 30,
        "repeats": repeats,
        "models": {},
    }
    rows = []
    for name in models:
        model = load_model(name).to(resolve_device(device))
        times = {"foolbox": [], "invarbench": []}
        accuracies = {"foolbox": [], "invarbench": []}
        for repeat in range(repeats):
            for side, function in (("foolbox", foolbox_sweep), ("invarbench", invarbench_sweep)):
                options = {"batch_size": n} if side == "invarbench" else {}
                accuracy, seconds = timed(
                    lambda function=function, options=options, model=model, repeat=repeat: function(
                        model, images, labels, epsilons=epsilons, steps=steps, seed=repeat, **options
                    )
                )
                times[side].append(seconds)
                accuracies[side].append(accuracy)
        mean = {side: [sum(values) / len(values) for values in zip(*runs)] for side, runs in accuracies.items()}
        ratio = min(times["foolbox"]) / min(times["invarbench"])
        differences = [ours - theirs for ours, theirs in zip(mean["invarbench"], mean["foolbox"])]
        measurement["models"][name] = {
            "seconds": {side: min(values) for side, values in times.items()},
            "seconds_per_repeat": times,
            "ratio": ratio,
            "target_ratio": TARGET_RATIO.get(name),
            "robust_accuracy": mean,
            "robust_accuracy_per_repeat": accuracies,
            "accuracy_within_tolerance": all(difference <= ACCURACY_TOLERANCE + 1e-9 for difference in differences),
        }
        rows += [
            (name, eps, ours, theirs, ours - theirs)
            for eps, ours, theirs in zip(epsilons, mean["invarbench"], mean["foolbox"])
        ]

    print(
        f"first {n} MNIST test points, l_inf, {steps} steps of eps/30, random start, {torch.get_num_threads()} threads,"
        f" best time of {repeats} interleaved repeats"
    )
    print()
    print("| model | eps | robust accuracy, invarbench pgd | robust accuracy, Foolbox LinfPGD | difference (points) |")
    print("| --- | --- | --- | --- | --- |")
    for name, eps, ours, theirs, difference in rows:
        print(f"| {name} | {eps:g} | {100 * ours:.1f}% | {100 * theirs:.1f}% | {100 * difference:+.1f} |")
    print()
    print("| model | Foolbox LinfPGD (s) | invarbench pgd (s) | ratio | target |")
    print("| --- | --- | --- | --- | --- |")
    for name, result in measurement["models"].items():
        target = f">= {result['target_ratio']}" if result["target_ratio"] else "-"
        print(
            f"| {name} | {result['seconds']['foolbox']:.1f} | {result['seconds']['invarbench']:.1f} |"
            f" {result['ratio']:.2f}x | {target} |"
        )
    return measurement


if __name__ == "__main__":
    main()
