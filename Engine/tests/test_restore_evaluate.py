"""Restoration evaluation: scores against hand computations, baselines that really denoise, uncertainty ranking."""

from __future__ import annotations

import math
from pathlib import Path

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


def test_evaluation_scores_every_degradation_baseline_and_model(tmp_path):
    from diffusion_engine.restore.evaluate import EvaluationSettings, evaluate_task, write_evaluation
    from diffusion_engine.restore.training import build_restore_model

    torch.manual_seed(0)
    clean = torch.from_numpy(np.concatenate([_slices(), _slices()[::-1]])).float()[:, None]  # [6, 1, 48, 48]
    settings = EvaluationSettings(samples=2, steps=2, cvdm_steps=2)
    superres = build_restore_model("superres", "cvdm", preset="tiny-conv", image_size=48, info={"factors": [2]})
    with torch.no_grad():  # an untrained schedule network gives a constant map, which cannot rank anything
        for parameter in superres.learned.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    rows = evaluate_task("superres", {"sr": superres}, clean, settings)
    assert [(r["setting"], r["method"]) for r in rows.rows] == [
        ("2x in-plane", "degraded input"), ("2x in-plane", "bilinear interpolation"),
        ("2x in-plane", "bicubic interpolation"), ("2x in-plane", "sr, from noise (mean of 2)")]
    degraded, bilinear, bicubic, model = rows.rows
    assert bilinear["psnr"] == pytest.approx(degraded["psnr"])  # the condition is the bilinear interpolation
    assert bicubic["psnr"] > bilinear["psnr"]
    assert -1 <= model["uncertainty_rank_corr"] <= 1 and -1 <= model["schedule_rank_corr"] <= 1

    impute = build_restore_model("impute", "conditional", preset="tiny-conv", image_size=48)
    filled = evaluate_task("impute", {"fill": impute}, clean, settings)
    assert len(filled.rows) == 3 * 3  # input, biharmonic, model for voxels, rows and a square
    for case, _, restored in filled.examples:
        known = case.known[:, 0].bool().numpy()
        assert np.array_equal(restored[0].image[known], case.image[:, 0].numpy()[known])  # observed voxels kept
        assert 0 < (~known).mean() < 0.5

    outputs = write_evaluation({"superres": rows, "impute": filled}, clean[:, 0].numpy(), tmp_path / "eval",
                               command="diffusion-engine evaluate restore ...")
    text = (tmp_path / "eval" / "results.md").read_text()
    assert "## superres" in text and "## impute" in text and "bicubic interpolation" in text
    assert all(Path(path).is_file() for path in outputs.values())
