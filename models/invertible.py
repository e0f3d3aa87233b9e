"""A fully invertible classifier (Jacobsen et al., fi-RevNet) built from FrEIA blocks.

z = F(x) has exactly the input's dimension. The first ``num_classes`` entries of z are the logits
(z_s); the rest is the nuisance z_n. ``encode``/``decode`` give the bijection and its inverse, which
metameric sampling needs; ``forward`` returns only the logits, so attacks treat it like any classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import FrEIA.framework as freia_framework
import FrEIA.modules as freia_modules
import numpy as np
import torch
from invarbench.models.architectures import register_architecture
from torch import nn


def _conv_subnet(hidden: int):
    def build(channels_in: int, channels_out: int) -> nn.Module:
        last = nn.Conv2d(hidden, channels_out, 3, padding=1)
        # A zero last layer starts every coupling at the identity, which keeps early training stable.
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        return nn.Sequential(nn.Conv2d(channels_in, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(), last)

    return build


def _dense_subnet(hidden: int):
    def build(features_in: int, features_out: int) -> nn.Module:
        last = nn.Linear(hidden, features_out)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        return nn.Sequential(nn.Linear(features_in, hidden), nn.ReLU(), last)

    return build


@register_architecture("fi-revnet")
class FullyInvertibleRevNet(nn.Module):
    """Invertible downsampling, affine coupling blocks with activation normalisation and fixed channel
    permutations (FrEIA ``AllInOneBlock``) at two scales, then dense coupling blocks on the flattened
    vector so that the logits see the whole image."""

    def __init__(self, *, blocks: Sequence[int] = (3, 3), hidden: Sequence[int] = (64, 128), dense_blocks: int = 2, dense_hidden: int = 512, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, affine_clamping: float = 2.0, permutation_seed: int = 0):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size {image_size} must be divisible by 4 (two invertible downsamplings)")
        self.num_classes = int(num_classes)
        self.input_shape = (in_channels, image_size, image_size)
        # FrEIA draws its fixed permutations from numpy's global generator: seed it so that the same
        # arguments always build the same network (the permutations are also stored in the state_dict).
        saved_state = np.random.get_state()
        np.random.seed(permutation_seed)
        try:
            flow = freia_framework.SequenceINN(*self.input_shape)
            for count, width in zip(blocks, hidden):
                flow.append(freia_modules.IRevNetDownsampling)
                for _ in range(count):
                    flow.append(freia_modules.AllInOneBlock, subnet_constructor=_conv_subnet(width), affine_clamping=affine_clamping, permute_soft=False)
            flow.append(freia_modules.Flatten)
            for _ in range(dense_blocks):
                flow.append(freia_modules.AllInOneBlock, subnet_constructor=_dense_subnet(dense_hidden), affine_clamping=affine_clamping, permute_soft=False)
        finally:
            np.random.set_state(saved_state)
        self.flow = flow
        dimension = int(np.prod(self.input_shape))
        if self.num_classes >= dimension:
            raise ValueError(f"num_classes {num_classes} must be smaller than the input dimension {dimension}")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z = F(x), flat (batch, dimension), and log|det dF/dx| per sample."""
        z, log_det = self.flow(x)
        return z, log_det

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """x = F^-1(z) for flat z."""
        x, _ = self.flow(z, rev=True)
        return x.reshape(len(z), *self.input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)[0][:, : self.num_classes]
