"""Throughput of the l_inf invariance search's nearest-neighbour step, as a fraction of the machine's
matrix-multiply throughput measured in the same run.

The search (``invarbench.attacks.invariance.search_neighbours``) warps every test point by the 775
shifts and rotations of Tramèr et al. and finds, for each query and class, the nearest training image
with batched matrix products. Its useful work is 2 x queries x 50,000 x 784 flop (the products); the
reference is ``torch.mm`` on one chunk of the same shape, repeated. Prints both rates and the fraction.

    python benchmarks/neighbour_search.py [--points 1000] [--transforms 775]
"""

from __future__ import annotations

import argparse
import time

import torch

from invarbench.attacks.invariance import search_neighbours, transform_grid
from invarbench.datasets import load_dataset


def matmul_rate(rows: int, inner: int, columns: int, *, seconds: float = 5.0) -> float:
    """Floating-point operations per second of ``torch.mm`` at the search's chunk shape."""
    left, right = torch.rand(rows, inner), torch.rand(inner, columns)
    torch.mm(left, right)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.mm(left, right)
        count += 1
    return 2 * rows * inner * columns * count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1000, help="test points (default 1000)")
    parser.add_argument(
        "--transforms", type=int, default=775, help="use the first T transforms of the grid (default all 775)"
    )
    args = parser.parse_args()

    dataset = load_dataset("mnist")
    images, _ = dataset.evaluation_subset(args.points)
    transforms = transform_grid()[: args.transforms]
    references = dataset.train_images.flatten(1)
    queries = args.points * len(transforms)
    inner = references.shape[1]

    reference_rate = matmul_rate(4096, inner, len(references))
    started = time.perf_counter()
    search_neighbours(images, dataset.train_images, dataset.train_labels, dataset.num_classes, transforms=transforms)
    seconds = time.perf_counter() - started
    search_rate = 2 * queries * len(references) * inner / seconds
    after = matmul_rate(4096, inner, len(references))

    print(
        f"{args.points} test points x {len(transforms)} transforms = {queries} queries against {len(references)}"
        f" training images of {inner} pixels, {torch.get_num_threads()} threads"
    )
    print(
        f"torch.mm 4096 x {inner} x {len(references)}: {reference_rate / 1e9:.1f} GFLOP/s before, {after / 1e9:.1f}"
        " after the search"
    )
    print(f"search: {seconds:.1f} s, {search_rate / 1e9:.1f} GFLOP/s of matrix products")
    print(f"fraction of matrix-multiply throughput: {search_rate / max(reference_rate, after):.2f}")


if __name__ == "__main__":
    main()
