"""Batched prediction and clean accuracy."""

from __future__ import annotations

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, *, batch_size: int = 500) -> torch.Tensor:
    """Predicted labels for ``images``, computed in batches on the model's device."""
    device = model_device(model)
    predictions = [model(images[start : start + batch_size].to(device)).argmax(dim=1).cpu() for start in range(0, len(images), batch_size)]
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)


def clean_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 500) -> float:
    return (predict(model, images, batch_size=batch_size) == labels).float().mean().item()
