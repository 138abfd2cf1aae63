"""Image formation: tissue contrasts, compartments, texture, bias field and Rician noise.

Every voxel is a partial-volume mixture: sum over tissues of fraction x tissue level, then each compartment
(lesion part, white-matter hyperintensity, vessel, ...) replaces its own fraction of what is there. Levels
are drawn per subject and sequence, relative to white matter (= 1), within ranges that keep each
sequence's tissue order: FLAIR CSF < WM < GM, T2 WM < GM < CSF, T1 CSF < GM < WM. Then a smooth
multiplicative bias field and Rician noise (magnitude of complex Gaussian noise), zero outside the brain.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .fields import smooth_noise

# Tissue levels relative to white matter, (low, high) per subject; white matter itself is 1.
TISSUE_LEVELS = {
    "flair": {"gm": (1.20, 1.40), "csf": (0.10, 0.25)},
    "t2": {"gm": (1.25, 1.45), "csf": (2.60, 3.20)},
    "t1": {"gm": (0.68, 0.78), "csf": (0.22, 0.36)},
}
WHITE_MATTER_LEVEL = (300.0, 900.0)  # scanner units differ between subjects; pipelines must normalise
NOISE_STD = (0.015, 0.04)  # Gaussian noise per channel, relative to white matter
TEXTURE_STD, TEXTURE_SMOOTHNESS_MM = 0.025, 1.5  # fine tissue texture, shared by all sequences of a subject
BIAS_SMOOTHNESS_MM = 60.0
EVERYWHERE = (slice(None), slice(None), slice(None))


@dataclass(frozen=True, eq=False)
class Compartment:
    """Something that replaces normal tissue over ``fraction`` (partial volume) within ``box``.

    ``ratios`` maps a sequence to the compartment's level relative to the subject's white matter (a number,
    or an array over ``box`` for textured compartments); sequences it does not name are left unchanged.
    """

    fraction: np.ndarray
    ratios: Mapping[str, float | np.ndarray]
    box: tuple[slice, ...] = EVERYWHERE


@dataclass(frozen=True, eq=False)
class Appearance:
    """How one subject looks on one scanner: tissue levels, noise, bias fields and texture per sequence."""

    levels: dict[str, dict[str, float]]
    noise_std: dict[str, float]
    bias: dict[str, np.ndarray]
    texture: np.ndarray

    def white_matter(self, modality: str) -> float:
        return self.levels[modality]["wm"]


def draw_appearance(shape: Sequence[int], spacing: float, rng: np.random.Generator, modalities: Sequence[str],
                    bias_std: tuple[float, float]) -> Appearance:
    """Random tissue levels, noise level, per-sequence bias field and the subject's texture."""
    levels, noise_std = {}, {}
    for modality in modalities:
        white = float(rng.uniform(*WHITE_MATTER_LEVEL))
        ranges = TISSUE_LEVELS[modality]
        levels[modality] = {"wm": white, **{t: white * float(rng.uniform(*r)) for t, r in ranges.items()}}
        noise_std[modality] = white * float(rng.uniform(*NOISE_STD))
    strengths = rng.uniform(*bias_std, len(modalities))
    fields = smooth_noise(shape, BIAS_SMOOTHNESS_MM / spacing, rng, count=len(modalities))
    bias = {m: np.exp(s * f).astype(np.float32) for m, s, f in zip(modalities, strengths, fields, strict=True)}
    texture = 1.0 + TEXTURE_STD * smooth_noise(shape, TEXTURE_SMOOTHNESS_MM / spacing, rng)[0]
    return Appearance(levels=levels, noise_std=noise_std, bias=bias, texture=texture)


def render(appearance: Appearance, modality: str, tissues: Mapping[str, np.ndarray], brain: np.ndarray,
           compartments: Sequence[Compartment], noise_rng: np.random.Generator | None) -> np.ndarray:
    """One sequence's image (float32), zero outside the binary ``brain`` mask; no scanner noise without a noise rng
    (the clean ground truth that restoration is scored against)."""
    levels = appearance.levels[modality]
    image = sum(tissues[t] * np.float32(levels[t]) for t in ("gm", "wm", "csf"))
    image *= appearance.texture
    white = np.float32(appearance.white_matter(modality))
    for part in compartments:
        ratio = part.ratios.get(modality)
        if ratio is not None:
            region = image[part.box]
            region += part.fraction * (np.asarray(ratio, dtype=np.float32) * white - region)
    image *= appearance.bias[modality]
    if noise_rng is None:
        image[~brain] = 0.0
        return image.astype(np.float32, copy=False)
    sigma = np.float32(appearance.noise_std[modality])
    real = image + sigma * noise_rng.standard_normal(image.shape, dtype=np.float32)
    imaginary = sigma * noise_rng.standard_normal(image.shape, dtype=np.float32)
    magnitude = np.sqrt(real * real + imaginary * imaginary)
    magnitude[~brain] = 0.0
    return magnitude.astype(np.float32, copy=False)
