"""How much the gradient metamers depend on float rounding: ``metameric`` on a zoo model, once as it is
and again with noise the size of rounding added to every input gradient it reads.

A CPU with other vector kernels (AVX2 against AVX512), another thread count or a GPU rounds the gradient
differently. Sign steps turn any component whose sign rounding decides into a full step, so the
metamers, and the oracle's labels of them, may differ between machines. This measures it on one
machine. The noise is added in the backward pass of an identity placed before the model: the attack's
own code runs unchanged. It is additive noise of ``--noise`` times each image's largest gradient
component (1e-7 is float32 rounding's size). Prints, per noise seed, how many metamers differ, and how
many of the model's predictions and the oracle's labels flip.

    python benchmarks/metamer_rounding.py [--model mnist-cnn-pgd-linf-0.3] [--n 100] [--eps 0.4] [--noise 1e-7] \\
        [--seeds 2]
"""

from __future__ import annotations

import argparse

import torch

from invarbench.attacks import create_attack
from invarbench.attacks.invariance.base import InvarianceContext
from invarbench.datasets import load_dataset
from invarbench.models import load_model
from invarbench.oracles import default_oracle


class _RoundingNoise(torch.autograd.Function):
    """The identity; its backward pass adds ``scale`` times each image's largest gradient component, times standard
    normal noise."""

    @staticmethod
    def forward(ctx, x, scale, generator):
        ctx.scale, ctx.generator = scale, generator
        return x.view_as(x)

    @staticmethod
    def backward(ctx, gradient):
        largest = gradient.flatten(1).abs().amax(1).view(-1, *[1] * (gradient.dim() - 1))
        noise = torch.randn(gradient.shape, generator=ctx.generator, dtype=gradient.dtype)
        return gradient + ctx.scale * largest * noise, None, None


class NoisyGradients(torch.nn.Module):
    """``model`` whose input gradients carry rounding-sized noise (its forward pass is unchanged)."""

    def __init__(self, model: torch.nn.Module, scale: float, seed: int):
        super().__init__()
        self.model, self.scale, self.generator = model, scale, torch.Generator().manual_seed(seed)
        self.bounds, self.num_classes, self.name = model.bounds, model.num_classes, model.name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(_RoundingNoise.apply(x, self.scale, self.generator))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist-cnn-pgd-linf-0.3")
    parser.add_argument("--n", type=int, default=100, help="first N MNIST test points")
    parser.add_argument("--eps", type=float, default=0.4, help="l_inf ball of the gradient metamers")
    parser.add_argument(
        "--noise", type=float, default=1e-7, help="noise relative to each image's largest gradient component"
    )
    parser.add_argument("--seeds", type=int, default=2, help="noisy runs to compare with the run without noise")
    args = parser.parse_args()
    dataset = load_dataset("mnist")
    images, labels = dataset.evaluation_subset(args.n)
    model = load_model(args.model)
    context = InvarianceContext(dataset, default_oracle(dataset), torch.arange(args.n))
    attack = create_attack("metameric")
    reference = attack(model, images, labels, norm="linf", epsilons=(args.eps,), context=context)
    print(
        f"{args.model}, first {args.n} points, metameric at l_inf {args.eps}, noise {args.noise:g} of each image's"
        " largest gradient component"
    )
    print(
        f"without noise: median logit error {reference.logit_errors[0].median():.2f}; oracle abstains on"
        f" {int((reference.oracle_labels[0] < 0).sum())}"
    )
    for seed in range(1, args.seeds + 1):
        noisy = attack(
            NoisyGradients(model, args.noise, seed), images, labels, norm="linf", epsilons=(args.eps,), context=context
        )
        moved = (noisy.candidates[0] - reference.candidates[0]).flatten(1).abs().amax(1)
        print(
            f"noise seed {seed}: metamers differing by more than 0.05 {int((moved > 0.05).sum())} of {args.n}; "
            f"model's prediction flips {int((noisy.model_predictions[0] != reference.model_predictions[0]).sum())}; "
            f"oracle's label flips {int((noisy.oracle_labels[0] != reference.oracle_labels[0]).sum())}"
        )


if __name__ == "__main__":
    main()
