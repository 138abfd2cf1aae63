"""Evaluating restoration on held-out slices with known clean ground truth, beside classical baselines.

Slices of a manifest split are degraded synthetically (Rician noise at several levels, dropped voxels, in-plane
downsampling), restored by the model and by baselines (non-local means and total variation from scikit-image for
noise, biharmonic inpainting for missing voxels, the bilinear interpolation itself for super-resolution), and
scored on the model grid in normalised units mapped to [0, 1]: PSNR, SSIM, MAE. With several samples, the
Spearman correlation between the per-voxel variance and the absolute error says whether the uncertainty map ranks
the worst voxels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..datasets import load_slices
from ..manifest import read_manifest
from . import degrade
from .model import NORMALISATION, RestoreModel

DEFAULT_SIGMAS = (0.05, 0.1, 0.2)


def image_scores(clean: np.ndarray, restored: np.ndarray) -> dict[str, float]:
    """PSNR (dB), SSIM and MAE over slices [S, H, W] in [-1, 1] (scored on [0, 1])."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a, b = (np.clip(clean, -1, 1) + 1) / 2, (np.clip(restored, -1, 1) + 1) / 2
    psnr = np.mean([peak_signal_noise_ratio(x, y, data_range=1.0) for x, y in zip(a, b, strict=True)])
    ssim = np.mean([structural_similarity(x, y, data_range=1.0) for x, y in zip(a, b, strict=True)])
    return {"psnr": float(psnr), "ssim": float(ssim), "mae": float(np.abs(a - b).mean())}


def uncertainty_rank_correlation(variance: np.ndarray, error: np.ndarray) -> float:
    """Spearman correlation between per-voxel variance and absolute error."""
    from scipy.stats import spearmanr

    return float(spearmanr(variance.ravel(), np.abs(error).ravel()).statistic)


def denoise_baselines(noisy: np.ndarray, sigma: float) -> dict[str, np.ndarray]:
    """Non-local means (sigma-aware) and total-variation denoising of slices [S, H, W] in [-1, 1]."""
    from skimage.restoration import denoise_nl_means, denoise_tv_chambolle

    unit = (noisy + 1) / 2
    nlm = np.stack([denoise_nl_means(s, h=0.8 * sigma / 2, sigma=sigma / 2, patch_size=5, patch_distance=6)
                    for s in unit])
    tv = np.stack([denoise_tv_chambolle(s, weight=sigma / 2) for s in unit])
    return {"nlm": nlm * 2 - 1, "tv": tv * 2 - 1}


def impute_baseline(image: np.ndarray, known: np.ndarray) -> np.ndarray:
    from skimage.restoration import inpaint_biharmonic

    return np.stack([inpaint_biharmonic(s, ~k.astype(bool)) for s, k in zip(image, known, strict=True)])


@dataclass
class EvaluationRows:
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, setting: str, method: str, scores: dict[str, float], **extra: Any) -> None:
        self.rows.append({"setting": setting, "method": method, **scores, **extra})

    def markdown(self) -> str:
        lines = ["| setting | method | PSNR | SSIM | MAE | extra |", "|---|---|---|---|---|---|"]
        for row in self.rows:
            extra = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                              if k not in ("setting", "method", "psnr", "ssim", "mae"))
            lines.append(f"| {row['setting']} | {row['method']} | {row['psnr']:.2f} | {row['ssim']:.3f} | "
                         f"{row['mae']:.4f} | {extra} |")
        return "\n".join(lines) + "\n"


def evaluate_denoising(model: RestoreModel, clean: torch.Tensor, sigmas: Sequence[float], *, seed: int = 0,
                       entry_offsets: Sequence[float] = (0.5, 1.0, 2.0), steps: int = 20) -> EvaluationRows:
    """Matched-entry denoising (and entries at a multiple of the matched t) vs NLM and TV at each Rician sigma."""
    from .denoise import DenoiseSettings, denoise
    from .noise import match_timestep

    rows = EvaluationRows()
    for sigma in sigmas:
        noisy = degrade.rician_noise(clean, sigma, torch.Generator().manual_seed(seed)).image
        setting = f"rician sigma={sigma}"
        rows.add(setting, "noisy input", image_scores(clean[:, 0].numpy(), noisy[:, 0].numpy()))
        for name, out in denoise_baselines(noisy[:, 0].numpy(), sigma).items():
            rows.add(setting, name, image_scores(clean[:, 0].numpy(), out))
        matched = match_timestep(model.schedule, sigma).t
        for factor in entry_offsets:
            t = min(model.schedule.num_timesteps - 1, max(0, round(matched * factor)))
            with torch.no_grad():
                result = denoise(lambda x, s: model.eps(x, s), model.schedule, noisy, sigma,
                                 DenoiseSettings(ddim_steps=steps, seed=seed), t_override=t)
            rows.add(setting, f"ddpm entry {factor:g}x matched", image_scores(clean[:, 0].numpy(),
                                                                              result.image[:, 0].numpy()), t=t)
    return rows


def held_out_slices(manifest: str | Path, split: str, model: RestoreModel, limit: int) -> torch.Tensor:
    """Up to ``limit`` slices (evenly spread) of the split, preprocessed as the model expects."""
    rows = read_manifest(manifest, modalities=(model.modality,)).split(split)
    data = load_slices(rows, (model.modality,), (model.image_size, model.image_size), NORMALISATION)
    pick = np.linspace(0, len(data) - 1, min(limit, len(data))).round().astype(int)
    return torch.from_numpy(data.images[pick])
