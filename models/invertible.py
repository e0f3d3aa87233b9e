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
from torch import nn

from invarbench.models.architectures import register_architecture


def _conv_subnet(hidden: int):
    def build(channels_in: int, channels_out: int) -> nn.Module:
        last = nn.Conv2d(hidden, channels_out, 3, padding=1)
        # A zero last layer starts every coupling at the identity, which keeps early training stable.
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        return nn.Sequential(
            nn.Conv2d(channels_in, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(), last
        )

    return build


def _dense_subnet(hidden: int):
    def build(features_in: int, features_out: int) -> nn.Module:
        last = nn.Linear(hidden, features_out)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        return nn.Sequential(nn.Linear(features_in, hidden), nn.ReLU(), last)

    return build


PERMUTATIONS = ("w_perm", "w_perm_inv")


def _check_stored_permutations(
    module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
) -> None:
    """A state_dict saved before the permutations were left out still loads: its permutations must be
    the ones the seed rebuilds, and are dropped."""
    rebuilt = dict(module.named_buffers())
    for key in [key for key in state_dict if key.startswith(prefix) and key.rsplit(".", 1)[-1] in PERMUTATIONS]:
        stored = state_dict.pop(key)
        name = key[len(prefix) :]
        if name not in rebuilt or not torch.equal(stored.to(rebuilt[name].dtype), rebuilt[name].cpu()):
            error_msgs.append(
                f"the checkpoint's permutation {key} differs from the one permutation_seed rebuilds; it was made with"
                " other fi-revnet arguments (check the card's permutation_seed and blocks)"
            )


@register_architecture("fi-revnet")
class FullyInvertibleRevNet(nn.Module):
    """Invertible downsampling, affine coupling blocks with activation normalisation and fixed channel
    permutations (FrEIA ``AllInOneBlock``) at two scales, then dense coupling blocks on the flattened
    vector so that the logits see the whole image."""

    def __init__(
        self,
        *,
        blocks: Sequence[int] = (3, 3),
        hidden: Sequence[int] = (64, 128),
        dense_blocks: int = 2,
        dense_hidden: int = 512,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        affine_clamping: float = 2.0,
        permutation_seed: int = 0,
    ):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size {image_size} must be divisible by 4 (two invertible downsamplings)")
        self.num_classes = int(num_classes)
        self.input_shape = (in_channels, image_size, image_size)
        # FrEIA draws its fixed permutations from numpy's global generator: seed it so that the same
        # arguments always build the same network. The permutations are rebuilt from the seed rather
        # than stored (they were two thirds of a checkpoint).
        saved_state = np.random.get_state()
        np.random.seed(permutation_seed)
        try:
            flow = freia_framework.SequenceINN(*self.input_shape)
            for count, width in zip(blocks, hidden):
                flow.append(freia_modules.IRevNetDownsampling)
                for _ in range(count):
                    flow.append(
                        freia_modules.AllInOneBlock,
                        subnet_constructor=_conv_subnet(width),
                        affine_clamping=affine_clamping,
                        permute_soft=False,
                    )
            flow.append(freia_modules.Flatten)
            for _ in range(dense_blocks):
                flow.append(
                    freia_modules.AllInOneBlock,
                    subnet_constructor=_dense_subnet(dense_hidden),
                    affine_clamping=affine_clamping,
                    permute_soft=False,
                )
        finally:
            np.random.set_state(saved_state)
        self.flow = flow
        for module in flow.modules():
            for name in PERMUTATIONS:
                # FrEIA keeps them as frozen parameters; as non-persistent buffers they act the same.
                fixed = getattr(module, name, None)
                if isinstance(fixed, nn.Parameter) and not fixed.requires_grad:
                    delattr(module, name)
                    module.register_buffer(name, fixed.detach(), persistent=False)
        self.register_load_state_dict_pre_hook(_check_stored_permutations)
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
