"""Restoration evaluation: scores against hand computations, baselines that really denoise, uncertainty ranking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusion_engine.restore import degrade
from diffusion_engine.restore.evaluate import (
    denoise_baselines,
    image_scores,
    impute_baseline,
    uncertainty_rank_correlation,
)


def _slices() -> np.ndarray:
    yy, xx = np.mgrid[:48, :48] / 48
    base = 0.6 * np.sin(2 * np.pi * xx) * np.cos(np.pi * yy)
    return np.stack([base, -base, 0.5 * base]).astype(np.float64)


def test_scores_match_hand_computations():
    clean = _slices()
    shifted = clean + 0.1  # 0.05 on the [0, 1] scale everywhere (no clipping: |clean| <= 0.6)
    scores = image_scores(clean, shifted)
    assert scores["mae"] == pytest.approx(0.05, abs=1e-9)
    assert scores["psnr"] == pytest.approx(10 * math.log10(1 / 0.05**2), abs=1e-6)
    assert image_scores(clean, clean)["ssim"] == pytest.approx(1.0)


def test_baselines_reduce_the_error():
    clean = _slices()
    noisy = degrade.rician_noise(torch.from_numpy(clean)[:, None], 0.1, torch.Generator().manual_seed(0)).image
    noisy = noisy[:, 0].numpy()
    before = image_scores(clean, noisy)["psnr"]
    for restored in denoise_baselines(noisy, 0.1).values():
        assert image_scores(clean, restored)["psnr"] > before + 2
    dropped = degrade.drop_voxels(torch.from_numpy(clean)[:, None], 0.3, torch.Generator().manual_seed(1))
    filled = impute_baseline(dropped.image[:, 0].numpy(), dropped.known[:, 0].numpy())
    assert image_scores(clean, filled)["psnr"] > image_scores(clean, dropped.image[:, 0].numpy())["psnr"] + 5


def test_uncertainty_rank_correlation():
    error = np.random.default_rng(0).standard_normal(500)
    assert uncertainty_rank_correlation(np.abs(error) ** 2, error) == pytest.approx(1.0)
    assert abs(uncertainty_rank_correlation(np.random.default_rng(1).random(500), error)) < 0.15
