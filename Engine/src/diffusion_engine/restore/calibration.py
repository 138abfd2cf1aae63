"""Calibrating where a conditional or CVDM model's sampling chain starts, on validation slices.

The papers sample from pure noise (start 1). A model trained briefly (on a CPU) predicts x0 poorly at the highest
noise levels, so its chain from pure noise can wander off; starting at t = start from the degraded image diffused
to that level (Chung et al., "come closer, diffuse faster") skips those steps. Which start is best depends on the
model and the task, so it is measured: every candidate restores the same degraded validation slices and the best
mean PSNR inside the head wins. The value and its record go into the model's calibration section; the
evaluation reports the papers' start 1 beside it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..nets.bundle import read_bundle_config, update_bundle_config
from ..progress import Progress
from .evaluate import HEAD_LEVEL, EvaluationSettings, degradations, held_out_slices, image_scores
from .model import load_restore_model

DEFAULT_STARTS = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


def calibrate_start(model_path: str | os.PathLike[str], manifest: str | os.PathLike[str], *, split: str = "val",
                    starts: Sequence[float] = DEFAULT_STARTS, slices: int = 16, steps: int = 50,
                    cvdm_steps: int = 100, seed: int = 0) -> dict[str, Any]:
    """Choose the sampling start of the model in ``model_path`` and store it there; returns the record."""
    from .pipeline import RestoreSettings, sample_restorations

    model = load_restore_model(model_path)
    if model.enters_at_matched_step:
        raise InputError(f"a {model.method} denoiser enters the chain at the noise-matched step; there is no start "
                         "to calibrate", path=model.path, fix="calibrate a CVDM, imputation or super-resolution model")
    if not starts or not all(0 < s <= 1 for s in starts):
        raise InputError(f"sampling starts must lie in (0, 1], got {list(starts)}", fix="e.g. --starts 0.1,0.2,1")
    clean = held_out_slices(manifest, split, model, slices)
    truth = clean[:, 0].numpy()
    head = truth > HEAD_LEVEL
    cases = degradations(model.task, clean, EvaluationSettings(seed=seed), model.info.get("factors") or [2, 4])
    base = RestoreSettings(samples=1, steps=steps, cvdm_steps=cvdm_steps, seed=seed)
    scores: dict[str, float] = {}
    with Progress(len(starts) * len(cases) * len(clean), "calibrating the sampling start", unit="slice") as bar:
        for start in starts:
            psnr = []
            for case in cases:
                restored, _, _ = sample_restorations(model, case.condition, replace(base, start=float(start)), bar)
                if case.known is not None:
                    restored = torch.where(case.known.bool(), case.image, restored)
                psnr.append(image_scores(truth, restored[:, 0].numpy(), head)["psnr"])
            scores[f"{start:g}"] = sum(psnr) / len(psnr)
    best = max(scores, key=scores.get)
    record = {"value": float(best), "how": f"best mean PSNR (head voxels) over the degradations of the task on "
                                          f"{len(clean)} '{split}' slices, one sample each",
              "psnr_by_start": scores, "manifest": str(Path(manifest).resolve()), "steps": steps,
              "cvdm_steps": cvdm_steps}
    calibration = dict(read_bundle_config(model.path).get("calibration") or {})
    update_bundle_config(model.path, calibration={**calibration, "sampling_start": record})
    return record
