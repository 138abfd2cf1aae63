"""Segmentation metrics of the AnoFPDM paper's Table 1 protocol, in numpy, with every convention written down.

All metrics are computed on the model grid (the slices the model sees, e.g. 128x128), as the paper does.

Pixels
- Dice and IoU count every pixel of a slice (the authors' code: sums over the whole [1, H, W] mask).
- AUPRC counts the brain pixels only ("with a specific focus on the foreground areas", paper sec. 5.3). Brain
  pixels are those whose mean over the model's input channels exceeds -0.95 on the [-1, 1] scale
  (``brain_pixels``; the authors' code: ``source.mean(dim=1) > -0.95``). Background after preprocessing sits at
  exactly -1 (per-slice min-max scaling, padding with the minimum), so this keeps the head and drops the air.

Dice and IoU: per slice, then averaged (the paper's numbers)
- Per slice: Dice = 2|P & G| / (|P| + |G|), IoU = |P & G| / |P | G|. Two empty masks agree perfectly: 1
  (the code's (2|P & G| + 1e-6) / (|P| + |G| + 1e-6)); an empty truth with a non-empty prediction scores 0.
  That convention is why the paper's mixed-setting Dice is high on cohorts of mostly healthy slices: for ATLAS,
  where 2,997 of 4,000 test slices (75%) are healthy, most methods' mixed Dice sits near 75 (paper Table 1b).
- ``dice``/``iou`` in the reports are the mean over the slices of the set. ``dice_pooled``/``iou_pooled`` pool
  the pixel counts of the whole set first (one confusion matrix, BraTS-challenge style; 1 if the set has neither
  a lesion nor a prediction); they are reported next to the paper's numbers, not instead of them.
- Per case: Dice pooled over the slices of one case (a 3-D Dice on the model grid), same empty convention.

AUPRC = average precision (AP) of the continuous anomaly score against the lesion mask over the brain pixels of
the whole set, pooled (one ranking of all the set's brain pixels):
    AP = sum_k (R_k - R_{k-1}) P_k
over the distinct score values taken as thresholds in decreasing order (score >= threshold is positive), with
P_k = TP_k / (TP_k + FP_k) and R_k = TP_k / (number of lesion pixels), R_0 = 0. Tied scores form one threshold.
This is sklearn's ``average_precision_score``; precision is the y-axis and recall the x-axis (specs/anofpdm.md
notes that the authors' evaluate.py swaps precision and recall; not copied). Constant scores give AP = lesion
prevalence; a set without lesion pixels has no AUPRC (NaN, reported as null). Differences from the code: it
averages per-batch APs of batch 32 (so the number depends on the batch composition); here the set is pooled.

Settings (paper sec. 5.3; code: ``evaluate(mask, pred_mask, ...)`` and ``evaluate(..., pred_mask_all, ..., lab)``)
- "mixed": every slice, with the masks after the healthy/unhealthy decision (slices decided healthy get an empty
  mask). Methods without a decision (the baselines) are scored on their masks as they are; for them a slice is
  "decided unhealthy" when its mask is non-empty. Image-level accuracy belongs to this setting.
- "unhealthy": only the slices whose ground-truth mask (on the model grid) holds a lesion pixel, with every
  mask kept (no decision). The anomaly score map is the same in both settings (the code's ``pred_map``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

BRAIN_LEVEL = -0.95  # model-input scale [-1, 1]; the authors' foreground rule


def _binary(mask: Any, name: str) -> np.ndarray:
    array = np.asarray(mask)
    if array.dtype != bool:
        values = np.unique(array)
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"{name} must be a binary mask (0/1 or bool), got values {values[:5].tolist()}")
        array = array.astype(bool)
    return array


def _pair(prediction: Any, truth: Any) -> tuple[np.ndarray, np.ndarray]:
    prediction, truth = _binary(prediction, "prediction"), _binary(truth, "truth")
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {list(prediction.shape)} and truth {list(truth.shape)} differ in shape")
    return prediction, truth


def _axes(array: np.ndarray, per_slice: bool) -> tuple[int, ...] | None:
    if not per_slice:
        return None
    if array.ndim < 2:
        raise ValueError(f"per-slice metrics need masks [N, ...], got shape {list(array.shape)}")
    return tuple(range(1, array.ndim))


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 1 where the denominator is 0 (both masks empty)."""
    numerator, denominator = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
    out = np.ones_like(denominator)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def dice(prediction: Any, truth: Any, *, per_slice: bool = False) -> float | np.ndarray:
    """2|P & G| / (|P| + |G|), pooled over every element, or per slice ([N] for masks [N, ...]); 1 if both empty."""
    prediction, truth = _pair(prediction, truth)
    axes = _axes(prediction, per_slice)
    overlap = np.logical_and(prediction, truth).sum(axis=axes)
    value = _ratio(2 * overlap, prediction.sum(axis=axes) + truth.sum(axis=axes))
    return value if per_slice else float(value)


