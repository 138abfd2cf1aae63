"""ONLS end to end (aging.training, aging.pipeline, aging.evaluate, the `train aging`, `aging` and `evaluate aging`
commands). The model is a tiny bundle trained for 2 steps on a 3-subject phantom cohort at 4 mm: plumbing tests
(geometry, composition, files, errors, warnings), not accuracy tests.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors import safe_open

from diffusion_engine import cli
from diffusion_engine.aging import pipeline
from diffusion_engine.aging.calibration import choose
from diffusion_engine.aging.evaluate import image_metrics, longitudinal_pairs, ventricle_volume
from diffusion_engine.aging.pipeline import (
    AgingSettings,
    age_counterfactual,
    model_spec,
    resolve_model,
    resolved_values,
)
from diffusion_engine.aging.training import (
    AgeScale,
    central_rows,
    cross_sectional,
    random_intensity_field,
    slice_batches,
    train_aging_model,
)
from diffusion_engine.errors import InputError, ModelError
from diffusion_engine.manifest import read_manifest
from diffusion_engine.nets.bundle import save_bundle
from diffusion_engine.nets.presets import build_preset
from diffusion_engine.train import TrainSettings

GEOMETRY = ("GetSize", "GetSpacing", "GetOrigin", "GetDirection")
FAST = {"steps": 5, "device": "cpu", "central_slices": 6}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusion_engine.phantoms import make_aging_cohort

    return make_aging_cohort(tmp_path_factory.mktemp("aging_cohort") / "cohort", subjects=3, spacing=4.0, seed=2,
                             split=(0.34, 0.33, 0.33))


@pytest.fixture(scope="module")
def model(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("aging_model")
    settings = TrainSettings(steps=2, batch_size=4, warmup_steps=1, checkpoint_every=1000, seed=0)
    return train_aging_model(cohort, folder / "model", image_size=32, central=6, settings=settings,
                             regressor_low_noise_steps=1, work_dir=folder / "work", half_precision=True,
                             command="test")


def t1(cohort: Path, case: str) -> str:
    return str(cohort.parent / f"{case}_t1.nii.gz")


def test_training_writes_an_aging_bundle(model: Path, cohort: Path) -> None:
    config = json.loads((model / "model.json").read_text())
    assert config["kind"] == "aging" and set(config["networks"]) == {"eps", "regressor"}
    assert config["networks"]["eps"]["config"]["num_classes"] is None
    assert config["preprocessing"]["normalisation"]["method"] == "onls"
    train_rows = read_manifest(cohort).split("train")
    low, high = config["training"]["train_ages"]
    assert {low, high} <= {row.age for row in train_rows}
    assert config["labels"]["age_low"] <= low - 5 and config["labels"]["age_high"] >= high + 5
    assert config["training"]["subjects"] == len({row.subject for row in train_rows})  # one visit per subject
    history = config["training"]["loss_history"]
    assert set(history) == {"regressor_low_noise", "regressor", "eps"}  # the regressor's two phases, then eps
    assert config["training"]["regressor_low_noise"] == {"steps": 1, "t_below": 100}
    assert config["training"]["regressor_augmentation"]["intensity_field"] is True  # the default
    with safe_open(str(model / "eps.safetensors"), "pt") as weights:
        assert all(weights.get_tensor(k).dtype.itemsize == 2 for k in weights.keys())  # noqa: SIM118 (safe_open has no __iter__)  # float16 on disk
    bundle = resolve_model(model)
    assert next(bundle.networks["eps"].parameters()).dtype.itemsize == 4  # float32 in memory


def test_cross_sectional_and_helpers(cohort: Path) -> None:
    rows = read_manifest(cohort).rows
    picked = cross_sectional(rows, seed=0)
    assert len(picked) == len({r.subject for r in rows}) == len({r.subject for r in picked})
    assert central_rows(10, 4) == slice(3, 7) and central_rows(3, 16) == slice(0, 3)
    assert central_rows(5, 0) == slice(0, 5)
    scale = AgeScale.from_ages([52.3, 88.1])
    assert (scale.low, scale.high) == (45.0, 95.0)
    assert scale.years(scale.normalise(61.0)) == pytest.approx(61.0)
    assert len(longitudinal_pairs(rows)) == 3


def test_intensity_augmentation_is_a_smooth_field_on_the_brain_only() -> None:
    x0 = torch.full((3, 1, 16, 16), -1.0)
    x0[:, :, 3:13, 3:13] = torch.linspace(-0.6, 0.6, 100).reshape(10, 10)
    out = random_intensity_field(x0, torch.Generator().manual_seed(0))
    assert torch.equal(out[x0 == -1.0], x0[x0 == -1.0])  # background untouched
    log_ratio = torch.log((out[:, 0, 3:13, 3:13] + 1) / (x0[:, 0, 3:13, 3:13] + 1))
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    terms = torch.stack([torch.ones_like(yy), yy, xx, yy * xx, yy**2, xx**2], -1)[3:13, 3:13].reshape(100, 6)
    for field in log_ratio.reshape(3, 100):
        fit = torch.linalg.lstsq(terms.double(), field.double()[:, None]).solution
        assert torch.allclose(terms.double() @ fit, field.double()[:, None], atol=1e-4)  # exp(quadratic): smooth
        assert 0 < field.abs().max() < 0.5
    assert not torch.allclose(log_ratio[0], log_ratio[1])  # one field per slice
    images, ages = x0.numpy(), np.array([0.1, 0.5, 0.9], np.float32)
    plain = slice_batches(images, ages, 4, 100, torch.device("cpu"))(torch.Generator().manual_seed(1))
    augmented = slice_batches(images, ages, 4, 100, torch.device("cpu"),
                              augment_intensity=True)(torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(plain[1:], augmented[1:], strict=True))  # same t, noise, ages
    assert not torch.equal(plain[0], augmented[0])


def test_volume_round_trip_and_report(model: Path, cohort: Path) -> None:
    row = read_manifest(cohort).rows[0]
    path = t1(cohort, row.case)
    result = age_counterfactual(model, [path], age=row.age, target_age=row.age + 8, settings=AgingSettings(**FAST))
    source = sitk.ReadImage(path)
    for image in (result.image, result.difference):
        for getter in GEOMETRY:
            assert getattr(image, getter)() == getattr(source, getter)()
    # output = input + difference, voxel for voxel; the difference is 0 outside the processed slab
    assert np.allclose(sitk.GetArrayFromImage(result.image),
                       sitk.GetArrayFromImage(source) + sitk.GetArrayFromImage(result.difference), atol=1e-3)
    difference = sitk.GetArrayFromImage(result.difference)  # [z, y, x]; identity direction: z = axial
    changed = np.flatnonzero(np.abs(difference).reshape(difference.shape[0], -1).max(axis=1) > 0)
    assert len(changed) <= FAST["central_slices"] and len(changed) > 0
    report = result.report
    assert report["noise_level"]["mode"] in ("onls", "fallback")
    assert report["noise_level"]["L"] == pytest.approx((report["noise_level"]["t0"] + 1) / 1000)
    assert len(report["variance_curve"]["variance"]) == len(report["variance_curve"]["timesteps"])
    assert report["slices"]["count"] == FAST["central_slices"]
    json.dumps(report, allow_nan=False)


def test_fixed_level_and_sweep_share_one_encoding(model: Path, cohort: Path) -> None:
    row = read_manifest(cohort).rows[0]
    settings = AgingSettings(noise_level=0.4, **FAST)
    result = age_counterfactual(model, [t1(cohort, row.case)], row.age, [row.age - 5, row.age + 5], settings)
    assert result.report["noise_level"] == {"mode": "fixed", "t0": 399, "L": 0.4, "zeta": None}
    assert len(result.images) == 2 and len(result.report["regressor_age"]["after"]) == 2
    single = age_counterfactual(model, [t1(cohort, row.case)], row.age, row.age + 5, settings)
    assert np.allclose(sitk.GetArrayFromImage(single.image), sitk.GetArrayFromImage(result.images[1]), atol=1e-3)


def test_age_change_composition_keeps_the_input_where_guidance_changes_nothing(model: Path, cohort: Path) -> None:
    row = read_manifest(cohort).rows[0]
    bundle = resolve_model(model)
    slices = np.random.default_rng(0).uniform(-1, 1, (6, 1, 32, 32)).astype(np.float32)
    unguided = AgingSettings(noise_level=0.6, guidance_scale=0.0, **FAST)
    kept = pipeline.counterfactual_slices(bundle, slices, row.age, [row.age + 5], replace(unguided,
                                                                                         composition="age-change"))
    decoded = pipeline.counterfactual_slices(bundle, slices, row.age, [row.age + 5], replace(unguided,
                                                                                            composition="decoded"))
    # c = 0: what the guidance changed is nothing, so age-change returns the input; decoded returns the round trip
    assert np.array_equal(kept.images[0].numpy(), slices)
    assert np.abs(decoded.images[0].numpy() - slices).max() > 1e-3
    guided = replace(unguided, guidance_scale=50.0)
    sweep = pipeline.counterfactual_slices(bundle, slices, row.age, [row.age - 5, row.age + 5],
                                           replace(guided, composition="age-change"))
    plain = pipeline.counterfactual_slices(bundle, slices, row.age, [row.age - 5, row.age + 5],
                                           replace(guided, composition="decoded"))
    # age-change = input + (guided decoding - unguided decoding of the same latent), per target age
    for k in range(2):
        expected = slices + plain.images[k].numpy() - decoded.images[0].numpy()
        assert np.allclose(sweep.images[k].numpy(), expected, atol=1e-5)
    # one unguided pass for all targets: 3 grid steps (t = 599, 399, 199 of the 5-step grid) x 6 slices
    assert sweep.network_evaluations["eps"] == plain.network_evaluations["eps"] + 3 * 6


def test_command_line_lists_the_pipeline_compositions_and_precisions() -> None:
    from diffusion_engine.aging.pipeline import COMPOSITIONS
    from diffusion_engine.commands.aging import COMPOSITIONS as listed
    from diffusion_engine.commands.aging import PRECISIONS as listed_precisions
    from diffusion_engine.nets.precision import PRECISIONS

    assert listed == COMPOSITIONS  # the commands spell them out so that --help needs no torch
    assert listed_precisions == tuple(PRECISIONS)


def test_composition_comes_from_settings_then_calibration(model: Path) -> None:
    spec = model_spec(resolve_model(model))
    assert resolved_values(spec, AgingSettings())["composition"] == {"value": "age-change", "source": "default"}
    assert resolved_values(spec, AgingSettings(composition="decoded"))["composition"]["source"] == "settings"
    # a model calibrated before compositions existed chose c for the guided decoding itself
    older = replace(spec, calibration={"guidance_scale": 300.0})
    assert resolved_values(older, AgingSettings())["composition"] == {"value": "decoded", "source": "default"}
    newer = replace(spec, calibration={"guidance_scale": 300.0, "composition": "age-change"})
    assert resolved_values(newer, AgingSettings())["composition"] == {"value": "age-change", "source": "calibration"}
    with pytest.raises(InputError, match="composition must be one of"):
        AgingSettings(composition="residual").validate()
    with pytest.raises(InputError, match="precision must be one of"):
        AgingSettings(precision="float16").validate()


@pytest.mark.parametrize(("age", "target"), [(-3, 60), (130, 60), (60, 60), (None, 60), (60, float("nan"))])
def test_bad_ages_are_refused(model: Path, cohort: Path, age: object, target: object) -> None:
    row = read_manifest(cohort).rows[0]
    with pytest.raises(InputError):
        age_counterfactual(model, [t1(cohort, row.case)], age, target, AgingSettings(**FAST))


def test_model_of_another_kind_is_refused(tmp_path: Path, cohort: Path) -> None:
    other = save_bundle(tmp_path / "anomaly", {"eps": build_preset("tiny", image_size=32)}, kind="anomaly")
    row = read_manifest(cohort).rows[0]
    with pytest.raises(ModelError, match="wrong kind"):
        age_counterfactual(other, [t1(cohort, row.case)], 60, 70, AgingSettings(**FAST))


def test_too_few_slices_fall_back_to_fixed_level_with_a_warning(model: Path, cohort: Path) -> None:
    row = read_manifest(cohort).rows[0]
    settings = AgingSettings(steps=5, device="cpu", central_slices=2, fallback_noise_level=0.6)
    result = age_counterfactual(model, [t1(cohort, row.case)], row.age, row.age + 5, settings)
    assert result.report["noise_level"]["mode"] == "fallback"
    assert result.report["noise_level"]["L"] == pytest.approx(0.6)
    assert any("variance stopping rule" in w for w in result.report["warnings"])


def test_variance_rule_that_never_fires_falls_back_without_encoding_twice(model: Path, cohort: Path) -> None:
    row = read_manifest(cohort).rows[0]
    common = {"steps": 5, "device": "cpu", "central_slices": 4, "composition": "age-change"}
    never = age_counterfactual(model, [t1(cohort, row.case)], row.age, row.age + 5,
                               AgingSettings(zeta=1e-30, fallback_noise_level=0.6, **common))
    fixed = age_counterfactual(model, [t1(cohort, row.case)], row.age, row.age + 5,
                               AgingSettings(noise_level=0.6, **common))
    assert never.report["noise_level"]["mode"] == "fallback"
    assert any("never fell below" in w for w in never.report["warnings"])
    # the fallback latent was kept on the way: 5 encoding steps to L = 1, then 3 guided + 3 unguided decoding steps
    assert never.report["network_evaluations"]["eps"] == 4 * (5 + 3 + 3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(never.images[0]), sitk.GetArrayFromImage(fixed.images[0]))


class SliceMean(torch.nn.Module):
    """R(x, t) = the slice's mean, so the batch variance is the spread of the slices' means."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3))[:, None]


