"""The bundled ONLS demo model on the bundled demo case: a phantom subject from a cohort seed the model never saw,
scanned at 65.8 and again at 76.1 years. Accuracy checks on held-out data, measured on the written volumes."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from diffusion_engine.aging.evaluate import ventricle_roi, ventricle_threshold, ventricle_volume
from diffusion_engine.aging.pipeline import DEMO_MODEL, AgingSettings, age_counterfactual
from diffusion_engine.demo import DEMO_DATA, demo_case, demo_description

pytestmark = pytest.mark.skipif(not (DEMO_MODEL / "model.json").is_file(), reason="no bundled aging demo model")

CASE = DEMO_DATA / "aging"


def _array(path: object) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path), sitk.sitkFloat32))


@pytest.fixture(scope="module")
def sweep() -> dict:
    """The demo case at 10 years younger, at its real follow-up age and 20 years older, in one run."""
    description = demo_description("aging")
    age, follow_up = description["age"], description["follow_up"]["age"]
    targets = [age - 10.0, follow_up, age + 20.0]
    result = age_counterfactual("demo", demo_case("aging"), age, targets, AgingSettings(device="cpu"))
    return {"result": result, "targets": targets, "input": _array(demo_case("aging")["t1"]),
            "follow_up": _array(CASE / description["follow_up"]["images"]["t1"]),
            "mask": _array(CASE / description["mask"]) > 0}


def test_ventricles_grow_with_the_target_age_towards_the_real_follow_up(sweep: dict) -> None:
    """Ventricle voxels: darker than midway between CSF and the tissue around them, near the input's ventricles (the
    evaluation's measurement). The counterfactual at the follow-up age must come closer to the real follow-up's
    ventricles than the unchanged input. (Its voxel-wise error against the follow-up is larger than the input's:
    see Engine/evaluations/aging/README.md.)"""
    roi = ventricle_roi(sweep["mask"])
    threshold = ventricle_threshold(sweep["input"], sweep["mask"], roi)
    baseline, real = (ventricle_volume(sweep[name], roi, threshold, 1.0) for name in ("input", "follow_up"))
    younger, follow_up, older = (ventricle_volume(sitk.GetArrayFromImage(image), roi, threshold, 1.0)
                                 for image in sweep["result"].images)
    assert younger < baseline < follow_up < older
    assert abs(follow_up - real) < abs(baseline - real)


def test_report_shows_the_chosen_noise_level_and_ages(sweep: dict) -> None:
    report = sweep["result"].report
    assert report["noise_level"]["mode"] == "onls" and 0.0 < report["noise_level"]["L"] < 1.0
    after = report["regressor_age"]["after"]
    assert after[0] < after[1] < after[2]  # the regressor reads the intended order of ages
