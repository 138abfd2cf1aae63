"""Choosing ONLS's variance threshold zeta and guidance scale c on validation pairs.

The spec asks for "a sensible default found on validation data" for c. zeta is chosen the same way because the
paper's 1e-4 belongs to the paper's regressor: how low the batch variance of R(x_t, t) falls along a DDIM encoding
depends on the regressor (one of our earlier regressors kept reading slice structure in the latents up to L = 1, so
its variance never reached 1e-4). The paper's value is always among the candidates.

Every (zeta, c) runs ONLS on the validation subjects' baselines towards their follow-up ages. The choice (see
``choose``): a counterfactual needs the intervention (c > 0) and must move the anatomy towards the real follow-up
(mean ventricle-volume error below the unchanged input's); among those, the largest mean PSNR against the follow-up
wins (the paper's Table 1/2 metric). PSNR alone would pick c = 0, i.e. no aging: with the "decoded" composition
the plain round trip, with "age-change" the input itself, because a follow-up a few years later differs from its
baseline by less than strong guidance changes it (c = 0 is therefore no default candidate). If no candidate moves
the ventricles closer, the smallest ventricle error wins. SSIM, the
regressor's age error and how often the rule fired are recorded beside each candidate. The values go into the
model's calibration section, with the composition they were chosen for (pipeline.py); `aging` and `evaluate
aging` use them unless --zeta, --guidance-scale or --composition is given.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..nets.bundle import read_bundle_config, update_bundle_config
from .evaluate import method_name, run_evaluation
from .onls import PAPER_ZETA
from .pipeline import DEFAULT_COMPOSITION, AgingSettings, resolve_model

DEFAULT_ZETAS = (PAPER_ZETA, 3e-4, 1e-3)
DEFAULT_SCALES = (30.0, 100.0, 300.0, 1000.0)
DEFAULT_SUBJECTS = 6
RECORDED = ("psnr", "ssim", "ventricle_error_ml", "regressor_age_error", "L")


RULE = ("c > 0 and mean ventricle-volume error below the unchanged input's, then the largest mean PSNR against the "
        "real follow-up (else the smallest ventricle error)")


def choose(candidates: dict[str, dict[str, float]], identity: dict[str, float]) -> dict[str, float]:
    """The calibrated candidate by RULE (module docstring)."""
    guided = [m for m in candidates.values() if m["guidance_scale"] > 0]
    closer = [m for m in guided if m["ventricle_error_ml"] < identity["ventricle_error_ml"]]
    if closer:
        return max(closer, key=lambda m: m["psnr"])
    return min(guided or candidates.values(), key=lambda m: m["ventricle_error_ml"])


def calibrate_onls(model_path: str | os.PathLike[str], manifest: str | os.PathLike[str], *, split: str = "val",
                   zetas: Sequence[float] = DEFAULT_ZETAS, scales: Sequence[float] = DEFAULT_SCALES,
                   settings: AgingSettings | None = None,
                   max_subjects: int | None = DEFAULT_SUBJECTS) -> dict[str, Any]:
    """Choose zeta and c for the model in ``model_path`` and store them there; returns the record."""
    if not scales or any(c < 0 for c in scales):
        raise InputError(f"guidance scales must be >= 0, got {list(scales)}", fix="e.g. --scales 0,300,1000")
    if not zetas or any(z <= 0 for z in zetas):
        raise InputError(f"variance thresholds zeta must be > 0, got {list(zetas)}", fix="e.g. --zetas 1e-4,1e-3")
    if max_subjects is not None and max_subjects < 1:
        raise InputError(f"the number of validation subjects must be at least 1, got {max_subjects}",
                         fix="e.g. --subjects 6 (0 = all)")
    scales, zetas = sorted({float(c) for c in scales}), sorted({float(z) for z in zetas})
    settings = settings or AgingSettings()
    # c is calibrated for one composition; a model's earlier record must not choose it
    settings = replace(settings, composition=settings.composition or DEFAULT_COMPOSITION)
    bundle = resolve_model(model_path, device=settings.device)
    candidates: dict[str, dict[str, float]] = {}
    for zeta in zetas:
        evaluation = run_evaluation(bundle, manifest, split=split, settings=replace(settings, zeta=zeta), levels=(),
                                    scales=scales, sweep=(), max_subjects=max_subjects)
        for c in scales:
            metrics = evaluation.summary[method_name(None, c, scales)]
            candidates[f"zeta={zeta:g}, c={c:g}"] = {"zeta": zeta, "guidance_scale": c,
                                                     **{k: metrics[k] for k in RECORDED},
                                                     "fired_fraction": evaluation.checks["onls_fired_fraction"]}
    identity = {k: evaluation.summary["identity"][k] for k in ("psnr", "ssim", "ventricle_error_ml")}
    best = choose(candidates, identity)
    record = {"how": f"{RULE}; {evaluation.info['subjects']} '{split}' subjects",
              "candidates": candidates, "identity": identity,
              "manifest": str(Path(manifest).resolve()), "steps": settings.steps, "guidance": settings.guidance,
              "composition": settings.composition,
              "fallback_noise_level": evaluation.info["fallback_noise_level"]["value"]}
    calibration = dict(read_bundle_config(bundle.path).get("calibration") or {})
    update_bundle_config(bundle.path, calibration={**calibration, "zeta": best["zeta"],
                                                   "guidance_scale": best["guidance_scale"],
                                                   "composition": settings.composition, "onls_record": record})
    return {**record, "zeta": best["zeta"], "guidance_scale": best["guidance_scale"],
            "composition": settings.composition, "best": best}