def test_variance_rule_reads_the_models_slab_when_more_slices_are_changed(model: Path, cohort: Path) -> None:
    row = read_manifest(cohort).rows[0]
    bundle = resolve_model(model)  # trained on its central 6 slices
    bundle.networks["regressor"] = SliceMean()
    means = np.array([0.9, -0.9, 0.8, 0.1, 0.2, 0.3, 0.25, 0.15, 0.05, -0.8, 0.9, -0.9], np.float32)
    slices = means[:, None, None, None] + np.random.default_rng(0).normal(0, 0.05, (12, 1, 32, 32)).astype(np.float32)
    settings = AgingSettings(steps=5, device="cpu", zeta=1e-9, guidance_scale=10.0)
    everything = pipeline.counterfactual_slices(bundle, slices, row.age, [row.age + 5], settings)
    slab = pipeline.counterfactual_slices(bundle, slices[3:9], row.age, [row.age + 5], settings)
    spread = pipeline.counterfactual_slices(bundle, slices, row.age, [row.age + 5],
                                            replace(settings, variance_slices=0))
    assert (everything.variance_slices, slab.variance_slices, spread.variance_slices) == (6, 6, 12)
    # each slice is encoded on its own, so the slab's variance and ages do not depend on the other slices changed
    assert everything.variance == pytest.approx(slab.variance, rel=1e-4)
    assert everything.age_before == pytest.approx(slab.age_before, rel=1e-5)
    assert everything.age_after == pytest.approx(slab.age_after, rel=1e-3)
    # the outer slices' spread would decide otherwise
    assert all(a > b for a, b in zip(spread.variance, slab.variance, strict=True))
    assert spread.variance[0] > 10 * slab.variance[0]
    assert everything.images.shape[1] == 12 and np.abs(everything.images[0, :3].numpy() - slices[:3]).max() > 0


