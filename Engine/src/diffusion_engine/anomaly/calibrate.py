"""Calibrating an anomaly model on validation slices with image-level labels only (paper sec. 4.2 and Algorithm 1).

For every candidate guidance strength w, one forward pass over the manifest's 'val' slices gives each slice's
decision values: the paper's cosine cos(MSE^h, MSE^u) and the peak divergence M_te (decision.py). For each of these
scores, thr_01 is calibrated per w and its accuracy recorded, and the paper's rule picks w: the largest whose
accuracy is within 99% of the best (calibration.select_guidance). The w of the more accurate of the two (the
cosine on ties, or the one forced with ``decision``) is the model's w, and M_max (the largest M_te over the
unhealthy slices) is that w's. The diffusion classifier (classifier.py) does not depend on w: one pass gives its
evidence and its own thr_01. ``decision="auto"`` (the default) keeps the most accurate of the three decisions on
the validation slices (the paper's cosine on ties); any one can be forced. Lesion masks, when
the manifest has them, only label each slice (any lesion voxel = unhealthy), exactly as in training. The values and
a record of how they were obtained go into the model's model.json ``calibration`` section, together with the
forward settings they hold for (t_max, stride, encoding, early stop).

The default grid covers both published choices (BraTS w = 2, ATLAS w = 30; the paper gives no grid). With DDIM
encoding all candidates share one network pass (pipeline.GuidanceSweep), so the grid costs about one pass.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import InputError
from .decision import DECISION_SCORES, FORWARD_SCORES, cosine_similarity, decision_values
from .pipeline import (
    CALIBRATION_METHOD,
    CALIBRATION_VERSION,
    AnomalySettings,
    class_evidence,
    model_spec,
    resolve_model,
    run_forward,
)

DEFAULT_W_GRID = (0.0, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0)
DECISIONS = ("auto", *DECISION_SCORES)
SPLIT = "val"


def _validation_slices(manifest: str | os.PathLike[str], spec, task: str):
    from ..datasets import load_slices
    from ..manifest import read_manifest
    from ..volume import Normalisation

    table = read_manifest(manifest, modalities=spec.modalities)
    rows = table.split(SPLIT)
    if not rows:
        raise InputError(f"no rows with split '{SPLIT}'", path=table.path,
                         fix="mark some cases (healthy subjects and subjects with lesions) with split=val; they "
                             "must not be used for training")
    unlabelled = [row.case for row in rows if row.mask is None and row.healthy is None]
    if unlabelled:
        raise InputError(f"validation case(s) {', '.join(unlabelled)} have neither a lesion mask nor a healthy "
                         "flag, so their slices cannot be labelled", path=table.path,
                         fix="fill the 'healthy' column (1 = no lesion) or give a 'mask' for every val row")
    data = load_slices(rows, spec.modalities, spec.image_size, Normalisation.from_dict(spec.normalisation),
                       labels=True, task=task)
    return table, rows, data


def _check_grid(w_grid: Sequence[float]) -> list[float]:
    values = sorted({float(w) for w in w_grid})
    if not values or any(not np.isfinite(w) or w < 0 for w in values):
        raise InputError(f"the guidance grid {list(w_grid)} must hold one or more finite values >= 0",
                         fix="e.g. --w-grid 0,1,2,3,5")
    return values


def _calibrate_score(score: str, runs: list, grid: list[float], labels: np.ndarray) -> dict:
    """thr_01 per w and the paper's choice of w for one decision score."""
    from .calibration import calibrate_thr_01, select_guidance

    per_w, thresholds = [], {}
    for w, run in zip(grid, runs, strict=True):
        values = decision_values(score, cosine_similarity(run.mse_healthy, run.mse_reference), run.peak_divergence)
        thresholds[w] = calibrate_thr_01(values, labels, score)
        per_w.append({"w": w, "thr_01": thresholds[w][0], "accuracy": thresholds[w][1]["accuracy"],
                      "misclassified": thresholds[w][1]["misclassified"]})
    w, guidance = select_guidance({entry["w"]: entry["accuracy"] for entry in per_w})
    return {"score": score, "w": w, "thr_01": thresholds[w], "guidance": guidance, "per_w": per_w}


def _most_accurate(by_score: dict[str, dict]) -> str:
    """The score whose decision is the most accurate on validation; earlier in DECISION_SCORES on ties."""
    return max(by_score, key=lambda score: (by_score[score]["thr_01"][1]["accuracy"],
                                            -DECISION_SCORES.index(score)))


def _calibrate_classifier(evidence: np.ndarray, labels: np.ndarray, guidance: dict) -> dict:
    """thr_01 of the diffusion classifier; it takes w (and its record) from the forward score that chose it."""
    from .calibration import calibrate_thr_01

    score = "diffusion-classifier"
    return {"score": score, "w": guidance["w"], "thr_01": calibrate_thr_01(evidence, labels, score),
            "guidance": {**guidance["guidance"], "score": guidance["score"]}, "per_w": guidance["per_w"]}


