"""Choosing ONLS's variance threshold zeta and guidance scale c on validation pairs.

The spec asks for "a sensible default found on validation data" for c. zeta is chosen the same way because the
paper's 1e-4 belongs to the paper's regressor: how low the batch variance of R(x_t, t) falls along a DDIM encoding
depends on the regressor (a small one trained on phantoms keeps reading slice structure in the latents up to L = 1,
so its variance never reaches 1e-4 and the rule would never fire). The paper's value is always among the candidates.

Every (zeta, c) runs ONLS on the validation subjects' baselines towards their follow-up ages, and the pair with the
largest mean PSNR against the real follow-up wins (the paper's Table 1/2 metric: the counterfactual should be the
follow-up the subject actually had). The ventricle-volume error, SSIM, the regressor's age error and how often the
rule fired are recorded beside it. The values go into the model's calibration section; `aging` and `evaluate
aging` use them unless --zeta or --guidance-scale is given.
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
from .pipeline import AgingSettings, resolve_model

DEFAULT_ZETAS = (PAPER_ZETA, 3e-4, 1e-3)
DEFAULT_SCALES = (0.0, 300.0, 1000.0, 3000.0)
DEFAULT_SUBJECTS = 6
RECORDED = ("psnr", "ssim", "ventricle_error_ml", "regressor_age_error", "L")


def calibrate_onls(model_path: str | os.PathLike[str], manifest: str | os.PathLike[str], *, split: str = "val",
                   zetas: Sequence[float] = DEFAULT_ZETAS, scales: Sequence[float] = DEFAULT_SCALES,
                   settings: AgingSettings | None = None,
                   max_subjects: int | None = DEFAULT_SUBJECTS) -> dict[str, Any]:
    """Choose zeta and c for the model in ``model_path`` and store them there; returns the record."""
    if not scales or any(c < 0 for c in scales):
        raise InputError(f"guidance scales must be >= 0, got {list(scales)}", fix="e.g. --scales 0,300,1000")
    if not zetas or any(z <= 0 for z in zetas):
        raise InputError(f"variance thresholds zeta must be > 0, got {list(zetas)}", fix="e.g. --zetas 1e-4,1e-3")
    scales, zetas = sorted({float(c) for c in scales}), sorted({float(z) for z in zetas})
    settings = settings or AgingSettings()
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
    best = max(candidates.values(), key=lambda m: m["psnr"])
    record = {"how": f"largest mean PSNR of the ONLS counterfactual against the real follow-up, "
                     f"{evaluation.info['subjects']} '{split}' subjects",
              "candidates": candidates,
              "identity": {k: evaluation.summary["identity"][k] for k in ("psnr", "ssim", "ventricle_error_ml")},
              "manifest": str(Path(manifest).resolve()), "steps": settings.steps, "guidance": settings.guidance,
              "fallback_noise_level": evaluation.info["fallback_noise_level"]["value"]}
    calibration = dict(read_bundle_config(bundle.path).get("calibration") or {})
    update_bundle_config(bundle.path, calibration={**calibration, "zeta": best["zeta"],
                                                   "guidance_scale": best["guidance_scale"], "onls_record": record})
    return {**record, "zeta": best["zeta"], "guidance_scale": best["guidance_scale"], "best": best}
