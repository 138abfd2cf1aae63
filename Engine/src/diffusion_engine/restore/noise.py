"""Noise-level estimation and the matching timestep of a noise schedule.

A DDPM expects x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. An image y = x0 + sigma n (n white, unit variance)
scaled by sqrt(abar_t) has exactly that form when sigma^2 = (1 - abar_t) / abar_t, i.e. abar_t = 1 / (1 + sigma^2):
the noisy image enters the reverse chain at that t (Daw et al., sec. 3.1). sigma is measured in the model's
normalised intensity units; the match is the step nearest in log signal-to-noise ratio.

Estimators (both robust to anatomy):
- Gaussian: the median absolute finest-scale diagonal Haar coefficient / 0.6745 (Donoho & Johnstone). The
  orthonormal diagonal detail (a - b - c + d) / 2 of white noise has the noise's own variance, while smooth
  anatomy contributes almost nothing to it except along edges, which the median ignores.
- Rician background: where the true signal is zero the magnitude is Rayleigh(sigma), E[M^2] = 2 sigma^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..schedule import Schedule

MAD_TO_SIGMA = 0.6744897501960817  # median of |N(0, 1)|
MIN_BLOCKS = 64  # fewer 2x2 blocks than this give no usable median
MIN_BACKGROUND = 500  # background voxels needed for the Rayleigh estimate
CLEAN_FRACTION = 0.5  # sigma below half the first step's sigma: the image is already clean for this schedule


def _diagonal_details(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Orthonormal diagonal Haar coefficients of the 2x2 blocks of the last two axes (all of them in the mask)."""
    data = np.asarray(image, np.float64)
    rows, cols = data.shape[-2] // 2 * 2, data.shape[-1] // 2 * 2
    data = data[..., :rows, :cols]
    a, b, c, d = data[..., 0::2, 0::2], data[..., 0::2, 1::2], data[..., 1::2, 0::2], data[..., 1::2, 1::2]
    detail = (a - b - c + d) / 2.0
    if mask is None:
        return detail.ravel()
    m = np.asarray(mask, bool)[..., :rows, :cols]
    inside = m[..., 0::2, 0::2] & m[..., 0::2, 1::2] & m[..., 1::2, 0::2] & m[..., 1::2, 1::2]
    return detail[inside]


def estimate_sigma_gaussian(image: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Standard deviation of additive white Gaussian noise in a 2-D slice or a stack [..., H, W].

    ``mask`` (same shape) limits the estimate to 2x2 blocks entirely inside it, e.g. the brain, so that a zeroed
    background does not pull the median to 0. Returns nan when fewer than MIN_BLOCKS blocks are available.
    """
    details = _diagonal_details(image, mask)
    if details.size < MIN_BLOCKS:
        return math.nan
    return float(np.median(np.abs(details)) / MAD_TO_SIGMA)


def estimate_sigma_rician(magnitude: np.ndarray, background: np.ndarray) -> float:
    """sigma of Rician noise from background voxels (true signal 0): sqrt(mean(M^2) / 2); nan if too few."""
    values = np.asarray(magnitude, np.float64)[np.asarray(background, bool)]
    if values.size < MIN_BACKGROUND:
        return math.nan
    return float(np.sqrt(np.mean(values**2) / 2.0))


# -- schedule matching ---------------------------------------------------------------------------------------


def schedule_sigmas(schedule: Schedule) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t): the noise level (in units of x0) that step t expects."""
    abar = schedule.alphas_cumprod.numpy()
    return np.sqrt((1.0 - abar) / abar)


@dataclass(frozen=True)
class TimestepMatch:
    """The step whose noise level is nearest to sigma (in log-SNR), or t = -1 when the image is already clean."""

    sigma: float
    t: int
    sigma_t: float  # the noise level step t expects (0 for t = -1)

    @property
    def clean(self) -> bool:
        return self.t < 0


class SigmaOutOfRange(ValueError):
    """The noise level is above the largest one the schedule reaches."""


def match_timestep(schedule: Schedule, sigma: float) -> TimestepMatch:
    """The timestep that expects noise of standard deviation ``sigma`` (normalised units).

    abar* = 1 / (1 + sigma^2); t = argmin_t |log SNR_t - log SNR*| with SNR = abar / (1 - abar) = 1 / sigma^2.
    sigma below CLEAN_FRACTION of the first step's level maps to t = -1 (nothing to remove); above the last
    step's level raises SigmaOutOfRange (the chain cannot absorb that much noise).
    """
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    sigmas = schedule_sigmas(schedule)
    if sigma > sigmas[-1] * (1.0 + 1e-9):
        raise SigmaOutOfRange(f"noise level {sigma:.4g} is above the schedule's largest ({sigmas[-1]:.4g})")
    if sigma < CLEAN_FRACTION * sigmas[0]:
        return TimestepMatch(sigma=float(sigma), t=-1, sigma_t=0.0)
    t = int(np.argmin(np.abs(np.log(sigmas) - math.log(sigma))))
    return TimestepMatch(sigma=float(sigma), t=t, sigma_t=float(sigmas[t]))


def enter_chain(schedule: Schedule, noisy: torch.Tensor, t: int) -> torch.Tensor:
    """x_t for a noisy image y = x0 + sigma_t n: sqrt(abar_t) y (the noise becomes sqrt(1 - abar_t) n)."""
    abar = float(schedule.alphas_cumprod[t])
    return noisy * math.sqrt(abar)
