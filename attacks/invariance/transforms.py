"""Affine transforms of images (shifts, rotations, random copies) and the cache of model-independent search steps."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from invarbench.io import atomic_write

SHIFTS = (-3.0, -1.5, 0.0, 1.5, 3.0)
ROTATIONS = tuple(float(angle) for angle in range(-30, 31, 2))


def transform_grid(shifts=SHIFTS, rotations=ROTATIONS) -> torch.Tensor:
    """(T, 3) rows of (shift_x, shift_y, degrees): 5 x 5 shifts x 31 rotations = 775 by default."""
    return torch.tensor([(dx, dy, angle) for angle in rotations for dy in shifts for dx in shifts], dtype=torch.float32)


def affine_matrices(
    parameters: torch.Tensor,
    size: int,
    *,
    scale: torch.Tensor | None = None,
    shear: torch.Tensor | None = None,
    inverse: bool = False,
) -> torch.Tensor:
    """``affine_grid`` matrices (T, 2, 3) for shifts in pixels, rotations in degrees (and optional
    scale and shear): output pixel p samples the input at A p + b (normalised coordinates)."""
    angles = parameters[:, 2] * math.pi / 180
    cos, sin = torch.cos(angles), torch.sin(angles)
    linear = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    if shear is not None:
        shear_matrix = torch.zeros(len(parameters), 2, 2)
        shear_matrix[:, 0, 0] = shear_matrix[:, 1, 1] = 1
        shear_matrix[:, 0, 1] = shear
        linear = linear @ shear_matrix
    if scale is not None:
        linear = linear / scale.view(-1, 1, 1)
    # A shift of s pixels moves the content by s: sample the input s pixels back (2/size per pixel).
    offset = -parameters[:, :2] * 2 / size
    offset = (linear @ offset.unsqueeze(-1)).squeeze(-1)
    if inverse:
        linear_inverse = torch.linalg.inv(linear)
        return torch.cat([linear_inverse, (-linear_inverse @ offset.unsqueeze(-1))], dim=2)
    return torch.cat([linear, offset.unsqueeze(-1)], dim=2)


def warp(images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Apply one matrix per image ((N, C, H, W) and (N, 2, 3)), bilinear, zero outside."""
    grid = F.affine_grid(matrices, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# Part of every cache key: bump it when a cached search step changes, so old results are not reused.
CACHE_VERSION = 1


def _cache_path(cache_dir: Path | None, *parts: Any) -> Path | None:
    if cache_dir is None:
        return None
    key = hashlib.sha256(repr((CACHE_VERSION, *parts)).encode()).hexdigest()[:16]
    return cache_dir / f"{parts[0]}-{key}.pt"


def _cached(path: Path | None, compute):
    if path is not None and path.exists():
        return torch.load(path)
    value = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(value, tmp))
    return value


def _is_image(images: torch.Tensor) -> bool:
    return images.dim() == 4 and images.shape[-1] == images.shape[-2] and images.shape[-1] >= 8


def random_affine_copies(
    images: torch.Tensor,
    copies: int,
    *,
    seed: int,
    max_degrees: float = 15.0,
    max_shift: float = 2.0,
    scale_range: tuple[float, float] = (0.9, 1.1),
    max_shear: float = 0.2,
    batch: int = 10_000,
) -> torch.Tensor:
    """``copies`` random affine versions (rotation, scale, shear, shift) of every image, stacked after
    each other: (copies * N, C, H, W)."""
    generator = torch.Generator().manual_seed(seed)
    size = images.shape[-1]
    result = []
    for _ in range(copies):
        count = len(images)
        parameters = torch.stack(
            [
                (torch.rand(count, generator=generator) * 2 - 1) * max_shift,
                (torch.rand(count, generator=generator) * 2 - 1) * max_shift,
                (torch.rand(count, generator=generator) * 2 - 1) * max_degrees,
            ],
            dim=1,
        )
        scale = scale_range[0] + torch.rand(count, generator=generator) * (scale_range[1] - scale_range[0])
        shear = (torch.rand(count, generator=generator) * 2 - 1) * max_shear
        matrices = affine_matrices(parameters, size, scale=scale, shear=shear)
        result.extend(
            warp(images[start : start + batch], matrices[start : start + batch]) for start in range(0, count, batch)
        )
    return torch.cat(result)
