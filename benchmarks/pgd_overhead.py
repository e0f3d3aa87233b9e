"""How much time invarbench's PGD adds on top of the model's own forward and backward passes.

Measures, in one run on the same model, batch and device, interleaved: (a) ``create_attack("pgd")``
(invarbench's engine) with S steps at one eps and (b) a bare loop of the same passes: the forwards
and forward+backward passes (a) made, with the same batch sizes (recorded in an untimed run of (a):
early exit shrinks its batch), each followed by a sign-gradient step and projection, the least any
PGD must do. Prints the ratio (a)/(b) (target: at most 1.05) and writes the measurement as JSON.

    python benchmarks/pgd_overhead.py [--model mnist-cnn-pgd-linf-0.3] [--batch 500] [--steps 40] [--repeats 3] [--out benchmarks/results/pgd_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from invarbench.attacks import create_attack
from invarbench.datasets import load_dataset
from invarbench.models import get_card, load_model
from invarbench.runner import cpu_description

TARGET_RATIO = 1.05


def passes_of(attack, model, images, labels, *, eps: float) -> list[tuple[int, bool]]:
    """The batch size of each forward pass ``attack`` makes, and whether a backward pass followed it."""
    passes = []
    hook = model.register_forward_hook(lambda module, inputs, output: passes.append((len(inputs[0]), torch.is_grad_enabled())))
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
            adversarial = torch.min(torch.max(adversarial + step_size * gradient.sign(), x0 - eps), x0 + eps).clamp(0, 1)
    return adversarial


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist-cnn-pgd-linf-0.3")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the best time of each side is reported")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pgd_overhead.json"))
    args = parser.parse_args()

    card = get_card(args.model)
    images, labels = load_dataset(card.dataset, **card.dataset_options).evaluation_subset(args.batch)
    model = load_model(args.model)
    attack = create_attack("pgd", steps=args.steps, batch_size=args.batch)
    passes = passes_of(attack, model, images, labels, eps=args.eps)
    step_size = args.eps / 30
    times = {"invarbench": [], "bare": []}
    for _ in range(args.repeats):
        for side, function in (("invarbench", lambda: attack(model, images, labels, norm="linf", epsilons=(args.eps,))), ("bare", lambda: bare_pgd(model, images, labels, eps=args.eps, passes=passes, step_size=step_size))):
            started = time.perf_counter()
            function()
            times[side].append(time.perf_counter() - started)
    ours, bare = min(times["invarbench"]), min(times["bare"])
    backward = sum(size for size, grad in passes if grad)
    forward = sum(size for size, _ in passes)
    print(f"model {args.model}, batch {args.batch}, l_inf eps {args.eps}, {args.steps} steps, {torch.get_num_threads()} threads, best of {args.repeats} interleaved")
    print(f"passes: {len(passes)} forward ({forward} point-forwards), {backward} point-backwards (a full batch without early exit: {args.batch * (args.steps + 1)} / {args.batch * args.steps})")
    print(f"invarbench pgd: {ours:.3f} s")
    print(f"bare loop of the same passes: {bare:.3f} s")
    print(f"ratio: {ours / bare:.3f} (target <= {TARGET_RATIO})")
    measurement = {
        "benchmark": "pgd_overhead",
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "cpu": cpu_description(),
        "model": args.model,
        "batch": args.batch,
        "eps": args.eps,
        "steps": args.steps,
        "repeats": args.repeats,
        "point_forwards": forward,
        "point_backwards": backward,
        "seconds": {"invarbench": ours, "bare": bare},
        "seconds_per_repeat": times,
        "ratio": ours / bare,
        "target_ratio": TARGET_RATIO,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(measurement, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