def test_out_of_range_age_warns(model: Path, cohort: Path) -> None:
    row = read_manifest(cohort).rows[0]
    result = age_counterfactual(model, [t1(cohort, row.case)], row.age, 119.0, AgingSettings(**FAST))
    assert any("outside the model's age range" in w for w in result.report["warnings"])


def test_metrics_and_ventricle_volume_by_hand() -> None:
    a = np.zeros((2, 16, 16)) - 1.0
    b = a.copy()
    b[0, :4] = 1.0  # 64 pixels differ by 1 in [0, 1] units
    metrics = image_metrics(a, b)
    assert metrics["mse"] == pytest.approx(64 / 512)
    assert metrics["psnr"] == pytest.approx(10 * np.log10(512 / 64))
    assert image_metrics(a, a)["ssim"] == pytest.approx(1.0)
    roi = np.zeros((2, 16, 16), bool)
    roi[:, 4:8, 4:8] = True
    image = np.ones((2, 16, 16))
    image[1, 4:6, 4:8] = -1.0
    assert ventricle_volume(image, roi, 0.0, pixel_ml=0.5) == pytest.approx(8 * 0.5)


def test_table2_checks_cover_the_papers_sweep_only() -> None:
    from diffusion_engine.aging.evaluate import _checks

    def method(psnr: float, level: float | None = None) -> dict[str, float]:
        return {"psnr": psnr, "ssim": psnr / 100, "ventricle_error_ml": 1.0, **({"L": level} if level else {})}

    def checks_of(summary: dict[str, dict[str, float]]) -> dict[str, Any]:  # one subject scoring the means
        return _checks([{"sweep": {"ages": []}, "onls_fired": True, "methods": summary}], summary, [30.0])

    summary = {"identity": method(30.0), "L=1.0": method(31.0, 1.0), "L=0.4": method(32.0, 0.4),
               "ONLS": method(32.5, 0.3)}
    checks = checks_of(summary)
    assert checks["onls_psnr_at_least_every_fixed_L_0.4_to_1.0"] and checks["best_fixed_L_psnr"] == "L=0.4"
    assert checks["oracle_fixed_L_psnr"] == 32.0
    # a level below the paper's sweep is shown beside it, not counted in the Table-2 claim
    checks = checks_of({**summary, "L=0.3": method(33.0, 0.3)})
    assert checks["onls_psnr_at_least_every_fixed_L_0.4_to_1.0"] and checks["best_fixed_L_psnr"] == "L=0.3"
    checks = checks_of({**summary, "L=0.4": method(32.6, 0.4)})
    assert checks["onls_psnr_at_least_every_fixed_L_0.4_to_1.0"] is False
    no_levels = checks_of({"identity": summary["identity"], "ONLS": summary["ONLS"]})
    assert no_levels["onls_psnr_at_least_every_fixed_L_0.4_to_1.0"] is None and no_levels["best_fixed_L_psnr"] is None


