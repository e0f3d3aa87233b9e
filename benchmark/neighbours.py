"""Nearest-neighbour search in pixel space with batched matrix products.

||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b: each chunk of queries is one matrix product against all
references, so the search runs at (nearly) the machine's matrix-multiply throughput and memory stays
bounded by ``chunk_size`` x number of references. No Python loop over references.
"""

from __future__ import annotations

import torch


def _squared_distances(queries: torch.Tensor, references: torch.Tensor, reference_norms: torch.Tensor) -> torch.Tensor:
    distances = torch.addmm(reference_norms.unsqueeze(0), queries, references.T, alpha=-2.0)
    distances += queries.pow(2).sum(1, keepdim=True)
    return distances.clamp_min_(0.0)


class ClassIndex:
    """References sorted by class, with their squared norms, prepared once for many queries: the
    per-class nearest neighbour of each query is then the minimum over a contiguous block."""

    def __init__(self, references: torch.Tensor, reference_labels: torch.Tensor, num_classes: int):
        self.order = torch.argsort(reference_labels, stable=True)
        self.references = references.flatten(1).float()[self.order]
        self.norms = self.references.pow(2).sum(1)
        self.counts = torch.bincount(reference_labels, minlength=num_classes).tolist()
        self.starts = [0]
        for count in self.counts:
            self.starts.append(self.starts[-1] + count)
        self.num_classes = num_classes

    def nearest(self, queries: torch.Tensor, *, chunk_size: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
        """(distances, indices), both (queries, num_classes): squared Euclidean distance to the nearest
        reference of each class and its index; classes without references get inf and -1."""
        queries = queries.flatten(1).float()
        distances = torch.full((len(queries), self.num_classes), float("inf"))
        indices = torch.full((len(queries), self.num_classes), -1, dtype=torch.long)
        for begin in range(0, len(queries), chunk_size):
            block = _squared_distances(queries[begin : begin + chunk_size], self.references, self.norms)
            for label in range(self.num_classes):
                if self.counts[label] == 0:
                    continue
                best, position = block[:, self.starts[label] : self.starts[label + 1]].min(dim=1)
                distances[begin : begin + chunk_size, label] = best
                indices[begin : begin + chunk_size, label] = self.order[position + self.starts[label]]
        return distances, indices


def nearest_per_class(
    queries: torch.Tensor,
    references: torch.Tensor,
    reference_labels: torch.Tensor,
    num_classes: int,
    *,
    chunk_size: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every query (rows of a 2-d tensor) and class c: the squared Euclidean distance to the
    nearest reference of class c and that reference's index (see :class:`ClassIndex`)."""
    return ClassIndex(references, reference_labels, num_classes).nearest(queries, chunk_size=chunk_size)


def nearest(
    queries: torch.Tensor, references: torch.Tensor, k: int = 1, *, chunk_size: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest references of every query: (squared distances, indices), both (queries, k)."""
    queries, references = queries.flatten(1).float(), references.flatten(1).float()
    reference_norms = references.pow(2).sum(1)
    distances, indices = [], []
    for begin in range(0, len(queries), chunk_size):
        block = _squared_distances(queries[begin : begin + chunk_size], references, reference_norms)
        best, position = block.topk(k, dim=1, largest=False)
        distances.append(best)
        indices.append(position)
    return torch.cat(distances), torch.cat(indices)
