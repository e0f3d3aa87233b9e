"""Model checks run before attacking, in the spirit of AutoAttack's own checks.

A flag does not stop the run: it is reported in the summary, because an evaluation of a model that
is randomised, returns probabilities or has vanishing gradients can overstate its robustness.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from invarbench.errors import ModelError
from invarbench.evaluation import model_device

CHECKS = {
    "train_mode": (
        "the model (or a submodule) is in train mode; call model.eval() so batch norm and dropout do not change outputs"
    ),
    "probability_outputs": (
        "outputs look like probabilities (non-negative rows summing to 1), not logits; gradient attacks are weakened by"
        " the softmax, return logits"
    ),
    "randomised_outputs": (
        "two forward passes on the same inputs differ; the model is randomised, so use an EOT-aware attack (autoattack"
        " version rand)"
    ),
    "non_finite_outputs": "outputs contain NaN or inf",
    "zero_gradients": (
        "the input gradient of the loss is exactly zero for some points (gradient masking?); gradient-free attacks such"
        " as Square are needed"
    ),
    "inputs_out_of_bounds": "test inputs lie outside the model's declared bounds",
}


def check_model(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, num_classes: int, source: str
) -> dict[str, bool]:
    """Return ``{check name: raised}`` for the checks in :data:`CHECKS`; raise on a wrong output shape."""
    device = model_device(model)
    x, y = images.to(device), labels.to(device)
    flags = {"train_mode": any(module.training for module in model.modules())}
    try:
        with torch.no_grad():
            first, second = model(x), model(x)
    except RuntimeError as error:
        raise ModelError(
            f"model {source} fails on {len(x)} inputs of shape {list(x.shape[1:])}"
            f" ({str(error).strip().splitlines()[0][:200]}); check --dataset (mnist: 1 x 28 x 28, cifar10: 3 x 32 x"
            " 32); an ONNX model must be exported with a dynamic batch axis (dynamic_axes={'input': {0: 'batch'}})"
        ) from error
    if first.shape != (len(x), num_classes):
        raise ModelError(
            f"model {source} returns outputs of shape {tuple(first.shape)} for {len(x)} inputs; expected ({len(x)},"
            f" {num_classes}) logits. Check --dataset and that the model returns one logit per class"
        )
    flags["probability_outputs"] = bool(
        (first >= 0).all() and torch.allclose(first.sum(dim=1), torch.ones(len(x), device=device), atol=1e-4)
    )
    flags["randomised_outputs"] = not torch.equal(first, second)
    flags["non_finite_outputs"] = not bool(torch.isfinite(first).all())
    probe = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(probe), y, reduction="sum")
    (gradient,) = torch.autograd.grad(loss, probe)
    flags["zero_gradients"] = bool((gradient.flatten(1).abs().amax(dim=1) == 0).any())
    low, high = model.bounds
    flags["inputs_out_of_bounds"] = bool(images.min() < low or images.max() > high)
    return flags


def check_compatible(model: torch.nn.Module, dataset, *, source: str) -> None:
    """Refuse a model whose declared input shape or input bounds differ from the data set's."""
    shape = list(dataset.test_images.shape[1:])
    declared = getattr(model, "input_shape", None)
    if declared is not None and list(declared) != shape:
        raise ModelError(
            f"model {source} takes inputs of shape {list(declared)} but {dataset.name} images have shape {shape};"
            " evaluate it on the data set it was made for (--dataset)"
        )
    if tuple(model.bounds) != tuple(dataset.bounds):
        raise ModelError(
            f"model {source} takes inputs in {list(model.bounds)} but {dataset.name} images lie in"
            f" {list(dataset.bounds)}; evaluate it on the data set it was made for (--dataset)"
        )