def iou(prediction: Any, truth: Any, *, per_slice: bool = False) -> float | np.ndarray:
    """|P & G| / |P | G|, pooled over every element, or per slice; 1 if both empty."""
    prediction, truth = _pair(prediction, truth)
    axes = _axes(prediction, per_slice)
    value = _ratio(np.logical_and(prediction, truth).sum(axis=axes), np.logical_or(prediction, truth).sum(axis=axes))
    return value if per_slice else float(value)


def average_precision(scores: Any, truth: Any) -> float:
    """Average precision (area under the step precision-recall curve) of scores against binary truth.

    Any shapes (flattened together). NaN when truth has no positive element. See the module docstring.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    truth = _binary(truth, "truth").ravel()
    if scores.shape != truth.shape:
        raise ValueError(f"{scores.size} scores for {truth.size} truth values")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    positives = int(truth.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    ranked_scores, ranked_truth = scores[order], truth[order]
    true_positives = np.cumsum(ranked_truth)
    # the last position of each run of equal scores: one threshold per distinct value
    ends = np.flatnonzero(np.r_[ranked_scores[1:] != ranked_scores[:-1], True])
    tp = true_positives[ends].astype(np.float64)
    precision = tp / (ends + 1)
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def image_accuracy(predicted: Any, truth: Any) -> float:
    """Fraction of slices whose predicted healthy/unhealthy decision matches the image-level label."""
    predicted, truth = _pair(predicted, truth)
    if predicted.size == 0:
        return float("nan")
    return float((predicted == truth).mean())


def brain_pixels(images: Any, level: float = BRAIN_LEVEL) -> np.ndarray:
    """Brain (foreground) pixels of model slices [N, C, H, W] in [-1, 1]: bool [N, H, W], channel mean > level."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {list(images.shape)}")
    return images.mean(axis=1) > level


def setting_metrics(masks: Any, truth: Any, scores: Any, brain: Any) -> dict[str, float | int]:
    """Dice/IoU (per-slice mean and pooled) and AUPRC (pooled over brain pixels) of one set of slices [N, H, W]."""
    masks, truth = _pair(masks, truth)
    scores, brain = np.asarray(scores), _binary(brain, "brain")
    if scores.shape != truth.shape or brain.shape != truth.shape:
        raise ValueError(f"scores {list(scores.shape)} and brain {list(brain.shape)} must match the masks "
                         f"{list(truth.shape)}")
    n, nan = len(truth), float("nan")
    if n == 0:  # e.g. the unhealthy setting of a split without lesions: nothing to score
        return {"slices": 0, "lesion_pixels": 0, "dice": nan, "iou": nan, "dice_pooled": nan, "iou_pooled": nan,
                "auprc": nan}
    return {
        "slices": n,
        "lesion_pixels": int(truth.sum()),
        "dice": float(np.mean(dice(masks, truth, per_slice=True))),
        "iou": float(np.mean(iou(masks, truth, per_slice=True))),
        "dice_pooled": dice(masks, truth),
        "iou_pooled": iou(masks, truth),
        "auprc": average_precision(scores[brain], truth[brain]),
    }


