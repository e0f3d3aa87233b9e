"""Augmentation for oracle members: the changes a person reading a digit does not notice.

People read a handwritten digit whatever its exact position, slant, size, stroke width and stroke
brightness: a faint stroke on a black background counts as much as a bright one. A classifier
trained on plain MNIST has not learnt the last of these (every MNIST stroke is near white), so it
discounts faint strokes that a person sees at once. ``reader_augment`` draws, per image:

- an affine change: rotation, scale, shear and shift (bilinear, zero outside);
- a stroke width change: thicker (3x3 grey dilation), thinner (3x3 grey erosion) or unchanged;
- a stroke brightness field: the image times a smooth random field in [floor, 1], floor drawn per
  image, so parts of a digit are dim while others stay bright;
- sparse pixel noise: a few isolated pixels switched on or off, which people ignore;
- binarisation (some images): thresholded at a random level, as people read a black-and-white digit
  as well as a grey one.

Everything is drawn from the given generator, so training stays deterministic for a seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ReaderAugmentation:
    """Ranges of :func:`reader_augment`; the defaults are the oracle members' recipe."""

    degrees: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    shear: float = 0.3
    shift_pixels: float = 2.0
    #: Probabilities of a thicker and of a thinner stroke (else unchanged).
    thicker: float = 0.25
    thinner: float = 0.25
    #: Lowest brightness floor of the stroke field (the floor itself is drawn in [dimmest, 1]).
    dimmest: float = 0.25
    #: Resolution of the brightness field before it is smoothly upsampled.
    field_cells: int = 4
    #: Expected share of pixels flipped by the sparse noise.
    pixel_noise: float = 0.01
    #: Share of images thresholded to black and white, at a level drawn in ``threshold``.
    binarize: float = 0.0
    threshold: tuple[float, float] = (0.3, 0.7)

    @classmethod
    def from_options(cls, options: dict) -> ReaderAugmentation:
        known = {name for name in cls.__dataclass_fields__}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown augmentation option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = {key: tuple(value) if isinstance(value, list) else value for key, value in options.items()}
        return cls(**values)


def _uniform(count: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, generator=generator)


def reader_augment(
    images: torch.Tensor, generator: torch.Generator, options: ReaderAugmentation = ReaderAugmentation()
) -> torch.Tensor:
    """Augmented copies of a batch of (N, 1, H, W) images in [0, 1] (CPU generator, any device)."""
    count, _, height, width = images.shape
    device = images.device

    angles = _uniform(count, -options.degrees, options.degrees, generator) * math.pi / 180
    scales = _uniform(count, *options.scale, generator)
    shears = _uniform(count, -options.shear, options.shear, generator)
    shifts = (
        _uniform(2 * count, -options.shift_pixels, options.shift_pixels, generator).view(count, 2)
        * 2
        / torch.tensor([width, height])
    )
    cos, sin = torch.cos(angles), torch.sin(angles)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shear = torch.eye(2).repeat(count, 1, 1)
    shear[:, 0, 1] = shears
    linear = rotation @ shear / scales.view(-1, 1, 1)
    matrices = torch.cat([linear, shifts.unsqueeze(-1)], dim=2).to(device)
    grid = F.affine_grid(matrices, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    choice = torch.rand(count, generator=generator).to(device).view(-1, 1, 1, 1)
    dilated = F.max_pool2d(out, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-out, 3, stride=1, padding=1)
    out = torch.where(
        choice < options.thicker, dilated, torch.where(choice < options.thicker + options.thinner, eroded, out)
    )

    floors = _uniform(count, options.dimmest, 1.0, generator).view(-1, 1, 1, 1)
    cells = torch.rand(count, 1, options.field_cells, options.field_cells, generator=generator)
    brightness = floors + (1 - floors) * cells
    out = out * F.interpolate(brightness, size=(height, width), mode="bilinear", align_corners=False).to(device)

    levels = _uniform(count, *options.threshold, generator).view(-1, 1, 1, 1).to(device)
    binary = torch.rand(count, generator=generator).to(device).view(-1, 1, 1, 1) < options.binarize
    out = torch.where(binary, (out > levels).float(), out)

    flips = (torch.rand(images.shape, generator=generator) < options.pixel_noise).to(device)
    out = torch.where(flips, 1 - out.round(), out)
    return out.clamp(0, 1)
