"""AnoFPDM (Che et al., arXiv 2404.15683): the algorithmic core, free of file I/O. Spec: shared/specs/anofpdm.md.

Spec step -> function
- forward process for t = 1 .. t_max (0-based grid 0 .. t_max - 1, optional stride):
  DDIM inversion with the null label or q_sample ("ddim" | "ddpm"), one batched guided + null network call,
  eps_g, HGP x0_h, UGP x0_u (or the code's healthy w = 0 reference), M_t, S_t, MSE^h_t, MSE^u_t
                                                         -> forward.forward_statistics
- t_e = argmax_t M_t and H = mean of S_t up to t_e (running sums; last-SAM variant; fixed t_e ablation)
                                                         -> forward.forward_statistics (ForwardStatistics)
- Algorithm 1: quantile level from M_te / M_max           -> threshold.quantile_level, threshold.quantile_range
- Q* = quantile of H (per modality, averaged as the code) -> threshold.modality_thresholds
- 5x5 median filter                                      -> threshold.median_filter
- mask = H >= Q*, drop components of <= 40 pixels        -> threshold.segment, threshold.remove_small_components
- healthy/unhealthy: cos(MSE^h, MSE^u) <= thr_01          -> decision.cosine_similarity, decision.is_unhealthy
  (or this engine's M_te >= thr_01)                      -> decision.decision_values, decision.decide
  (or this engine's diffusion classifier: the "unhealthy" minus the "healthy" condition's denoising error)
                                                         -> classifier.unhealthy_evidence
- "mixed" setting: healthy slices get empty masks         -> decision.mixed_setting_masks
- thr_01 calibration (image-level labels)                 -> calibration.calibrate_thr_01
- M_max calibration                                       -> calibration.calibrate_m_max
- guidance strength selection (99% of best accuracy)      -> calibration.select_guidance,
                                                             calibration.classification_accuracy

Errors: settings a user can choose (w, t_max, stride, fixed t_e, threshold, quantile, labels, calibration data)
raise InputError with a fix; tensor-shape contracts between engine modules raise ValueError; a network that
returns the wrong shape or non-finite values raises ModelError.
"""

from __future__ import annotations

from .calibration import calibrate_m_max, calibrate_thr_01, classification_accuracy, select_guidance
from .decision import DECISION_SCORES, cosine_similarity, decide, decision_values, is_unhealthy, mixed_setting_masks
from .forward import NULL_LABEL, ForwardStatistics, forward_statistics
from .threshold import (
    Segmentation,
    median_filter,
    modality_thresholds,
    quantile_level,
    quantile_range,
    remove_small_components,
    segment,
)

__all__ = [
    "DECISION_SCORES",
    "NULL_LABEL",
    "ForwardStatistics",
    "Segmentation",
    "calibrate_m_max",
    "calibrate_thr_01",
    "classification_accuracy",
    "cosine_similarity",
    "decide",
    "decision_values",
    "forward_statistics",
    "is_unhealthy",
    "median_filter",
    "mixed_setting_masks",
    "modality_thresholds",
    "quantile_level",
    "quantile_range",
    "remove_small_components",
    "segment",
    "select_guidance",
]
