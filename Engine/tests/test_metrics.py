"""Segmentation metrics against hand computations and a brute-force precision-recall curve."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffusion_engine.metrics import (
    average_precision,
    brain_pixels,
    case_dice,
    dice,
    image_accuracy,
    iou,
    protocol_metrics,
    setting_metrics,
)


def slow_average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
    """Sum over each distinct threshold (high to low) of (recall gain) x precision, counted directly."""
    scores, truth = scores.ravel().astype(float), truth.ravel().astype(bool)
    total, previous_recall = 0.0, 0.0
    for threshold in sorted(set(scores.tolist()), reverse=True):
        predicted = scores >= threshold
        tp = np.sum(predicted & truth)
        precision = tp / np.sum(predicted)
        recall = tp / np.sum(truth)
        total += (recall - previous_recall) * precision
        previous_recall = recall
    return total


def masks(*rows: str) -> np.ndarray:
    """A mask from strings of '.' and 'x'."""
    return np.array([[c == "x" for c in row] for row in rows])


def test_dice_and_iou_by_hand() -> None:
    p = masks("xxx.", "....")
    g = masks(".xxx", "...x")
    # overlap 2, |P| = 3, |G| = 4, union 5
    assert dice(p, g) == pytest.approx(4 / 7)
    assert iou(p, g) == pytest.approx(2 / 5)
    assert dice(g, g) == 1.0 and iou(g, g) == 1.0
    assert dice(p, ~p) == 0.0 and iou(p, ~p) == 0.0


def test_empty_mask_conventions() -> None:
    empty, some = masks("....", "...."), masks("x...", "....")
    stack_p = np.stack([empty, some, empty, some])
    stack_g = np.stack([empty, empty, some, some])
    # per slice: both empty -> 1 (the paper's smoothed Dice), one empty -> 0, identical -> 1
    np.testing.assert_array_equal(dice(stack_p, stack_g, per_slice=True), [1.0, 0.0, 0.0, 1.0])
    np.testing.assert_array_equal(iou(stack_p, stack_g, per_slice=True), [1.0, 0.0, 0.0, 1.0])
    # pooled: one confusion matrix over the stack: overlap 1, |P| = 2, |G| = 2
    assert dice(stack_p, stack_g) == pytest.approx(0.5)
    assert iou(stack_p, stack_g) == pytest.approx(1 / 3)
    assert dice(empty, empty) == 1.0


def test_masks_must_be_binary_and_alike() -> None:
    with pytest.raises(ValueError, match="binary"):
        dice(np.array([0, 2]), np.array([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros(3), np.zeros(4))


def test_average_precision_matches_brute_force_with_ties() -> None:
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(5, 300))
        truth = rng.random(n) < rng.uniform(0.05, 0.6)
        truth[rng.integers(n)] = True
        scores = np.round(rng.normal(size=n) + truth * rng.uniform(0, 2), int(rng.integers(0, 3)))  # many ties
        expected = slow_average_precision(scores, truth)
        assert average_precision(scores, truth) == pytest.approx(expected, abs=1e-12), trial


def test_average_precision_extremes() -> None:
    truth = np.array([1, 1, 0, 0, 0, 1, 0, 0], bool)
    perfect = truth.astype(float)
    assert average_precision(perfect, truth) == 1.0
    # inverted, no ties: every negative (5) ranks above every positive (3): AP = sum_k 1/3 * k / (5 + k)
    inverted = np.where(truth, 0.0, 10.0) + np.arange(8)
    assert average_precision(inverted, truth) == pytest.approx(sum(k / (5 + k) for k in (1, 2, 3)) / 3)
    # with ties the inverted ranking has two thresholds only: nothing found, then everything (precision 3/8)
    assert average_precision(-perfect, truth) == pytest.approx(3 / 8)
    # constant scores: a single threshold, everything positive: precision = prevalence at recall 1
    assert average_precision(np.full(8, 0.7), truth) == pytest.approx(3 / 8)
    assert math.isnan(average_precision(np.arange(4.0), np.zeros(4, bool)))
    # precision is not recall: 1 positive ranked 2nd of 4 -> AP = precision there = 1/2 (recall would be 1)
    assert average_precision(np.array([4.0, 3.0, 2.0, 1.0]), np.array([0, 1, 0, 0])) == pytest.approx(0.5)


def test_average_precision_agrees_with_sklearn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    truth = rng.random((6, 16, 16)) < 0.1
    scores = np.round(rng.random((6, 16, 16)) + truth, 2)
    expected = metrics.average_precision_score(truth.ravel(), scores.ravel())
    assert average_precision(scores, truth) == pytest.approx(expected, abs=1e-12)


def test_brain_pixels_use_the_channel_mean() -> None:
    images = np.full((1, 2, 2, 2), -1.0, np.float32)
    images[0, 0, 0, 0] = -0.8  # mean -0.9: brain
    images[0, 0, 0, 1] = -0.95  # mean -0.975: background
    images[0, :, 1, 1] = 0.3
    np.testing.assert_array_equal(brain_pixels(images)[0], [[True, False], [False, True]])


def test_setting_metrics_by_hand() -> None:
    truth = np.stack([masks("xx..", "...."), masks("....", "....")])
    pred = np.stack([masks("x...", "...."), masks("...x", "....")])
    scores = np.zeros((2, 2, 4))
    scores[0, 0, :2] = [0.9, 0.5]  # lesion pixels
    scores[1, 0, 3] = 0.7  # a false alarm outside the lesion but inside the brain
    scores[0, 1, 0] = 5.0  # top score, outside the brain: must not count
    brain = np.ones((2, 2, 4), bool)
    brain[0, 1, 0] = False
    result = setting_metrics(pred, truth, scores, brain)
    assert result["slices"] == 2 and result["lesion_pixels"] == 2
    assert result["dice"] == pytest.approx((2 / 3 + 0.0) / 2)  # slice 2: empty truth, one predicted pixel
    assert result["iou"] == pytest.approx((1 / 2 + 0.0) / 2)
    assert result["dice_pooled"] == pytest.approx(2 / 4)
    assert result["iou_pooled"] == pytest.approx(1 / 3)
    # ranking inside the brain: 0.9 (lesion), 0.7 (not), 0.5 (lesion), then zeros -> AP = 1/2 * 1 + 1/2 * 2/3
    assert result["auprc"] == pytest.approx(0.5 + 1 / 3)
    empty = setting_metrics(pred[:0], truth[:0], scores[:0], brain[:0])  # a set without slices scores nothing
    assert empty["slices"] == 0 and all(math.isnan(empty[k]) for k in ("dice", "dice_pooled", "auprc"))


def test_protocol_settings_and_cases() -> None:
    lesion = masks("xx..", "xx..")
    empty = np.zeros_like(lesion)
    truth = np.stack([lesion, empty, lesion, empty])  # case a: slices 0, 1; case b: slices 2, 3
    cases = ["a", "a", "b", "b"]
    all_masks = np.stack([lesion, masks("...x", "...."), masks("x...", "...."), empty])
    decided = np.array([True, False, False, False])  # slice 2 (a lesion) was decided healthy
    mixed_masks = all_masks & decided[:, None, None]
    scores = truth.astype(float)
    brain = np.ones_like(truth)
    result = protocol_metrics(mixed_masks=mixed_masks, all_masks=all_masks, truth=truth, scores=scores, brain=brain,
                              decided_unhealthy=decided, labels=np.array([1, 0, 1, 0]), cases=cases)
    # mixed: slice Dice 1, 1 (both empty), 0 (missed), 1 (both empty)
    assert result["mixed"]["dice"] == pytest.approx(3 / 4)
    assert result["mixed"]["accuracy"] == pytest.approx(3 / 4)
    # unhealthy: lesion slices 0 and 2 only, masks kept: Dice 1 and 2*1/(1+4)
    assert result["unhealthy"]["slices"] == 2
    assert result["unhealthy"]["dice"] == pytest.approx((1 + 2 / 5) / 2)
    assert result["unhealthy"]["auprc"] == 1.0
    assert result["cases"]["per_case_dice"] == {"a": 1.0, "b": 0.0}
    assert result["cases"]["dice_mean_lesion_cases"] == pytest.approx(0.5)
    assert case_dice(all_masks, truth, cases)["a"] == pytest.approx(8 / 9)  # 2*4 / (5 + 4)


def test_image_accuracy() -> None:
    assert image_accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5


def test_ms_ssim_is_one_for_identical_images_and_falls_with_noise_and_blur():
    from scipy.ndimage import gaussian_filter

    from diffusion_engine.metrics import ms_ssim

    rng = np.random.default_rng(0)
    image = gaussian_filter(rng.random((64, 64)), 2.0)
    image = (image - image.min()) / np.ptp(image)
    assert ms_ssim(image, image) == pytest.approx(1.0)
    slightly, badly = (np.clip(image + s * rng.standard_normal(image.shape), 0, 1) for s in (0.02, 0.2))
    assert 1.0 > ms_ssim(image, slightly) > ms_ssim(image, badly) > 0.0
    assert ms_ssim(image, slightly) == pytest.approx(ms_ssim(slightly, image))
    assert ms_ssim(image, gaussian_filter(image, 3.0)) < ms_ssim(image, gaussian_filter(image, 1.0))
    with pytest.raises(ValueError, match="2-D"):
        ms_ssim(image, image[:32])
