"""Restoration volume API and CLI: exact geometry, noise estimate in input units, bad input, bundle round trip."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from diffusion_engine import cli
from diffusion_engine.errors import InputError
from diffusion_engine.restore.model import load_restore_model, save_restore_model
from diffusion_engine.restore.pipeline import RestoreSettings, restore_volume
from diffusion_engine.restore.training import build_restore_model

SIZE = 32


def _head(noise_sigma: float = 0.0, seed: int = 0) -> sitk.Image:
    """An ellipsoidal 'head' with smooth texture on an oblique grid; Rician noise everywhere (also background)."""
    z, y, x = np.mgrid[:16, :44, :40].astype(np.float64)
    inside = ((x - 20) / 15) ** 2 + ((y - 22) / 18) ** 2 + ((z - 8) / 5) ** 2 < 1
    signal = np.where(inside, 100 + 30 * np.sin(x / 5) * np.cos(y / 7), 0.0)
    rng = np.random.default_rng(seed)
    noisy = np.hypot(signal + noise_sigma * rng.standard_normal(signal.shape),
                     noise_sigma * rng.standard_normal(signal.shape))
    image = sitk.GetImageFromArray(noisy.astype(np.float32))
    image.SetSpacing((1.5, 1.2, 3.0))
    image.SetOrigin((10.0, -20.0, 5.0))
    c, s = np.cos(0.2), np.sin(0.2)
    image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    return image


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return a.GetSize() == b.GetSize() and all(np.allclose(f(a), f(b), rtol=0, atol=1e-5) for f in (
        sitk.Image.GetSpacing, sitk.Image.GetOrigin, sitk.Image.GetDirection))


@pytest.fixture(scope="module")
def ddpm_model():
    torch.manual_seed(0)
    return build_restore_model("denoise", "ddpm", image_size=SIZE, info={"sigma_range": [0.02, 0.3]})


def test_matched_denoising_keeps_the_geometry_and_reports_sigma(ddpm_model):
    image = _head(6.0)
    result = restore_volume(ddpm_model, image, "denoise", settings=RestoreSettings(steps=3))
    assert _same_grid(result.image, image)
    report = result.report
    assert report["sigma_estimator"] == "rician-background"
    assert report["sigma"] == pytest.approx(6.0, rel=0.1)
    assert len(report["entry_timesteps"]) == 1 and report["entry_timesteps"][0] > 0
    # slices without head (z < 3) are not restored: they keep their input values exactly; head slices change
    source, out = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(result.image)
    assert np.array_equal(source[:3], out[:3])
    assert not np.array_equal(source[8], out[8])


def test_conditional_denoiser_enters_at_the_matched_step_unless_a_start_is_asked_for(monkeypatch):
    torch.manual_seed(0)
    model = build_restore_model("denoise", "conditional", image_size=SIZE,
                                info={"sigma_range": [0.02, 0.3], "probabilistic_conditioning": True})
    seen = []  # the condition channel of every sample the network saw: the noisy slice, or zeros (masked)
    forward = model.eps.forward

    def recording(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.extend(x[:, 1:].abs().flatten(1).sum(1).tolist())
        return forward(x, t)

    monkeypatch.setattr(model.eps, "forward", recording)
    image = _head(6.0)
    matched = restore_volume(model, image, "denoise", settings=RestoreSettings(steps=3))
    assert matched.report["entry_timesteps"][0] > 0 and "sampling_start" not in matched.report
    assert any(v > 0 for v in seen) and any(v == 0 for v in seen)  # both branches of the p_cond blend ran
    from_noise = restore_volume(model, image, "denoise", settings=RestoreSettings(steps=3, start=1.0))
    assert from_noise.report["sampling_start"] == 1.0 and "entry_timesteps" not in from_noise.report
    assert _same_grid(matched.image, image) and _same_grid(from_noise.image, image)


def test_clean_images_are_returned_unchanged_with_a_warning(ddpm_model, capsys):
    image = _head(0.0)
    result = restore_volume(ddpm_model, image, "denoise", settings=RestoreSettings(steps=3))
    assert result.report.get("already_clean")
    assert np.array_equal(sitk.GetArrayFromImage(result.image), sitk.GetArrayFromImage(image))
    assert "clean already" in capsys.readouterr().err


def test_noise_beyond_the_schedule_is_an_input_error(ddpm_model):
    with pytest.raises(InputError, match="out of range"):
        restore_volume(ddpm_model, _head(6.0), "denoise", settings=RestoreSettings(sigma=1e6))


def test_superres_factor_the_model_was_not_trained_for():
    model = build_restore_model("superres", "conditional", image_size=SIZE, info={"factors": [2]})
    with pytest.raises(InputError, match="factor 4 is not one the model was trained for"):
        restore_volume(model, _head(), "superres", settings=RestoreSettings(factor=4))
    with pytest.raises(InputError, match="restores 'superres', not 'denoise'"):
        restore_volume(model, _head(), "denoise")


def test_imputation_checks_the_mask_and_keeps_observed_voxels(tmp_path):
    model = build_restore_model("impute", "cvdm-linear", image_size=SIZE)
    image = _head(2.0)
    wrong = sitk.Image(10, 10, 10, sitk.sitkUInt8)
    with pytest.raises(InputError, match="does not match the image"):
        restore_volume(model, image, "impute", mask=wrong)
    with pytest.raises(InputError, match="needs the mask"):
        restore_volume(model, image, "impute")
    missing = np.zeros(sitk.GetArrayFromImage(image).shape, np.uint8)
    missing[:, 20:24, :] = 1
    mask = sitk.GetImageFromArray(missing)
    mask.CopyInformation(image)
    result = restore_volume(model, image, "impute", mask=mask,
                            settings=RestoreSettings(cvdm_steps=4, samples=2))
    source, out = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(result.image)
    assert _same_grid(result.image, image) and _same_grid(result.uncertainty, image)
    assert np.array_equal(source[missing == 0], out[missing == 0])
    assert not np.array_equal(source[missing == 1], out[missing == 1])


def test_missing_axial_slices_are_imputed_in_coronal_slices(capsys):
    model = build_restore_model("impute", "cvdm-linear", image_size=SIZE)
    image = _head(2.0)
    before = sitk.GetArrayFromImage(image).copy()
    missing = np.zeros(before.shape, np.uint8)
    missing[6:11:2] = 1  # three whole axial slices (the _head's slices run along its k axis, close to S-I)
    mask = sitk.GetImageFromArray(missing)
    mask.CopyInformation(image)
    holed = sitk.GetImageFromArray(np.where(missing > 0, 0, before).astype(np.float32))
    holed.CopyInformation(image)
    result = restore_volume(model, holed, "impute", mask=mask, settings=RestoreSettings(cvdm_steps=3))
    assert result.report["plane"] == "coronal"
    assert _same_grid(result.image, image)
    out = sitk.GetArrayFromImage(result.image)
    inside = (missing > 0) & (before > 50)
    assert np.array_equal(out[missing == 0], sitk.GetArrayFromImage(holed)[missing == 0])
    assert np.mean(out[inside] != 0) > 0.95  # the gaps inside the head were filled (bar its thinnest rims)
    axial = restore_volume(model, holed, "impute", mask=mask, settings=RestoreSettings(cvdm_steps=3, plane="axial"))
    assert axial.report["plane"] == "axial" and "3 axial slices are missing entirely" in capsys.readouterr().err
    with pytest.raises(InputError, match="unknown slicing plane"):
        restore_volume(model, holed, "impute", mask=mask, settings=RestoreSettings(plane="oblique"))


def test_view_in_plane_turns_the_frame_and_keeps_the_voxels():
    from diffusion_engine.volume import canonical_array, view_in_plane

    image = _head()
    for plane, axis in (("coronal", 1), ("sagittal", 2)):
        turned = view_in_plane(image, plane)
        assert np.array_equal(sitk.GetArrayFromImage(turned), sitk.GetArrayFromImage(image))
        assert turned.GetDirection() != image.GetDirection() and image.GetDirection()[8] == 1.0  # input untouched
        # the turned view's axial slices are the input's coronal (sagittal) ones, superior at the top of the rows
        seen, _ = canonical_array(turned)
        original, _ = canonical_array(image)
        assert seen.shape[0] == original.shape[axis]
        assert np.linalg.det(np.reshape(turned.GetDirection(), (3, 3))) == pytest.approx(
            np.linalg.det(np.reshape(image.GetDirection(), (3, 3))))


def test_cvdm_bundle_round_trip(tmp_path):
    torch.manual_seed(1)
    model = build_restore_model("superres", "cvdm", image_size=SIZE, info={"factors": [2, 4]})
    with torch.no_grad():
        for parameter in model.learned.tau_net.parameters():
            parameter.add_(0.3)
    folder = save_restore_model(tmp_path / "sr", model, {"note": "test"})
    loaded = load_restore_model(folder)
    condition = torch.rand(2, 1, SIZE, SIZE)
    t = torch.tensor([0.2, 0.7])
    before, after = model.learned.values(condition, t), loaded.learned.values(condition, t)
    assert loaded.method == "cvdm" and loaded.info["factors"] == [2, 4]
    assert torch.allclose(before.gamma, after.gamma) and torch.allclose(before.beta, after.beta)


def test_cli_restore_refuses_an_uncertainty_map_from_one_sample(tmp_path, ddpm_model):
    folder = save_restore_model(tmp_path / "dn", ddpm_model, {})
    image = tmp_path / "in.nii.gz"
    sitk.WriteImage(_head(6.0), str(image))
    argv = ["--progress", "none", "restore", "--task", "denoise", "--model", str(folder), "--input", str(image),
            "--output", str(tmp_path / "out.nii.gz"), "--device", "cpu", "--steps", "2"]
    assert cli.main([*argv, "--uncertainty", str(tmp_path / "u.nii.gz")]) == 2
    assert cli.main([*argv, "--report", str(tmp_path / "r.json")]) == 0
    assert _same_grid(sitk.ReadImage(str(tmp_path / "out.nii.gz")), _head())


def test_sampling_start_calibration_is_stored_and_used(tmp_path, anomaly_cohort):
    from diffusion_engine.errors import InputError
    from diffusion_engine.restore.calibration import calibrate_start
    from diffusion_engine.restore.pipeline import sample_restorations

    torch.manual_seed(0)
    model = build_restore_model("superres", "cvdm-linear", preset="tiny-conv", image_size=SIZE, modality="t1",
                                info={"factors": [2]})
    folder = save_restore_model(tmp_path / "sr", model, {})
    assert load_restore_model(folder).sampling_start == 1.0  # uncalibrated: the papers' chain from noise
    record = calibrate_start(folder, anomaly_cohort, split="val", starts=(0.1, 1.0), slices=3, cvdm_steps=4)
    assert set(record["psnr_by_start"]) == {"0.1", "1"}
    assert record["value"] == max((float(k) for k in record["psnr_by_start"]),
                                  key=lambda k: record["psnr_by_start"][f"{k:g}"])
    loaded = load_restore_model(folder)
    assert loaded.sampling_start == record["value"] and loaded.learned is not None  # the CVDM schedule survives
    # the start changes the restoration; an explicit start overrides the calibrated one
    condition = torch.rand(2, 1, SIZE, SIZE) * 2 - 1
    bar = type("Bar", (), {"update": lambda self, n=1: None})()
    short, _, _ = sample_restorations(loaded, condition, RestoreSettings(cvdm_steps=4, start=0.1), bar)
    full, _, _ = sample_restorations(loaded, condition, RestoreSettings(cvdm_steps=4, start=1.0), bar)
    assert not torch.allclose(short, full)
    with pytest.raises(InputError, match="no start to calibrate"):
        calibrate_start(save_restore_model(tmp_path / "dn", build_restore_model("denoise", "ddpm", image_size=SIZE),
                                           {}), anomaly_cohort)
    with pytest.raises(InputError, match=r"outside \(0, 1\]"):
        restore_volume(loaded, _head(), "superres", settings=RestoreSettings(factor=2, start=0.0))
