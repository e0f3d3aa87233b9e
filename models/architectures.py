"""Architectures, registered by name so that a card or a user checkpoint can name one."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from invarbench.errors import ModelError, did_you_mean

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register_architecture(name: str):
    def decorator(constructor):
        ARCHITECTURES[name] = constructor
        return constructor

    return decorator


def build_architecture(name: str, **arguments) -> nn.Module:
    if name not in ARCHITECTURES:
        raise ModelError(
            f"unknown architecture {name!r}; registered:"
            f" {', '.join(sorted(ARCHITECTURES))}.{did_you_mean(name, ARCHITECTURES)}"
        )
    try:
        return ARCHITECTURES[name](**arguments)
    except TypeError as error:
        raise ModelError(
            f"architecture {name!r} does not accept the arguments {arguments} ({error}); fix the card's"
            " [architecture.args]"
        ) from error


@register_architecture("mnist-cnn")
class MnistCNN(nn.Module):
    """Two 5x5 conv + max-pool stages and one hidden layer: Madry et al.'s MNIST network, narrower."""

    def __init__(
        self,
        *,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
    ):
        super().__init__()
        first, second = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, first, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(first, second, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(second * (image_size // 4) ** 2, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@register_architecture("mlp")
class MLP(nn.Module):
    """A ReLU multi-layer perceptron on flattened inputs (spheres, digits)."""

    def __init__(self, *, input_dim: int, hidden: Sequence[int] = (256, 256), num_classes: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = input_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)