def test_paired_differences_give_the_mean_gap_and_a_t_interval() -> None:
    from diffusion_engine.aging.evaluate import paired_differences

    gaps = [0.1, 0.3, -0.1, 0.5]
    per_subject = [{"methods": {"ONLS": {"psnr": 30.0 + g, "ssim": 0.9}, "L=0.4": {"psnr": 30.0, "ssim": 0.9}}}
                   for g in gaps]
    paired = paired_differences(per_subject, "ONLS", ["L=0.4"])["L=0.4"]
    half = 3.182446305 * np.std(gaps, ddof=1) / 2  # t(0.975, 3 degrees of freedom) x standard error
    assert paired["psnr"]["mean"] == pytest.approx(0.2)
    assert (paired["psnr"]["low"], paired["psnr"]["high"]) == pytest.approx((0.2 - half, 0.2 + half))
    assert paired["ssim"] == pytest.approx({"mean": 0.0, "low": 0.0, "high": 0.0})
    single = paired_differences(per_subject[:1], "ONLS", ["L=0.4"])["L=0.4"]["psnr"]
    assert single["mean"] == pytest.approx(0.1) and np.isnan(single["low"])


def test_level_choice_gives_the_oracle_ceiling_and_whether_onls_follows_it() -> None:
    from diffusion_engine.aging.evaluate import level_choice

    def subject(onls_level: float, psnr_at: dict[float, float]) -> dict[str, Any]:
        fixed = {f"L={level:.1f}": {"psnr": psnr, "L": level} for level, psnr in psnr_at.items()}
        return {"methods": {**fixed, "ONLS": {"psnr": 0.0, "L": onls_level}}}

    # each subject's best level differs; ONLS's L rises with it in the first cohort, falls in the second
    curves = [{0.4: 30.0, 0.6: 31.0, 0.8: 29.0}, {0.4: 32.0, 0.6: 30.0, 0.8: 30.0}, {0.4: 28.0, 0.6: 28.5, 0.8: 29.5}]
    follows = [subject(level, curve) for level, curve in zip((0.55, 0.35, 0.75), curves, strict=True)]
    opposes = [subject(level, curve) for level, curve in zip((0.55, 0.75, 0.35), curves, strict=True)]
    fixed = ["L=0.4", "L=0.6", "L=0.8"]
    choice = level_choice(follows, "ONLS", fixed)
    assert choice["oracle_fixed_L_psnr"] == pytest.approx((31.0 + 32.0 + 29.5) / 3)
    assert choice["onls_L_spearman_with_oracle_L"] == pytest.approx(1.0)
    assert level_choice(opposes, "ONLS", fixed)["onls_L_spearman_with_oracle_L"] == pytest.approx(-1.0)
    assert level_choice(follows, "ONLS", ["L=0.4"]) == {"oracle_fixed_L_psnr": None,
                                                        "onls_L_spearman_with_oracle_L": None}


