"""How much time invarbench's PGD adds on top of the model's own forward and backward passes.

Measures, in one run on the same model, batch and device, interleaved: (a) ``create_attack("pgd")``
(invarbench's engine) with S steps at one eps and (b) a bare loop of the same passes: the forwards
and forward+backward passes (a) made, with the same batch sizes (recorded in an untimed run of (a):
early exit shrinks its batch), each followed by a sign-gradient step and projection, the least any
PGD must do; both with the model's weights frozen (as every invarbench attack runs). Each repeat times
(a) and (b) back to back, in alternating order, by wall clock and by the process's CPU time. This VM's
speed drifts by 10-20% from one run to the next, more than the overhead measured, so the ratio
reported is the median over repeats of (a)/(b) in CPU time (target: at most 1.05); the best wall times
are reported beside it. Writes the measurement as JSON.

    python benchmarks/pgd_overhead.py [--model mnist-cnn-pgd-linf-0.3] [--batch 500] [--steps 40] [--repeats 7] \\
        [--out benchmarks/results/pgd_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from invarbench.attacks import create_attack
from invarbench.attacks.base import frozen_parameters
from invarbench.datasets import load_dataset
from invarbench.environment import measurement_header
from invarbench.models import get_card, load_model

TARGET_RATIO = 1.05


def passes_of(attack, model, images, labels, *, eps: float) -> list[tuple[int, bool]]:
    """The batch size of each forward pass ``attack`` makes, and whether a backward pass followed it."""
    passes = []
    hook = model.register_forward_hook(
        lambda module, inputs, output: passes.append((len(inputs[0]), torch.is_grad_enabled()))
    )
    try:
        attack(model, images, labels, norm="linf", epsilons=(eps,))
    finally:
        hook.remove()
    return passes


def bare_pgd(model, images, labels, *, eps: float, passes: list[tuple[int, bool]], step_size: float) -> torch.Tensor:
    """The given passes with nothing else than a sign-gradient step and projection after each backward."""
    adversarial = images
    for size, backward in passes:
        if size > len(adversarial):  # a new start on more points
            adversarial = (images[:size] + torch.empty_like(images[:size]).uniform_(-eps, eps)).clamp(0, 1)
        adversarial, x0, y = adversarial[:size], images[:size], labels[:size]
        if not backward:
            with torch.no_grad():
                model(adversarial)
            continue
        adversarial.requires_grad_(True)
        loss = F.cross_entropy(model(adversarial), y)
        (gradient,) = torch.autograd.grad(loss, adversarial)
        with torch.no_grad():
            adversarial = torch.min(torch.max(adversarial + step_size * gradient.sign(), x0 - eps), x0 + eps).clamp(
                0, 1
            )
    return adversarial


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist-cnn-pgd-linf-0.3")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument(
        "--repeats", type=int, default=7, help="repeats, each timing both sides back to back in alternating order"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pgd_overhead.json"))
    args = parser.parse_args()

    card = get_card(args.model)
    images, labels = load_dataset(card.dataset, **card.dataset_options).evaluation_subset(args.batch)
    model = load_model(args.model)
    attack = create_attack("pgd", steps=args.steps, batch_size=args.batch)
    passes = passes_of(attack, model, images, labels, eps=args.eps)
    step_size = args.eps / 30
    sides = {
        "invarbench": lambda: attack(model, images, labels, norm="linf", epsilons=(args.eps,)),
        "bare": lambda: bare_pgd(model, images, labels, eps=args.eps, passes=passes, step_size=step_size),
    }
    times = {side: [] for side in sides}
    cpu_times = {side: [] for side in sides}
    with frozen_parameters(model):
        for repeat in range(args.repeats):
            for side in sorted(sides, reverse=repeat % 2 == 1):
                started, started_cpu = time.perf_counter(), time.process_time()
                sides[side]()
                times[side].append(time.perf_counter() - started)
                cpu_times[side].append(time.process_time() - started_cpu)
    ratio = statistics.median(ours / bare for ours, bare in zip(cpu_times["invarbench"], cpu_times["bare"]))
    ours, bare = min(times["invarbench"]), min(times["bare"])
    backward = sum(size for size, grad in passes if grad)
    forward = sum(size for size, _ in passes)
    print(
        f"model {args.model}, batch {args.batch}, l_inf eps {args.eps}, {args.steps} steps, {torch.get_num_threads()}"
        f" threads, {args.repeats} repeats in alternating order"
    )
    print(
        f"passes: {len(passes)} forward ({forward} point-forwards), {backward} point-backwards (a full batch without"
        f" early exit: {args.batch * (args.steps + 1)} / {args.batch * args.steps})"
    )
    print(
        f"invarbench pgd: best {ours:.3f} s wall, CPU per repeat"
        f" {', '.join(f'{t:.2f}' for t in cpu_times['invarbench'])} s"
    )
    print(
        f"bare loop of the same passes: best {bare:.3f} s wall, CPU per repeat"
        f" {', '.join(f'{t:.2f}' for t in cpu_times['bare'])} s"
    )
    print(
        f"ratio (median over repeats, CPU time): {ratio:.3f} (target <= {TARGET_RATIO}); best wall times:"
        f" {ours / bare:.3f}"
    )
    measurement = {
        **measurement_header("pgd_overhead"),
        "model": args.model,
        "batch": args.batch,
        "eps": args.eps,
        "steps": args.steps,
        "repeats": args.repeats,
        "point_forwards": forward,
        "point_backwards": backward,
        "seconds": {"invarbench": ours, "bare": bare},
        "seconds_per_repeat": times,
        "cpu_seconds_per_repeat": cpu_times,
        "ratio_measure": "median over repeats of invarbench / bare, process CPU time",
        "ratio": ratio,
        "best_wall_ratio": ours / bare,
        "target_ratio": TARGET_RATIO,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(measurement, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
