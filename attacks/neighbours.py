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


def nearest_per_class(queries: torch.Tensor, references: torch.Tensor, reference_labels: torch.Tensor, num_classes: int, *, chunk_size: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """For every query (rows of a 2-d tensor) and class c: the squared Euclidean distance to the
    nearest reference of class c and that reference's index. Returns (distances, indices), both
    (queries, num_classes); classes without references get distance inf and index -1."""
    queries, references = queries.flatten(1).float(), references.flatten(1).float()
    order = torch.argsort(reference_labels, stable=True)
    sorted_references = references[order]
    counts = torch.bincount(reference_labels, minlength=num_classes).tolist()
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)
    reference_norms = sorted_references.pow(2).sum(1)
    distances = torch.full((len(queries), num_classes), float("inf"))
    indices = torch.full((len(queries), num_classes), -1, dtype=torch.long)
    for begin in range(0, len(queries), chunk_size):
        block = _squared_distances(queries[begin : begin + chunk_size], sorted_references, reference_norms)
        for label in range(num_classes):
            if counts[label] == 0:
                continue
            best, position = block[:, starts[label] : starts[label + 1]].min(dim=1)
            distances[begin : begin + chunk_size, label] = best
            indices[begin : begin + chunk_size, label] = order[position + starts[label]]
    return distances, indices


def nearest(queries: torch.Tensor, references: torch.Tensor, k: int = 1, *, chunk_size: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
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