def _choose_decision(by_score: dict[str, dict], decision: str) -> tuple[dict, dict]:
    """The decision score to keep, and a record of why: the most accurate on validation (each forward score at its
    own chosen w), or the one the user forced."""
    accuracy = {score: result["thr_01"][1]["accuracy"] for score, result in by_score.items()}
    if decision != "auto":
        chosen, method = decision, "given"
    else:
        chosen = _most_accurate(by_score)
        method = ("auto: the decision that classifies the validation slices most accurately (the paper's cosine on "
                  "ties), the forward-pass scores each at their own chosen w")
    return by_score[chosen], {"score": chosen, "method": method, "accuracy_at_chosen_w": accuracy}


def calibrate_model(model_path: str | os.PathLike[str], manifest: str | os.PathLike[str], *,
                    w_grid: Sequence[float] = DEFAULT_W_GRID, settings: AnomalySettings | None = None,
                    decision: str = "auto") -> dict:
    """Calibrate the decision score, w, thr_01 and M_max of the model at ``model_path`` on the manifest's val split;
    write them into its model.json and return the calibration section.

    ``decision``: "auto" (the most accurate on validation, the paper's cosine on ties), "cosine", "peak-divergence"
    or "diffusion-classifier".

    ``settings`` supplies the forward settings the values are calibrated for (t_max, stride, encoding, early_stop)
    and how to run (chunk_size, device, seed); its thresholds and overrides are not used.
    """
    from ..nets.bundle import update_bundle_config
    from .calibration import calibrate_m_max

    started = time.perf_counter()
    if decision not in DECISIONS:
        raise InputError(f"unknown decision {decision!r}", fix=f"use one of {', '.join(DECISIONS)}")
    settings = replace(settings or AnomalySettings(), w=None, thr_01=None, m_max=None, noise_scale=None,
                       threshold=None, quantile=None, decision_score=None).validate()
    grid = _check_grid(w_grid)
    bundle = resolve_model(Path(model_path), device=settings.device)
    spec = model_spec(bundle)
    table, rows, data = _validation_slices(manifest, spec, "reading validation cases")
    labels = data.unhealthy
    if labels.min() == labels.max():
        kind = "unhealthy" if labels.min() else "healthy"
        raise InputError(f"all {len(labels)} validation slices are {kind}", path=table.path,
                         fix="put both healthy subjects and subjects with lesions in the val split")
    runs = run_forward(bundle, data.images, settings, w=grid, task="calibrating")
    by_score = {score: _calibrate_score(score, runs, grid, labels) for score in FORWARD_SCORES}
    guidance = by_score[decision if decision in FORWARD_SCORES else _most_accurate(by_score)]
    classifier_evaluations = 0
    # a model without an "unhealthy" class cannot run the classifier; it is an error only when that is asked for
    if spec.unhealthy_label is not None or decision == "diffusion-classifier":
        evidence, classifier_evaluations = class_evidence(bundle, data.images, settings,
                                                          task="calibrating: classifier")
        by_score["diffusion-classifier"] = _calibrate_classifier(evidence, labels, guidance)
    kept, decision_record = _choose_decision(by_score, decision)
    w, (thr_01, thr_record) = kept["w"], kept["thr_01"]
    m_max, m_max_record = calibrate_m_max(runs[grid.index(w)].peak_divergence, labels)
    t_max = settings.resolved_t_max(bundle.schedule().num_timesteps)
    calibration = {
        "method": CALIBRATION_METHOD,
        "version": CALIBRATION_VERSION,
        "decision_score": kept["score"],
        "w": w,
        "thr_01": thr_01,
        "m_max": m_max,
        "settings": {"t_max": t_max, "stride": settings.stride, "encoding": settings.encoding,
                     "early_stop": settings.early_stop, "seed": settings.seed},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "record": {
            "engine_version": __version__,
            "manifest": str(Path(manifest).resolve()),
            "split": SPLIT,
            "cases": [row.case for row in rows],
            "slices": len(labels),
            "unhealthy_slices": int(labels.sum()),
            "healthy_slices": int(len(labels) - labels.sum()),
            "labels": "image-level: a slice is unhealthy if its subject is not healthy and (with a mask) it holds "
                      "a lesion voxel; pixel masks are used for nothing else",
            "w_grid": grid,
            "decision": decision_record,
            "per_w": kept["per_w"],
            "guidance": kept["guidance"],
            "other_scores": [{key: result[key] for key in ("score", "w", "per_w")} for score, result in
                             by_score.items() if score != kept["score"]],
            "thr_01": thr_record,
            "m_max": m_max_record,
            "network_evaluations": int(sum(run.network_evaluations for run in runs)) + classifier_evaluations,
            "seconds": round(time.perf_counter() - started, 1),
        },
    }
    # keep what other calibrations stored in the section (e.g. a baseline's values); replace AnoFPDM's own
    update_bundle_config(bundle.path, calibration={**(bundle.config["calibration"] or {}), **calibration})
    return calibration
