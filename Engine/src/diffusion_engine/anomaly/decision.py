"""Healthy/unhealthy decision per slice: one slice score against a threshold thr_01.

- "cosine" (the paper, sec. 4.2, eq. 18): cos = <MSE^h, MSE^u> / (||MSE^h|| ||MSE^u||) between the sequences over t
  of the guided and the reference prediction errors; unhealthy when cos <= thr_01 (ties count as unhealthy). With
  several modalities the curves are first averaged over modalities, as the code does (its MSE is taken over all
  used channels). Degenerate sequences: two all-zero sequences are identical (cos = 1, no evidence of a lesion);
  one all-zero sequence against a non-zero one is orthogonal to it (cos = 0).
- "peak-divergence" (this engine's alternative): M_te = max_t M_t, the peak divergence between the healthy-guided
  and the reference prediction that Algorithm 1 already uses, averaged over modalities; unhealthy when
  M_te >= thr_01. It ranks slices by how much the healthy condition changes the prediction, which is what the
  guidance does to a lesion; where the cosine decision sits at the all-healthy rate (small models, few lesion
  slices) it still separates slices.
- "diffusion-classifier" (this engine's alternative, classifier.py): how much better the model's "unhealthy" than
  its "healthy" condition denoises the slice, an estimate of the log-odds that the slice is unhealthy; unhealthy
  when it is >= thr_01. It needs its own network pass (12 evaluations per slice) and does not depend on w.
`calibrate anomaly` picks among the three on validation accuracy.
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError
from ._checks import check_finite, check_real

DECISION_SCORES = ("cosine", "peak-divergence", "diffusion-classifier")
FORWARD_SCORES = DECISION_SCORES[:2]  # read from the forward pass, so they depend on w
RULES = {"cosine": "unhealthy when cos(MSE^h, MSE^u) <= thr_01",
         "peak-divergence": "unhealthy when M_te (max_t M_t, mean over modalities) >= thr_01",
         "diffusion-classifier": "unhealthy when the mean denoising error under the healthy label minus that under "
                                 "the unhealthy label (classifier.unhealthy_evidence) >= thr_01"}


def cosine_similarity(mse_healthy: torch.Tensor, mse_reference: torch.Tensor) -> torch.Tensor:
    """Cosine between MSE^h and MSE^u per slice: [B, n] or [B, M, n] curves -> [B] float64."""
    if not (isinstance(mse_healthy, torch.Tensor) and isinstance(mse_reference, torch.Tensor)):
        raise ValueError("the MSE curves must be tensors")
    if mse_healthy.shape != mse_reference.shape or mse_healthy.ndim not in (2, 3) or mse_healthy.shape[-1] == 0:
        raise ValueError(f"MSE curves must both be [B, n] or [B, M, n] with n >= 1, got {list(mse_healthy.shape)} "
                         f"and {list(mse_reference.shape)}")
    a, b = mse_healthy.double(), mse_reference.double()
    if a.ndim == 3:
        a, b = a.mean(dim=1), b.mean(dim=1)
    check_finite("MSE curves", a)
    check_finite("MSE curves", b)
    norm_a, norm_b = a.norm(dim=-1), b.norm(dim=-1)
    both_zero = (norm_a == 0) & (norm_b == 0)
    cosine = (a * b).sum(dim=-1) / (norm_a * norm_b).clamp(min=torch.finfo(torch.float64).tiny)
    return torch.where(both_zero, torch.ones_like(cosine), cosine)


def check_score(score: str) -> str:
    if score not in DECISION_SCORES:
        raise InputError(f"unknown decision score {score!r}", fix=f"use one of {', '.join(DECISION_SCORES)}")
    return score


def decision_values(score: str, cosine: torch.Tensor, peak_divergence: torch.Tensor,
                    evidence: torch.Tensor | None = None) -> torch.Tensor:
    """The [B] float64 values thr_01 applies to: the cosines [B], M_te [B] / [B, M] averaged over modalities, or
    the diffusion classifier's evidence [B]."""
    if check_score(score) == "cosine":
        return torch.as_tensor(cosine, dtype=torch.float64)
    if score == "diffusion-classifier":
        if evidence is None:
            raise ValueError("the diffusion-classifier decision needs the classifier's evidence")
        return torch.as_tensor(evidence, dtype=torch.float64)
    m_te = torch.as_tensor(peak_divergence, dtype=torch.float64)
    return m_te.mean(dim=1) if m_te.ndim == 2 else m_te


def check_threshold(score: str, thr_01: object) -> float:
    """thr_01 in the range of ``score``'s values: a cosine in [-1, 1], an M_te >= 0, any evidence."""
    if check_score(score) == "cosine":
        return check_real("thr_01 (a cosine)", thr_01, low=-1.0, high=1.0)
    if score == "diffusion-classifier":
        return check_real("thr_01 (a denoising-error difference)", thr_01, low=-math.inf)
    return check_real("thr_01 (a peak divergence M_te)", thr_01, low=0.0)


def is_unhealthy(values: torch.Tensor, thr_01: float, score: str = "cosine") -> torch.Tensor:
    """The decision rule of ``score`` ([B] bool): cos <= thr_01, else value >= thr_01."""
    thr_01 = check_threshold(score, thr_01)
    values = check_finite("decision values", torch.as_tensor(values, dtype=torch.float64))
    return values <= thr_01 if score == "cosine" else values >= thr_01


def decide(score: str, thr_01: float, cosine: torch.Tensor, peak_divergence: torch.Tensor,
           evidence: torch.Tensor | None = None) -> torch.Tensor:
    """Unhealthy slices ([B] bool) under the decision ``score``, from a forward pass's cosines and M_te, and the
    diffusion classifier's evidence where that is the score."""
    return is_unhealthy(decision_values(score, cosine, peak_divergence, evidence), thr_01, score)


def mixed_setting_masks(masks: torch.Tensor, unhealthy: torch.Tensor) -> torch.Tensor:
    """The "mixed" setting: slices classified healthy get an empty mask (masks [B, H, W] bool, unhealthy [B])."""
    if masks.ndim < 2 or unhealthy.shape != masks.shape[:1]:
        raise ValueError(f"unhealthy must have one entry per mask, got {list(unhealthy.shape)} for "
                         f"{list(masks.shape)}")
    keep = unhealthy.to(device=masks.device, dtype=torch.bool).reshape(-1, *([1] * (masks.ndim - 1)))
    return masks & keep