def test_cli_aging_sweep_and_evaluate(model: Path, cohort: Path, tmp_path: Path) -> None:
    row = read_manifest(cohort).rows[0]
    out = tmp_path / "cf.nii.gz"
    code = cli.main(["--progress", "none", "aging", "--model", str(model), "--input", t1(cohort, row.case),
                     "--age", str(row.age), "--target-ages", f"{row.age - 4:g},{row.age + 4:g}", "--output", str(out),
                     "--difference", str(tmp_path / "d.nrrd"), "--report", str(tmp_path / "r.json"), "--steps", "5",
                     "--central-slices", "6", "--device", "cpu"])
    assert code == 0
    for age in (row.age - 4, row.age + 4):
        assert (tmp_path / f"cf_age{age:g}.nii.gz").is_file() and (tmp_path / f"d_age{age:g}.nrrd").is_file()
    assert len(json.loads((tmp_path / "r.json").read_text())["regressor_age"]["after"]) == 2
    assert cli.main(["--progress", "none", "aging", "--model", str(model), "--input", t1(cohort, row.case),
                     "--age", "60", "--target-age", "60", "--output", str(out)]) == 2
    code = cli.main(["--progress", "none", "evaluate", "aging", "--model", str(model), "--manifest", str(cohort),
                     "--split", "test", "--out", str(tmp_path / "eval"), "--noise-levels", "1.0,0.6",
                     "--steps", "5", "--sweep=-5,5", "--device", "cpu", "--max-subjects", "1"])
    assert code == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(results["summary"]) == {"identity", "L=1.0", "L=0.6", "ONLS"}
    assert results["summary"]["identity"]["ssim"] < 1.0  # the follow-up differs from the baseline
    assert set(results["paired"]) == {"identity", "L=1.0", "L=0.6"}  # ONLS minus each other method
    assert results["checks"]["oracle_fixed_L_psnr"] == pytest.approx(
        max(results["summary"][m]["psnr"] for m in ("L=1.0", "L=0.6")))  # one subject: its best fixed L
    markdown = (tmp_path / "eval" / "results.md").read_text()
    assert (tmp_path / "eval" / "figure.png").is_file() and "| SSIM |" in markdown and "| L=0.6 | " in markdown


