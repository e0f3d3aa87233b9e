"""The wrapper every loaded model is returned in: inputs in declared bounds, normalisation inside."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class BenchmarkModel(nn.Module):
    """Takes inputs in ``bounds`` (e.g. [0, 1] images), normalises them and returns logits.

    Attacks see only this module, so normalisation is never folded into a network by hand and the
    input bounds travel with the model.
    """

    def __init__(self, network: nn.Module, *, bounds: tuple[float, float], num_classes: int, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,), name: str = "model"):
        super().__init__()
        self.network = network
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.num_classes = int(num_classes)
        self.name = name
        self.register_buffer("mean", _channel_tensor(mean), persistent=False)
        self.register_buffer("std", _channel_tensor(std), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean.numel() > 1 and x.dim() == 4:
            mean, std = self.mean.view(1, -1, 1, 1), self.std.view(1, -1, 1, 1)
        else:
            mean, std = self.mean, self.std
        return self.network((x - mean) / std)


def _channel_tensor(values: Sequence[float]) -> torch.Tensor:
    tensor = torch.tensor([float(value) for value in values], dtype=torch.float32)
    return tensor.reshape(()) if tensor.numel() == 1 else tensor
