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

    #: Per-channel normalisation, applied inside ``forward`` (buffers).
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        network: nn.Module,
        *,
        bounds: tuple[float, float],
        num_classes: int,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        name: str = "model",
        input_shape: Sequence[int] | None = None,
    ):
        super().__init__()
        self.network = network
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.num_classes = int(num_classes)
        self.name = name
        #: The shape of one input (no batch axis) where the model declares it; None where it does not.
        self.input_shape = tuple(int(size) for size in input_shape) if input_shape is not None else None
        self.register_buffer("mean", _channel_tensor(mean), persistent=False)
        self.register_buffer("std", _channel_tensor(std), persistent=False)

    def _statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mean.numel() > 1 and x.dim() == 4:
            return self.mean.view(1, -1, 1, 1), self.std.view(1, -1, 1, 1)
        return self.mean, self.std

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs in the bounds as the network takes them."""
        mean, std = self._statistics(x)
        return (x - mean) / std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(self.normalise(x))

    @property
    def invertible(self) -> bool:
        return hasattr(self.network, "encode") and hasattr(self.network, "decode")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z = F(x) of an invertible network (normalisation included) and log|det| per sample, up to
        the normalisation's constant."""
        self._require_invertible()
        return self.network.encode(self.normalise(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """x = F^-1(z), in input space (not clipped to the bounds: the inverse is exact)."""
        self._require_invertible()
        x = self.network.decode(z)
        mean, std = self._statistics(x)
        return x * std + mean

    def _require_invertible(self) -> None:
        if not self.invertible:
            raise TypeError(
                f"model {self.name!r} is not invertible: its network has no encode/decode (use the fi-revnet"
                " architecture)"
            )


def _channel_tensor(values: Sequence[float]) -> torch.Tensor:
    tensor = torch.tensor([float(value) for value in values], dtype=torch.float32)
    return tensor.reshape(()) if tensor.numel() == 1 else tensor
