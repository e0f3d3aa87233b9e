"""How much time invarbench's PGD adds on top of the model's own forward and backward passes.

Measures, in one run on the same model, batch and device: (a) ``create_attack("pgd")`` with S steps
and (b) a bare loop of S forward+backward passes with sign-gradient steps and projection, the least
any PGD must do. Prints the ratio (a)/(b); the target is at most 1.10.

    python benchmarks/pgd_overhead.py [--model mnist-cnn-pgd-linf-0.3] [--batch 500] [--steps 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from invarbench.attacks import create_attack
from invarbench.datasets import load_dataset
from invarbench.models import get_card, load_model


def bare_pgd(model, images, labels, *, eps: float, steps: int, step_size: float) -> torch.Tensor:
    adversarial = (images + torch.empty_like(images).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        adversarial.requires_grad_(True)
        loss = F.cross_entropy(model(adversarial), labels)
        (gradient,) = torch.autograd.grad(loss, adversarial)
        with torch.no_grad():
            adversarial = torch.min(torch.max(adversarial + step_size * gradient.sign(), images - eps), images + eps).clamp(0, 1)
    return adversarial


def best_of(repeats: int, function) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist-cnn-pgd-linf-0.3")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    card = get_card(args.model)
    images, labels = load_dataset(card.dataset, **card.dataset_options).evaluation_subset(args.batch)
    model = load_model(args.model)
    attack = create_attack("pgd", steps=args.steps, batch_size=args.batch)
    step_size = args.eps / 30
    ours = best_of(args.repeats, lambda: attack(model, images, labels, norm="linf", epsilons=(args.eps,)))
    bare = best_of(args.repeats, lambda: bare_pgd(model, images, labels, eps=args.eps, steps=args.steps, step_size=step_size))
    print(f"model {args.model}, batch {args.batch}, {args.steps} steps, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"invarbench PGD (Foolbox): {ours:.3f} s")
    print(f"bare forward+backward loop: {bare:.3f} s")
    print(f"ratio: {ours / bare:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