def test_demo_names_resolve_to_the_bundled_model(monkeypatch: pytest.MonkeyPatch, model: Path) -> None:
    monkeypatch.setattr(pipeline, "DEMO_MODEL", model)
    assert resolve_model(None).path == model and resolve_model("demo").path == model
    monkeypatch.setattr(pipeline, "DEMO_MODEL", model.parent / "missing")
    with pytest.raises(ModelError, match="demo aging model"):
        resolve_model("demo")


def test_calibration_stores_zeta_and_guidance_scale(model: Path, cohort: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(model, tmp_path / "model"))
    code = cli.main(["--progress", "none", "calibrate", "aging", "--model", str(copy), "--manifest", str(cohort),
                     "--zetas", "1e-4,1e9", "--scales", "0,50", "--steps", "5", "--device", "cpu"])
    assert code == 0
    calibration = json.loads((copy / "model.json").read_text())["calibration"]
    candidates = calibration["onls_record"]["candidates"]
    assert len(candidates) == 4  # every (zeta, c) pair was run
    best = choose(candidates, calibration["onls_record"]["identity"])
    assert (calibration["zeta"], calibration["guidance_scale"]) == (best["zeta"], best["guidance_scale"])
    assert calibration["guidance_scale"] == 50.0  # never c = 0: a counterfactual needs the intervention
    assert candidates["zeta=1e+09, c=0"]["fired_fraction"] == 1.0  # any variance is below 1e9: fires at once
    values = resolved_values(model_spec(resolve_model(copy)), AgingSettings())
    assert values["zeta"] == {"value": best["zeta"], "source": "calibration"}
    assert values["guidance_scale"] == {"value": best["guidance_scale"], "source": "calibration"}
    assert values["composition"] == {"value": "age-change", "source": "calibration"}
    assert cli.main(["--progress", "none", "calibrate", "aging", "--model", str(copy), "--manifest", str(cohort),
                     "--scales", "-1"]) == 2
    assert cli.main(["--progress", "none", "calibrate", "aging", "--model", str(copy), "--manifest", str(cohort),
                     "--subjects", "-2"]) == 2