def case_dice(masks: Any, truth: Any, cases: Sequence[str]) -> dict[str, float]:
    """Dice pooled over the slices of each case ({case: Dice}, in first-appearance order)."""
    masks, truth = _pair(masks, truth)
    cases = np.asarray(cases)
    if cases.shape != (len(masks),):
        raise ValueError(f"{len(cases)} case names for {len(masks)} slices")
    return {str(case): dice(masks[cases == case], truth[cases == case]) for case in dict.fromkeys(cases.tolist())}


def protocol_metrics(*, mixed_masks: Any, all_masks: Any, truth: Any, scores: Any, brain: Any,
                     decided_unhealthy: Any, labels: Any, cases: Sequence[str]) -> dict[str, Any]:
    """The paper's two settings plus image-level accuracy and per-case Dice, for one method on one set [N, H, W].

    mixed_masks: masks after the healthy/unhealthy decision; all_masks: every mask kept; decided_unhealthy [N]:
    the method's decision; labels [N]: image-level truth (1 = the slice holds a lesion). Per-case Dice uses the
    mixed masks (what a user receives); its summary averages the cases that hold a lesion on the model grid.
    """
    mixed_masks, truth = _pair(mixed_masks, truth)
    all_masks = _binary(all_masks, "all_masks")
    scores = np.asarray(scores, dtype=np.float64)
    brain = _binary(brain, "brain")
    lesion = truth.reshape(len(truth), -1).any(axis=1)
    mixed = setting_metrics(mixed_masks, truth, scores, brain)
    mixed["accuracy"] = image_accuracy(decided_unhealthy, labels)
    unhealthy = setting_metrics(all_masks[lesion], truth[lesion], scores[lesion], brain[lesion])
    per_case = case_dice(mixed_masks, truth, cases)
    names = np.asarray(cases)
    lesion_cases = [c for c in per_case if truth[names == c].any()]
    healthy_cases = [c for c in per_case if c not in lesion_cases]
    summary = {
        "dice_mean_lesion_cases": float(np.mean([per_case[c] for c in lesion_cases])) if lesion_cases else None,
        "lesion_cases": len(lesion_cases),
        # a case without lesion scores 1 exactly when nothing was predicted in it
        "healthy_cases_without_false_positives": sum(per_case[c] == 1.0 for c in healthy_cases),
        "healthy_cases": len(healthy_cases),
    }
    return {"mixed": mixed, "unhealthy": unhealthy, "cases": {"per_case_dice": per_case, **summary}}


# -- image similarity -----------------------------------------------------------------------------------------

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang, Simoncelli & Bovik 2003, finest scale first


def ms_ssim(a: np.ndarray, b: np.ndarray, *, data_range: float = 1.0, scales: int = 3) -> float:
    """Multi-scale SSIM of two 2-D images (Gaussian window sigma 1.5, K1 0.01, K2 0.03).

    The published five scales need images of at least 161 pixels; model slices (64 px) get the first ``scales``
    weights renormalised. Contrast-structure at every scale, luminance at the coarsest; 2x2 averaging between.
    """
    from scipy.ndimage import gaussian_filter

    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"ms_ssim needs two 2-D images of one shape, got {a.shape} and {b.shape}")
    weights = np.asarray(MS_SSIM_WEIGHTS[:scales]) / sum(MS_SSIM_WEIGHTS[:scales])
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    x, y = a.astype(np.float64), b.astype(np.float64)
    value = 1.0
    for scale, weight in enumerate(weights):
        def blur(v: np.ndarray) -> np.ndarray:
            return gaussian_filter(v, 1.5, truncate=3.5, mode="reflect")

        mx, my = blur(x), blur(y)
        vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
        contrast_structure = float(np.mean((2 * cov + c2) / (vx + vy + c2)))
        if scale == len(weights) - 1:
            luminance = float(np.mean((2 * mx * my + c1) / (mx * mx + my * my + c1)))
            return value * max(luminance * contrast_structure, 0.0) ** weight
        value *= max(contrast_structure, 0.0) ** weight
        height, width = (s - s % 2 for s in x.shape)
        x = x[:height, :width].reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))
        y = y[:height, :width].reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))
    return value
