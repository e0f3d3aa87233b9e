"""Batched prediction, clean accuracy and decision margins."""

from __future__ import annotations

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def logits(model: nn.Module, images: torch.Tensor, *, batch_size: int = 500) -> torch.Tensor:
    """The model's logits for ``images`` (float32, on the CPU), computed in batches on its device."""
    device = model_device(model)
    outputs = [
        model(images[start : start + batch_size].to(device)).float().cpu()
        for start in range(0, len(images), batch_size)
    ]
    return torch.cat(outputs) if outputs else torch.empty(0, 0)


def predict(model: nn.Module, images: torch.Tensor, *, batch_size: int = 500) -> torch.Tensor:
    """Predicted labels for ``images``, computed in batches on the model's device."""
    output = logits(model, images, batch_size=batch_size)
    return output.argmax(dim=1) if len(output) else torch.empty(0, dtype=torch.long)


#: Largest difference from a model's logits, relative to their largest magnitude (at least 1), for a
#: faster way of computing them (a traced copy, a channels-last copy, an incremental forward pass) to be used.
SAME_LOGITS_TOLERANCE = 1e-4


def same_logits(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether ``got`` are ``expected``'s logits within :data:`SAME_LOGITS_TOLERANCE`."""
    return got.shape == expected.shape and bool(
        (got - expected).abs().max() <= SAME_LOGITS_TOLERANCE * max(1.0, expected.abs().max().item())
    )


def label_margins(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's logit of its label minus its largest other logit: negative where another class wins."""
    own = output.gather(1, labels.view(-1, 1)).squeeze(1)
    others = output.scatter(1, labels.view(-1, 1), float("-inf")).amax(1)
    return own - others


def top_margins(output: torch.Tensor) -> torch.Tensor:
    """Each row's largest logit minus its second largest: how firmly the prediction is made."""
    if output.shape[1] < 2:
        return torch.full((len(output),), float("inf"))
    top = output.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def clean_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 500) -> float:
    return (predict(model, images, batch_size=batch_size) == labels).float().mean().item()