def test_calibration_rule_needs_guidance_and_ventricles_closer_than_the_input() -> None:
    identity = {"psnr": 36.0, "ventricle_error_ml": 4.0}

    def candidate(c: float, psnr: float, error: float) -> dict[str, float]:
        return {"zeta": 1e-3, "guidance_scale": c, "psnr": psnr, "ventricle_error_ml": error}

    plain, far, near, nearer = (candidate(0, 35.9, 4.1), candidate(300, 35.5, 4.5), candidate(1000, 34.0, 3.5),
                                candidate(3000, 30.0, 3.0))
    pick = {"a": plain, "b": far, "c": near, "d": nearer}
    assert choose(pick, identity) is near  # best PSNR among the guided ones that beat the input's ventricles
    assert choose({"a": plain, "b": far}, identity) is far  # none closer: smallest ventricle error, still guided
    assert choose({"a": plain}, identity) is plain


def test_cli_demo_input_uses_the_demo_case_and_its_age(model: Path, tmp_path: Path) -> None:
    from diffusion_engine.demo import demo_case, demo_description

    out, report = tmp_path / "cf.nii.gz", tmp_path / "r.json"
    code = cli.main(["--progress", "none", "aging", "--model", str(model), "--input", "demo", "--target-age", "76",
                     "--output", str(out), "--report", str(report), "--steps", "5", "--device", "cpu",
                     "--precision", "bfloat16"])
    assert code == 0
    assert json.loads(report.read_text())["settings"]["precision"] == "bfloat16"
    source = sitk.ReadImage(str(demo_case("aging")["t1"]))
    result = sitk.ReadImage(str(out))
    assert all(getattr(result, g)() == getattr(source, g)() for g in GEOMETRY)
    assert json.loads(report.read_text())["age"] == demo_description("aging")["age"]
    code = cli.main(["--progress", "none", "aging", "--model", str(model), "--input", str(demo_case("aging")["t1"]),
                     "--target-age", "76", "--output", str(tmp_path / "other.nii.gz")])
    assert code == 2 and not (tmp_path / "other.nii.gz").exists()  # no --age for a user's own image


def test_cli_demo_input_names_the_modality_the_demo_case_lacks(cohort: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    two = tmp_path / "t1flair"
    assert cli.main(["--progress", "none", "train", "aging", "--manifest", str(cohort), "--out", str(two),
                     "--modalities", "t1,flair", "--image-size", "32", "--central-slices", "6", "--steps", "1",
                     "--batch-size", "2", "--warmup-steps", "0", "--no-regressor-augmentation", "--device", "cpu"]) == 0
    training = json.loads((two / "model.json").read_text())["training"]
    assert training["regressor_augmentation"]["intensity_field"] is False
    out = tmp_path / "cf.nii.gz"
    code = cli.main(["--progress", "none", "aging", "--model", str(two), "--input", "demo", "--target-age", "76",
                     "--output", str(out), "--steps", "5", "--device", "cpu"])
    assert code == 2 and not out.exists()
    assert "no flair image" in capsys.readouterr().err
