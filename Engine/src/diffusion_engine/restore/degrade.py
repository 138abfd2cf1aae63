"""Degradations of normalised model slices [B, C, H, W] in [-1, 1]: what the restoration models learn to undo.

Every random draw comes from an explicit torch.Generator, so training batches and evaluations are reproducible.
Noise levels are in normalised units (the image range [-1, 1] spans 2), the units of ``noise.estimate_*``.
Missing voxels are set to FILL (the background level) and reported in a ``known`` mask (1 observed, 0 missing),
which the imputation model receives as an extra channel: a black voxel and a missing one look the same otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FILL = -1.0
SUPERRES_FACTORS = (2, 4)


@dataclass
class Degraded:
    image: torch.Tensor  # [B, C, H, W] degraded slices
    known: torch.Tensor | None = None  # [B, 1, H, W] 1 where the voxel was observed (imputation only)


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


def _per_sample(value: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    return value.reshape(-1, *([1] * (x.ndim - 1))) if value.ndim else value


def gaussian_noise(x: torch.Tensor, sigma: float | torch.Tensor, generator: torch.Generator | None = None) -> Degraded:
    """x + sigma n (sigma a number or one per sample)."""
    return Degraded(x + _per_sample(sigma, x) * _noise(x, generator))


def rician_noise(x: torch.Tensor, sigma: float | torch.Tensor, generator: torch.Generator | None = None) -> Degraded:
    """Magnitude of complex Gaussian noise added to the image (Rician), the noise of magnitude MR images.

    The magnitude lives on [0, 1] (u = (x + 1) / 2, 0 = no signal), so sigma in normalised units is sigma / 2 there.
    """
    unit_sigma = _per_sample(sigma, x) / 2.0
    u = (x + 1.0) / 2.0
    real = u + unit_sigma * _noise(x, generator)
    imaginary = unit_sigma * _noise(x, generator)
    return Degraded(2.0 * torch.sqrt(real * real + imaginary * imaginary) - 1.0)


def _apply_known(x: torch.Tensor, known: torch.Tensor) -> Degraded:
    return Degraded(torch.where(known.bool().expand_as(x), x, torch.full_like(x, FILL)), known.to(x.dtype))


def drop_voxels(x: torch.Tensor, fraction: float, generator: torch.Generator | None = None) -> Degraded:
    """Each voxel (all channels together) missing with probability ``fraction``."""
    keep = torch.rand((x.shape[0], 1, *x.shape[2:]), generator=generator).to(x.device) >= fraction
    return _apply_known(x, keep)


def drop_lines(x: torch.Tensor, fraction: float, generator: torch.Generator | None = None) -> Degraded:
    """Whole rows missing with probability ``fraction``: in-plane lines, or slices seen in a reformatted view."""
    rows = torch.rand((x.shape[0], 1, x.shape[2], 1), generator=generator).to(x.device) >= fraction
    return _apply_known(x, rows.expand(-1, -1, -1, x.shape[3]))


def drop_box(x: torch.Tensor, size: int, generator: torch.Generator | None = None, *,
             within: torch.Tensor | None = None) -> Degraded:
    """A size x size square at a random position missing in each slice (a masked region); with ``within``
    [B, 1, H, W] (e.g. the head) the square is centred on a random voxel of it, where a slice has one."""
    batch, _, height, width = x.shape
    if not 0 < size <= min(height, width):
        raise ValueError(f"box size {size} must be in 1..{min(height, width)}")
    top = torch.randint(height - size + 1, (batch,), generator=generator)
    left = torch.randint(width - size + 1, (batch,), generator=generator)
    for i in range(batch if within is not None else 0):
        inside = torch.nonzero(within[i, 0].cpu())
        if len(inside):
            row, column = inside[int(torch.randint(len(inside), (1,), generator=generator))].tolist()
            top[i] = min(max(row - size // 2, 0), height - size)
            left[i] = min(max(column - size // 2, 0), width - size)
    known = torch.ones((batch, 1, height, width), dtype=torch.bool)
    for i in range(batch):
        known[i, :, top[i]:top[i] + size, left[i]:left[i] + size] = False
    return _apply_known(x, known.to(x.device))


def downsample(x: torch.Tensor, factor: int) -> Degraded:
    """In-plane resolution loss by ``factor``: block-average (the acquisition of larger voxels), then bilinear
    interpolation back to the model grid, which is the condition the super-resolution model sees."""
    if factor not in SUPERRES_FACTORS:
        raise ValueError(f"super-resolution factor must be one of {SUPERRES_FACTORS}, got {factor!r}")
    height, width = x.shape[-2:]
    if height % factor or width % factor:
        raise ValueError(f"slice size {height}x{width} is not divisible by the factor {factor}")
    low = F.avg_pool2d(x, factor)
    return Degraded(F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False))
