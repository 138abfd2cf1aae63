"""The bundled demo data and model: present, consistent, and what `--input demo` / `--model demo` resolve to."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from diffusion_engine import cli
from diffusion_engine.demo import demo_case, demo_description, ground_truth
from diffusion_engine.errors import InputError


def test_anomaly_demo_case_is_complete_and_on_one_grid() -> None:
    images = demo_case("anomaly", ("flair", "t2"))
    assert list(images) == ["flair", "t2"]
    flair, t2 = (sitk.ReadImage(str(p)) for p in images.values())
    for attribute in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(flair, attribute)() == getattr(t2, attribute)()
    mask = sitk.ReadImage(str(ground_truth("anomaly")))
    assert mask.GetSize() == flair.GetSize()
    lesion_ml = np.count_nonzero(sitk.GetArrayViewFromImage(mask)) * np.prod(mask.GetSpacing()) / 1000
    assert lesion_ml == pytest.approx(demo_description("anomaly")["lesion_volume_ml"], rel=1e-3)
    brain = sitk.GetArrayViewFromImage(flair)
    assert brain.max() > 0 and np.count_nonzero(brain) > 0.2 * brain.size


def test_unknown_demo_kind_or_modality_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="no bundled nonexistent demo case"):
        demo_case("nonexistent")
    with pytest.raises(InputError, match="has no pd image"):
        demo_case("anomaly", ("flair", "pd"))


def test_cli_input_demo_segments_the_bundled_case(anomaly_model: Path, tmp_path: Path) -> None:
    label, report, figure = tmp_path / "label.nii.gz", tmp_path / "report.json", tmp_path / "figure.png"
    code = cli.main(["--progress", "none", "anomaly", "--model", str(anomaly_model), "--input", "demo",
                     "--output-label", str(label), "--report", str(report), "--figure", str(figure),
                     "--w", "2", "--thr-01", "0.9",
                     "--m-max", "1", "--fast", "--device", "cpu"])
    assert code == 0
    reference = sitk.ReadImage(str(demo_case("anomaly")["flair"]))
    written = sitk.ReadImage(str(label))
    assert written.GetSize() == reference.GetSize() and written.GetDirection() == reference.GetDirection()
    np.testing.assert_allclose(written.GetOrigin(), reference.GetOrigin())
    inputs = json.loads(report.read_text())["inputs"]
    assert [Path(p).name for p in inputs.values()] == ["demo_flair.nii.gz", "demo_t2.nii.gz"]
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bundled_demo_model_is_small_calibrated_and_records_how_it_was_made() -> None:
    from diffusion_engine.anomaly.pipeline import DEMO_MODEL, resolve_model

    size = sum(p.stat().st_size for p in DEMO_MODEL.iterdir())
    assert size < 5_000_000, "the demo model must stay small enough for git"
    bundle = resolve_model("demo", device="cpu")
    calibration = bundle.config["calibration"]
    assert {"w", "thr_01", "m_max"} <= set(calibration)
    assert "diffusion-engine train anomaly" in bundle.config["training"]["command"]


def test_bundled_demo_model_finds_the_demo_lesion() -> None:
    """The shipped model on the shipped case (never seen in training or calibration), on a subset of slices for
    speed: the slices with the most lesion and as many lesion-free brain slices."""
    import torch

    from diffusion_engine.anomaly.pipeline import AnomalySettings, model_spec, resolve_model, segment_slices
    from diffusion_engine.metrics import dice
    from diffusion_engine.volume import Normalisation, read_case, read_image, to_model_grid, to_model_slices

    torch.manual_seed(0)
    bundle = resolve_model("demo", device="cpu")
    spec = model_spec(bundle)
    case = read_case(demo_case("anomaly", spec.modalities), spec.modalities)
    slices, geometry = to_model_slices(case, spec.image_size, normalisation=Normalisation.from_dict(spec.normalisation))
    truth = to_model_grid(read_image(ground_truth("anomaly"), label_map=True), geometry, interpolation="nearest") > 0
    area = truth.reshape(len(truth), -1).sum(axis=1)
    lesion = np.argsort(area)[::-1][:8]
    healthy = np.flatnonzero(area == 0)[np.linspace(10, np.count_nonzero(area == 0) - 10, 8).astype(int)]
    rows = np.r_[lesion, healthy]
    # the calibrated slice decision (the diffusion classifier) on: it must keep the lesion slices' masks and tell
    # the lesion slices from the lesion-free ones (calling all slices one thing scores 0.5 here)
    results = segment_slices(bundle, slices[rows], AnomalySettings(device="cpu"))
    assert results.values["decision_score"]["value"] == "diffusion-classifier"
    assert dice(results.mask[:8] > 0, truth[lesion]) >= 0.5
    assert np.mean(results.unhealthy == (np.arange(16) < 8)) >= 0.75
    brain = slices[rows, 0] > -1
    lesion_scores, other_scores = results.score[:8][truth[lesion]], results.score[brain & ~truth[rows]]
    assert np.median(lesion_scores) > np.percentile(other_scores, 99)
