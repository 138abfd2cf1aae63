"""Calibration of AnoFPDM's hyperparameters from validation slices with image-level labels only
(0 = healthy, 1 = unhealthy; pixel-level masks are never used). Every function returns its value together with
a JSON-able record of how it was obtained, for the model bundle and the report.

- thr_01 (code): candidates are the quantiles 0.005 .. 0.095 (100 evenly spaced) of the healthy slices' cosines;
  the candidate with the fewest misclassifications under the decision rule (unhealthy when cos <= thr_01) wins,
  the lowest quantile on ties (the code keeps the first strict minimum). The code counts a healthy slice as wrong
  when cos < thr_01; here the count follows the rule actually applied (cos <= thr_01). For the scores that call a
  slice unhealthy when they are high (peak divergence, diffusion classifier) the mirror image: quantiles
  0.995 .. 0.905 of the healthy values, so that every rule calls at most about 9.5% of healthy validation slices
  unhealthy; ties go to the fewest false alarms.
- M_max (paper, Algorithm 1): the largest M_te over the unhealthy validation slices, per modality.
- Guidance strength (paper sec. 4.2): from the validation accuracy of the decision rule at each candidate w
  (each with its own calibrated thr_01), the largest w whose accuracy is at least 99% of the best accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..errors import InputError
from ._checks import check_finite, check_labels, check_real
from .decision import RULES, check_score, is_unhealthy

THR01_QUANTILE_LOW = 0.005
THR01_QUANTILE_HIGH = 0.095
THR01_CANDIDATES = 100
GUIDANCE_TOLERANCE = 0.99
_RELATIVE_SLACK = 1e-12  # "within 99%" must not hinge on the last bit of 0.99 * best


def _values_and_labels(values: torch.Tensor | Sequence[float], labels: torch.Tensor | Sequence[int]):
    values = torch.as_tensor(values, dtype=torch.float64).cpu()
    if values.ndim != 1:
        raise ValueError(f"decision values must be 1-D (one per validation slice), got shape {list(values.shape)}")
    check_finite("decision values", values)
    labels = check_labels(torch.as_tensor(labels).cpu(), values.shape[0])
    healthy, unhealthy = values[labels == 0], values[labels == 1]
    if healthy.numel() == 0 or unhealthy.numel() == 0:
        raise InputError(f"thr_01 needs healthy and unhealthy validation slices, got {healthy.numel()} healthy and "
                         f"{unhealthy.numel()} unhealthy", fix="add validation slices of both kinds")
    return values, labels, healthy, unhealthy


def classification_accuracy(values: torch.Tensor | Sequence[float], labels: torch.Tensor | Sequence[int],
                            thr_01: float, score: str = "cosine") -> float:
    """Fraction of slices whose decision (``score``'s rule with thr_01) matches the image-level label."""
    values, labels, _, _ = _values_and_labels(values, labels)
    return float((is_unhealthy(values, thr_01, score) == labels.bool()).double().mean())


def calibrate_thr_01(values: torch.Tensor | Sequence[float], labels: torch.Tensor | Sequence[int],
                     score: str = "cosine") -> tuple[float, dict]:
    """thr_01 from the validation slices' decision values (one per slice: cosines, M_te or the diffusion
    classifier's evidence) and image-level labels."""
    values, labels, healthy, unhealthy = _values_and_labels(values, labels)
    levels = torch.linspace(THR01_QUANTILE_LOW, THR01_QUANTILE_HIGH, THR01_CANDIDATES, dtype=torch.float64)
    if check_score(score) == "cosine":  # unhealthy when value <= candidate
        candidates = torch.quantile(healthy, levels)
        missed = (unhealthy[None, :] > candidates[:, None]).sum(dim=1)
        false_alarms = (healthy[None, :] <= candidates[:, None]).sum(dim=1)
    else:  # unhealthy when value >= candidate; the mirrored quantiles
        levels = 1.0 - levels
        candidates = torch.quantile(healthy, levels)
        missed = (unhealthy[None, :] < candidates[:, None]).sum(dim=1)
        false_alarms = (healthy[None, :] >= candidates[:, None]).sum(dim=1)
    errors = missed + false_alarms
    best = int(torch.argmin(errors))  # first minimum: the fewest false alarms on ties
    value = float(candidates[best])
    record = {
        "parameter": "thr_01",
        "score": score,
        "rule": RULES[score],
        "method": f"quantiles {float(levels[0]):g}..{float(levels[-1]):g} ({THR01_CANDIDATES} candidates) of the "
                  "healthy slices' values; fewest misclassified validation slices, fewest false alarms on ties",
        "value": value,
        "quantile": float(levels[best]),
        "misclassified": int(errors[best]),
        "accuracy": 1.0 - int(errors[best]) / values.shape[0],
        "n_healthy": int(healthy.numel()),
        "n_unhealthy": int(unhealthy.numel()),
        "errors_per_candidate": [int(e) for e in errors],
    }
    return value, record


def calibrate_m_max(peak_divergence: torch.Tensor | Sequence[float],
                    labels: torch.Tensor | Sequence[int]) -> tuple[list[float], dict]:
    """M_max = the largest M_te over unhealthy validation slices; peak_divergence [N] or [N, M] -> one per modality."""
    m_te = torch.as_tensor(peak_divergence, dtype=torch.float64).cpu()
    if m_te.ndim == 1:
        m_te = m_te[:, None]
    if m_te.ndim != 2 or m_te.shape[0] == 0:
        raise ValueError(f"M_te must be [N] or [N, modalities] with N >= 1, got shape {list(m_te.shape)}")
    check_finite("M_te values", m_te)
    labels = check_labels(torch.as_tensor(labels).cpu(), m_te.shape[0])
    unhealthy = m_te[labels == 1]
    if unhealthy.shape[0] == 0:
        raise InputError("M_max needs unhealthy validation slices, got none", fix="add validation slices with lesions")
    values, rows = unhealthy.max(dim=0)
    if not bool((values > 0).all()):
        raise InputError(f"M_max must be positive, got {values.tolist()}: the guided and reference predictions never "
                         "differ on the unhealthy slices", fix="use a guidance strength w > 0 or a trained model")
    record = {
        "parameter": "M_max",
        "method": "largest M_te = max_t M_t over the unhealthy validation slices, per modality",
        "value": [float(v) for v in values],
        "n_unhealthy": int(unhealthy.shape[0]),
        "slice_index": [int(i) for i in torch.nonzero(labels == 1).flatten()[rows]],
    }
    return record["value"], record


def select_guidance(accuracy_by_w: Mapping[float, float], *,
                    tolerance: float = GUIDANCE_TOLERANCE) -> tuple[float, dict]:
    """The largest guidance strength w whose validation accuracy is within `tolerance` (99%) of the best one."""
    tolerance = check_real("tolerance", tolerance, low=0.0, high=1.0, open_low=True)
    if not accuracy_by_w:
        raise InputError("no guidance strengths to choose from", fix="evaluate at least one w on validation slices")
    table = {}
    for w, accuracy in accuracy_by_w.items():
        w = check_real("guidance strength w", w, low=0.0)
        if w in table:
            raise InputError(f"guidance strength {w:g} appears twice", fix="give each w one accuracy")
        table[w] = check_real(f"accuracy at w = {w:g}", accuracy, low=0.0, high=1.0)
    best = max(table.values())
    floor = tolerance * best * (1.0 - _RELATIVE_SLACK)
    chosen = max(w for w, accuracy in table.items() if accuracy >= floor)
    record = {
        "parameter": "w",
        "method": f"largest w whose decision accuracy on validation is >= {tolerance:g} x the best accuracy",
        "value": chosen,
        "best_accuracy": best,
        "best_w": min(w for w, accuracy in table.items() if accuracy == best),
        "accuracy_by_w": [[w, table[w]] for w in sorted(table)],
    }
    return chosen, record
