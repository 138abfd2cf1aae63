"""AnoFPDM end to end (anomaly.pipeline, anomaly.calibrate, the `anomaly` and `calibrate anomaly` commands).

The model is the session's tiny trained bundle (``anomaly_model``: 32 px, 20 optimiser steps): these are plumbing
tests (geometry, composition, chunking, files, errors), not accuracy tests. Expected values come from composing the
core functions by hand, numpy/scipy, or closed forms of a hand-made network.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from diffusion_engine import cli
from diffusion_engine.anomaly import pipeline
from diffusion_engine.anomaly.calibrate import DEFAULT_W_GRID, calibrate_model
from diffusion_engine.anomaly.calibration import calibrate_thr_01
from diffusion_engine.anomaly.decision import DECISION_SCORES, cosine_similarity, decision_values
from diffusion_engine.anomaly.forward import forward_statistics
from diffusion_engine.anomaly.pipeline import (
    AnomalySettings,
    class_evidence,
    resolve_model,
    resolve_values,
    run_forward,
    segment_anomalies,
    segment_slices,
)
from diffusion_engine.anomaly.threshold import remove_small_components, segment
from diffusion_engine.errors import InputError, ModelError
from diffusion_engine.nets.bundle import ModelBundle, read_bundle_config
from diffusion_engine.volume import Normalisation, read_case, to_model_slices

FAST = {"t_max": 100, "stride": 25}  # 4 grid steps: 0, 25, 50, 75
SHORT = {"t_max": 50, "stride": 25}  # 2 grid steps, where only plumbing is checked
VALUES = {"w": 2.0, "thr_01": 0.98, "m_max": [0.01, 0.012], "device": "cpu"}  # compared with CPU runs by hand
GEOMETRY = ("GetSize", "GetSpacing", "GetOrigin", "GetDirection")


def inputs(cohort: Path, case: str) -> list[str]:
    return [str(cohort.parent / f"{case}_{m}.nii.gz") for m in ("flair", "t2")]


def lesion_case(cohort: Path) -> str:
    return next(line.split(",")[0] for line in cohort.read_text().splitlines()[1:] if line.endswith(",0"))


@pytest.fixture(scope="module")
def bundle(anomaly_model: Path) -> ModelBundle:
    return resolve_model(anomaly_model)


@pytest.fixture(scope="module")
def slices(bundle: ModelBundle, anomaly_cohort: Path) -> np.ndarray:
    """Eight model slices of a subject with lesions, around the middle of the brain."""
    case = read_case(inputs(anomaly_cohort, lesion_case(anomaly_cohort)), ("flair", "t2"))
    x, _ = to_model_slices(case, (32, 32), normalisation=Normalisation("anofpdm"))
    middle = len(x) // 2
    return x[middle - 4 : middle + 4]


def by_hand(bundle: ModelBundle, x: np.ndarray, w: float, grid: dict = FAST) -> object:
    return forward_statistics(bundle.networks["eps"], bundle.schedule(), torch.from_numpy(x), w=w, **grid)


# ------------------------------------------------------------------------------------------ composition


def test_segment_slices_is_the_core_composed_by_hand(bundle: ModelBundle, slices: np.ndarray) -> None:
    results = segment_slices(bundle, slices, AnomalySettings(**VALUES, **FAST), pixel_area_mm2=46.875)
    stats = by_hand(bundle, slices, 2.0)
    cosine = cosine_similarity(stats.mse_healthy, stats.mse_reference)
    unhealthy = (cosine <= 0.98).numpy()
    # 140.625 mm^2 / 46.875 mm^2 = 3 pixels: components of <= 3 pixels go
    seg = segment(stats.aggregated, stats.peak_divergence, torch.tensor([0.01, 0.012]), max_component_size=0)
    brain = slices.mean(axis=1) > -0.95  # masks stay inside the brain (the authors' foreground rule), then
    kept = remove_small_components(seg.mask & torch.from_numpy(brain), 3)  # small components go
    np.testing.assert_array_equal(results.max_component_pixels, 3)
    np.testing.assert_array_equal(results.unhealthy, unhealthy)
    np.testing.assert_allclose(results.cosine, cosine.numpy(), rtol=1e-6)
    np.testing.assert_allclose(results.score, seg.anomaly_map.numpy(), rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(results.mask, (kept.numpy() & unhealthy[:, None, None]).astype(np.uint8))
    np.testing.assert_array_equal(results.t_e, stats.peak_step.numpy())
    np.testing.assert_allclose(results.curves, stats.divergence.mean(dim=1).numpy(), rtol=1e-6)
    assert results.timesteps == [0, 25, 50, 75]
    assert results.network_evaluations == len(slices) * 2 * 4  # guided + null, one batched call per step
    # Algorithm 1 in numpy: q = 0.98 - 0.08 round(clip(M_te / M_max), 2), quantile per modality, then the mean
    levels = 0.98 - 0.08 * np.round(np.clip(stats.peak_divergence.numpy() / [0.01, 0.012], 0, 1), 2)
    maps = stats.aggregated.numpy().reshape(len(slices), 2, -1)
    expected = [np.mean([np.quantile(maps[i, m], levels[i, m]) for m in range(2)]) for i in range(len(slices))]
    np.testing.assert_allclose(results.threshold, expected, rtol=1e-5)


def test_last_sam_and_fixed_quantile(bundle: ModelBundle, slices: np.ndarray) -> None:
    settings = AnomalySettings(**VALUES, **FAST, aggregation="last", quantile=0.95, decision=False)
    results = segment_slices(bundle, slices, settings)
    stats = by_hand(bundle, slices, 2.0)
    maps = stats.last_sam.numpy().reshape(len(slices), 2, -1)
    expected = np.quantile(maps, 0.95, axis=2).mean(axis=1)
    np.testing.assert_allclose(results.threshold, expected, rtol=1e-5)
    assert results.unhealthy.all()
    np.testing.assert_array_equal(results.max_component_pixels, 40)  # no pixel size given: the code's 40 pixels


def test_chunks_and_out_of_memory_fallback(bundle: ModelBundle, slices: np.ndarray,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    settings = AnomalySettings(**VALUES, **FAST)
    whole = segment_slices(bundle, slices, settings)

    class RunsOutOfMemory(torch.nn.Module):
        def __init__(self, network: torch.nn.Module, max_rows: int):
            super().__init__()
            self.network, self.max_rows, self.batches = network, max_rows, []

        def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            self.batches.append(x.shape[0])
            if x.shape[0] > self.max_rows:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return self.network(x, t, y)

    warnings: list[str] = []
    monkeypatch.setattr(pipeline, "warn", warnings.append)
    small = copy.copy(bundle)
    small.networks = {"eps": RunsOutOfMemory(bundle.networks["eps"], max_rows=6)}  # 3 slices (guided + null)
    chunked = segment_slices(small, slices, AnomalySettings(**VALUES, **FAST, chunk_size=16))
    assert len(warnings) == 2 and "with 8 slices" in warnings[0] and "retrying with 2" in warnings[-1]  # 8, 4, 2
    assert max(small.networks["eps"].batches[-4:]) == 4
    for name in ("score", "cosine", "threshold", "curves", "m_te"):
        np.testing.assert_allclose(getattr(chunked, name), getattr(whole, name), rtol=1e-4, atol=1e-9)
    assert np.mean(chunked.mask != whole.mask) < 1e-3  # batch size may move float rounding, not the masks
    assert chunked.network_evaluations == whole.network_evaluations

    small.networks = {"eps": RunsOutOfMemory(bundle.networks["eps"], max_rows=0)}
    with pytest.raises(ModelError, match="not enough memory"):
        segment_slices(small, slices[:2], AnomalySettings(**VALUES, **FAST, chunk_size=2))


def test_overrides_change_what_they_should(bundle: ModelBundle, slices: np.ndarray) -> None:
    base = segment_slices(bundle, slices, AnomalySettings(**VALUES, **FAST))
    assert base.values["w"] == {"value": 2.0, "source": "settings"}

    fixed_end = segment_slices(bundle, slices, AnomalySettings(**VALUES, **FAST, noise_scale=25))
    np.testing.assert_array_equal(fixed_end.end_step, 25)
    np.testing.assert_array_equal(fixed_end.t_e, base.t_e)  # t_e (argmax) and M_te do not move ...
    assert not np.allclose(fixed_end.score, base.score)  # ... but H now averages the steps up to 25

    unguided = segment_slices(bundle, slices, AnomalySettings(**{**VALUES, "w": 0.0}, **FAST))
    assert not np.allclose(unguided.m_te, base.m_te)

    value = float(np.float32(np.quantile(base.score, 0.9)))  # a float32 value: the map's own precision
    fixed = segment_slices(bundle, slices, AnomalySettings(**VALUES, **FAST, threshold=value, decision=False,
                                                           min_component_mm2=0.0))
    np.testing.assert_array_equal(fixed.threshold, value)
    np.testing.assert_array_equal(fixed.mask, (fixed.score >= value).astype(np.uint8))
    pruned = segment_slices(bundle, slices, AnomalySettings(**VALUES, **FAST, threshold=value, decision=False),
                            pixel_area_mm2=140.625 / 4)  # components of <= 4 pixels removed
    for mask, kept in zip(fixed.mask, pruned.mask, strict=True):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        np.testing.assert_array_equal(kept, ((sizes > 4) & (np.arange(count + 1) > 0))[labels])

    # thr_01 = -1: every slice healthy, so the mixed setting empties every mask; decision=False keeps them
    options = {**VALUES, "thr_01": -1.0, **FAST, "quantile": 0.9, "min_component_mm2": 0.0}
    healthy = segment_slices(bundle, slices, AnomalySettings(**options))
    kept = segment_slices(bundle, slices, AnomalySettings(**options, decision=False))
    assert not healthy.unhealthy.any() and healthy.mask.sum() == 0
    assert kept.unhealthy.all() and kept.mask.sum() > 0


def test_ddpm_encoding_follows_the_seed(bundle: ModelBundle, slices: np.ndarray) -> None:
    runs = [segment_slices(bundle, slices[:3], AnomalySettings(**VALUES, **FAST, encoding="ddpm", seed=seed))
            for seed in (1, 1, 2)]
    np.testing.assert_array_equal(runs[0].score, runs[1].score)
    assert not np.allclose(runs[0].score, runs[2].score)


def test_guidance_sweep_equals_separate_passes(bundle: ModelBundle, slices: np.ndarray) -> None:
    ws = [0.0, 2.0, 5.0]
    runs = run_forward(bundle, slices[:5], AnomalySettings(**FAST, chunk_size=3, device="cpu"), w=ws, task="sweep")
    assert sum(r.network_evaluations for r in runs) == 5 * 2 * 4  # one pass serves every w
    for w, run in zip(ws, runs, strict=True):
        stats = by_hand(bundle, slices[:5], w)
        for name in ("divergence", "mse_healthy", "mse_reference", "peak_divergence", "aggregated", "last_sam"):
            torch.testing.assert_close(getattr(run, name), getattr(stats, name), rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(run.peak_step, stats.peak_step)


class BumpNetwork(torch.nn.Module):
    """A hand-made epsilon model with a known, unimodal M_t per slice.

    Null label: eps = 0, so DDIM encoding keeps x_t = sqrt(abar) x0 / sqrt(abar_0) and x0_u = x_t / sqrt(abar).
    Healthy label: eps_h = -g(t) v / 2 sqrt(abar / (1 - abar)), so at w = 1 (eps_g = 2 eps_h) x0_h = x0_u + g(t) v
    and M_t = mean(v^2) g(t)^2, with the bump
    g(t) = exp(-((t - c) / 60)^2) centred at c = 150 + 1000 * mean(x0), which the network reads from x_t.
    """

    def __init__(self, abar: np.ndarray, pattern: torch.Tensor):
        super().__init__()
        self.placeholder = torch.nn.Parameter(torch.zeros(1))  # lets the pipeline find the device
        self.abar, self.pattern = torch.from_numpy(abar), pattern

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        abar = self.abar[t].to(x.dtype).view(-1, 1, 1, 1)
        centre = 150.0 + 1000.0 * (x / abar.sqrt()).mean(dim=(1, 2, 3))
        g = torch.exp(-(((t.double() - centre.double()) / 60.0) ** 2)).to(x.dtype).view(-1, 1, 1, 1)
        eps_healthy = -g * self.pattern / 2.0 * (abar / (1.0 - abar)).sqrt()
        return torch.where((y == -1).view(-1, 1, 1, 1), torch.zeros_like(x), eps_healthy)


def test_early_stop_changes_nothing_when_m_t_is_unimodal(bundle: ModelBundle) -> None:
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))  # the bundle's linear schedule, independently
    generator = torch.Generator().manual_seed(0)
    pattern = 0.1 * torch.randn(2, 32, 32, generator=generator).clamp(-2, 2)
    pattern -= pattern.mean()
    offsets = torch.tensor([0.0, 0.03, 0.06, 0.09, 0.12, 0.15])
    x0 = (offsets.view(-1, 1, 1, 1) + 0.2 * torch.randn(6, 2, 32, 32, generator=generator).clamp(-1, 1))
    x0 -= x0.mean(dim=(1, 2, 3), keepdim=True) - offsets.view(-1, 1, 1, 1)
    fake = copy.copy(bundle)
    fake.networks = {"eps": BumpNetwork(abar, pattern)}
    common = {"w": 1.0, "m_max": 0.01, "decision": False, "t_max": 600, "stride": 25, "device": "cpu"}
    full = segment_slices(fake, x0.numpy(), AnomalySettings(**common))
    early = segment_slices(fake, x0.numpy(), AnomalySettings(**common, early_stop=True, chunk_size=4))
    grid = np.arange(0, 600, 25)
    expected_peak = grid[np.argmax(-np.abs(grid[None, :] - (150 + 1000 * offsets.numpy())[:, None]), axis=1)]
    np.testing.assert_array_equal(full.t_e, np.repeat(expected_peak[:, None], 2, axis=1))
    np.testing.assert_array_equal(early.t_e, full.t_e)
    np.testing.assert_allclose(early.m_te, full.m_te, rtol=1e-6)
    np.testing.assert_allclose(early.score, full.score, rtol=1e-6)
    np.testing.assert_array_equal(early.mask, full.mask)
    assert (early.steps_run < len(grid)).all() and (full.steps_run == len(grid)).all()
    assert early.network_evaluations < full.network_evaluations
    for i, steps in enumerate(early.steps_run):
        np.testing.assert_allclose(early.curves[i, :steps], full.curves[i, :steps], rtol=1e-6)
        assert (early.curves[i, steps:] == 0).all()
        # stopped two grid steps past the peak, once M_t fell to half of it
        peak = int(np.argmax(full.curves[i]))
        assert steps - 1 >= peak + 2 and full.curves[i, steps - 1] <= 0.5 * full.curves[i, peak]


# ------------------------------------------------------------------------------------------ volumes and files


def reoriented(image: sitk.Image) -> sitk.Image:
    """The same physical image on a permuted and flipped voxel grid: new index (i', j', k') = old (j, i, K-1-k)."""
    array = sitk.GetArrayFromImage(image).transpose(0, 2, 1)[::-1]
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing, size = image.GetSpacing(), image.GetSize()
    out = sitk.GetImageFromArray(np.ascontiguousarray(array))
    out.SetSpacing((spacing[1], spacing[0], spacing[2]))
    out.SetDirection(np.stack([direction[:, 1], direction[:, 0], -direction[:, 2]], axis=1).ravel().tolist())
    out.SetOrigin((np.asarray(image.GetOrigin()) + (size[2] - 1) * spacing[2] * direction[:, 2]).tolist())
    return out


def back(array: np.ndarray) -> np.ndarray:
    """Undo reoriented() on a numpy array [k, j, i]."""
    return array[::-1].transpose(0, 2, 1)


def test_cli_outputs_sit_on_the_input_grid_also_when_reoriented(anomaly_model: Path, anomaly_cohort: Path,
                                                                tmp_path: Path) -> None:
    paths = inputs(anomaly_cohort, lesion_case(anomaly_cohort))
    out = tmp_path / "out"
    code = cli.main(["--progress", "none", "anomaly", "--model", str(anomaly_model), "--input", *paths,
                     "--output-label", str(out / "label.nrrd"), "--output-map", str(out / "map.nii.gz"),
                     "--report", str(out / "report.json"), "--w", "2", "--thr-01", "0.98", "--m-max", "0.01,0.012",
                     "--quantile", "0.9", "--no-decision", "--t-max", "50", "--stride", "25", "--device", "cpu"])
    assert code == 0
    flair = sitk.ReadImage(paths[0])
    label, score = sitk.ReadImage(str(out / "label.nrrd")), sitk.ReadImage(str(out / "map.nii.gz"))
    for image in (label, score):
        for getter in GEOMETRY:
            np.testing.assert_allclose(getattr(image, getter)(), getattr(flair, getter)(), rtol=0, atol=1e-5)
    assert label.GetPixelID() == sitk.sitkUInt8 and score.GetPixelID() == sitk.sitkFloat32
    labels = sitk.GetArrayFromImage(label)
    assert labels.max() == 1 and labels.sum() > 0

    report = json.loads((out / "report.json").read_text())
    assert report["outputs"]["label"] == str(out / "label.nrrd")
    voxel_ml = np.prod(flair.GetSpacing()) / 1000.0
    assert report["lesion_voxels"] == int(labels.sum())
    assert report["lesion_volume_ml"] == pytest.approx(labels.sum() * voxel_ml)
    table = report["slices"]
    assert sum(row["lesion_voxels"] for row in table) == labels.sum()
    for row in table:  # canonical axis = input k here (identity-like axial grid, k not flipped)
        assert row["input_axis"] == "k" and labels[row["input_index"]].sum() == row["lesion_voxels"]
        assert set(row) >= {"t_e", "threshold", "cosine", "unhealthy", "m_te"} and len(row["t_e"]) == 2
    assert len(report["curves"]["m_t"]) == len(table) and report["curves"]["timesteps"] == [0, 25]
    assert report["values"]["thr_01"]["source"] == "settings"

    # the same physical case on a permuted, flipped grid: same physical mask, output on the copy's grid
    images = [reoriented(sitk.ReadImage(p)) for p in paths]
    assert np.allclose(images[0].TransformIndexToPhysicalPoint((1, 2, 3)),
                       flair.TransformIndexToPhysicalPoint((2, 1, flair.GetSize()[2] - 4)))
    settings = AnomalySettings(**VALUES, quantile=0.9, decision=False, **SHORT)
    result = segment_anomalies(anomaly_model, images, settings)
    for getter in GEOMETRY:
        assert getattr(result.label, getter)() == getattr(images[0], getter)()
        assert getattr(result.score_map, getter)() == getattr(images[0], getter)()
    np.testing.assert_array_equal(back(sitk.GetArrayFromImage(result.label)), labels)
    np.testing.assert_allclose(back(sitk.GetArrayFromImage(result.score_map)), sitk.GetArrayFromImage(score),
                               rtol=1e-5, atol=1e-9)
    assert {row["input_axis"] for row in result.report["slices"]} == {"k"}
    assert result.report["lesion_volume_ml"] == pytest.approx(report["lesion_volume_ml"])


def test_numpy_inputs_need_a_reference_or_spacing(anomaly_model: Path, anomaly_cohort: Path) -> None:
    images = [sitk.ReadImage(p) for p in inputs(anomaly_cohort, lesion_case(anomaly_cohort))]
    arrays = [sitk.GetArrayFromImage(image) for image in images]
    settings = AnomalySettings(**VALUES, t_max=25, stride=25, quantile=0.9, decision=False)  # one grid step
    with pytest.raises(InputError, match=r"reference=.*spacing="):
        segment_anomalies(anomaly_model, arrays, settings)
    result = segment_anomalies(anomaly_model, arrays, settings, reference=images[0])
    for getter in GEOMETRY:
        assert getattr(result.label, getter)() == getattr(images[0], getter)()
    spaced = segment_anomalies(anomaly_model, {"flair": arrays[0], "t2": arrays[1]}, settings, spacing=(4, 4, 4))
    assert spaced.label.GetSpacing() == (4.0, 4.0, 4.0) and spaced.label.GetSize() == images[0].GetSize()


def test_calibrate_then_segment_with_the_calibration(anomaly_model: Path, anomaly_cohort: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "model"
    shutil.copytree(anomaly_model, model)
    rows = anomaly_cohort.read_text().splitlines()
    healthy = next(r for r in rows[1:] if r.endswith(",1")).split(",")[0]
    lesions = lesion_case(anomaly_cohort)
    manifest = tmp_path / "manifest.csv"  # val: one healthy subject and one with lesions; absolute paths

    def row(values: list[str]) -> str:
        split = "val" if values[0] in (healthy, lesions) else "train"
        files = [str(anomaly_cohort.parent / v) if v.endswith(".nii.gz") else v for v in values[3:]]
        return ",".join([*values[:2], split, *files])

    manifest.write_text("\n".join([rows[0], *(row(r.split(",")) for r in rows[1:])]) + "\n")
    code = cli.main(["--progress", "none", "calibrate", "anomaly", "--model", str(model), "--manifest", str(manifest),
                     "--w-grid", "0,2", "--t-max", "50", "--stride", "25", "--device", "cpu"])
    assert code == 0
    calibration = read_bundle_config(model)["calibration"]
    assert calibration["method"] == "anofpdm" and calibration["w"] in (0.0, 2.0)
    assert calibration["settings"] == {"t_max": 50, "stride": 25, "encoding": "ddim", "early_stop": False, "seed": 0}
    record = calibration["record"]
    assert record["w_grid"] == [0.0, 2.0] and [e["w"] for e in record["per_w"]] == [0.0, 2.0]
    assert record["split"] == "val" and sorted(record["cases"]) == sorted([healthy, lesions])
    assert record["manifest"] == str(manifest.resolve()) and calibration["date"]
    assert len(calibration["m_max"]) == 2 and all(v > 0 for v in calibration["m_max"])

    # thr_01 and M_max by hand: the val slices through forward_statistics at the chosen w, the core's calibration
    from diffusion_engine.datasets import load_slices
    from diffusion_engine.manifest import read_manifest

    data = load_slices(read_manifest(manifest).split("val"), ("flair", "t2"), (32, 32), Normalisation("anofpdm"),
                       labels=True)
    loaded = resolve_model(model)
    assert record["slices"] == len(data) and record["unhealthy_slices"] == int(data.unhealthy.sum())
    stats = by_hand(loaded, data.images, calibration["w"], SHORT)
    score = calibration["decision_score"]
    evidence, _ = class_evidence(loaded, data.images, AnomalySettings(device="cpu"))
    values = decision_values(score, cosine_similarity(stats.mse_healthy, stats.mse_reference), stats.peak_divergence,
                             torch.from_numpy(evidence))
    thr_01, _ = calibrate_thr_01(values, data.unhealthy, score)
    assert calibration["thr_01"] == pytest.approx(thr_01, rel=1e-6)
    # auto keeps the most accurate decision, the cosine on ties; the other scores' choices are recorded
    accuracy = record["decision"]["accuracy_at_chosen_w"]
    assert set(accuracy) == set(DECISION_SCORES)
    assert score == max(DECISION_SCORES, key=lambda s: (accuracy[s], -DECISION_SCORES.index(s)))
    others = record["other_scores"]
    assert {o["score"] for o in others} == set(DECISION_SCORES) - {score} and all(len(o["per_w"]) == 2 for o in others)
    unhealthy_peaks = stats.peak_divergence.numpy()[data.unhealthy == 1]
    np.testing.assert_allclose(calibration["m_max"], unhealthy_peaks.max(axis=0), rtol=1e-5)

    # segmenting now uses the calibration; other forward settings trigger a warning
    case = inputs(anomaly_cohort, lesions)
    result = segment_anomalies(model, case, AnomalySettings(**SHORT, device="cpu"))
    assert {v["source"] for v in result.report["values"].values()} == {"calibration"}
    assert result.report["calibration"]["settings"]["stride"] == 25
    warnings: list[str] = []
    monkeypatch.setattr(pipeline, "warn", warnings.append)
    segment_anomalies(model, case, AnomalySettings(t_max=50, stride=50, device="cpu"))
    assert len(warnings) == 1 and "stride 50 (calibrated with 25)" in warnings[0]

    # a decision score can be forced; the calibrated thr_01 is not used for another score
    other = "diffusion-classifier" if score != "diffusion-classifier" else "cosine"
    with pytest.raises(InputError, match=f"calibrated for the {score} decision"):
        segment_anomalies(model, case, AnomalySettings(**SHORT, decision_score=other, device="cpu"))
    assert cli.main(["--progress", "none", "calibrate", "anomaly", "--model", str(model), "--manifest", str(manifest),
                     "--w-grid", "0,2", "--t-max", "50", "--stride", "25", "--device", "cpu",
                     "--decision", other]) == 0
    calibration = read_bundle_config(model)["calibration"]
    assert calibration["decision_score"] == other and calibration["record"]["decision"]["method"] == "given"
    result = segment_anomalies(model, case, AnomalySettings(**SHORT, device="cpu"))
    assert result.report["values"]["decision_score"] == {"value": other, "source": "calibration"}
    # a model without an "unhealthy" class still calibrates the forward-pass decisions; the classifier is refused
    from diffusion_engine.anomaly import calibrate as calibrate_module

    original = pipeline.model_spec
    for module in (pipeline, calibrate_module):
        monkeypatch.setattr(module, "model_spec", lambda b: dataclasses.replace(original(b), unhealthy_label=None))
    short = {"w_grid": [0.0, 2.0], "settings": AnomalySettings(**SHORT, device="cpu")}
    record = calibrate_model(model, manifest, **short)["record"]
    assert set(record["decision"]["accuracy_at_chosen_w"]) == {"cosine", "peak-divergence"}
    with pytest.raises(ModelError, match="no class labelled 'unhealthy'"):
        calibrate_model(model, manifest, decision="diffusion-classifier", **short)
    monkeypatch.undo()

    # the diffusion classifier's own pass: 12 evaluations per slice on top of the forward pass's, evidence reported
    result = segment_anomalies(model, case, AnomalySettings(**SHORT, decision_score="diffusion-classifier",
                                                            thr_01=0.0, device="cpu"))
    rows = result.report["slices"]
    evidence = np.array([row["classifier_evidence"] for row in rows])
    assert [row["unhealthy"] for row in rows] == (evidence >= 0).tolist()
    assert result.report["network_evaluations"] == len(rows) * (2 * 2 + 12)


def test_decision_score_and_its_threshold_are_resolved_together(tmp_path: Path) -> None:
    def bundle(**calibration: object) -> SimpleNamespace:
        section = {"method": "anofpdm", "version": 2, "settings": {}, "w": 2.0, "m_max": [0.5], **calibration}
        return SimpleNamespace(config={"calibration": section}, path=tmp_path)

    def values(model: SimpleNamespace, **settings: object) -> dict:
        return resolve_values(model, AnomalySettings(**settings), 1, check_only=True)

    old = bundle(thr_01=0.9)  # calibration version 1: no decision score, which means the cosine
    assert values(old)["decision_score"] == {"value": "cosine", "source": "default"}
    peak = bundle(thr_01=0.12, decision_score="peak-divergence")
    got = values(peak)
    assert got["decision_score"] == {"value": "peak-divergence", "source": "calibration"}
    assert got["thr_01"] == {"value": 0.12, "source": "calibration"}
    # another score needs its own threshold; without the decision none is used
    with pytest.raises(InputError, match="calibrated for the peak-divergence decision"):
        values(peak, decision_score="cosine")
    assert values(peak, decision_score="cosine", thr_01=0.95)["thr_01"] == {"value": 0.95, "source": "settings"}
    assert "thr_01" not in values(peak, decision_score="cosine", decision=False)
    # each score's range: a cosine in [-1, 1], an M_te >= 0
    with pytest.raises(InputError, match=r"thr_01 \(a cosine\)"):
        values(old, thr_01=1.5)
    with pytest.raises(InputError, match="M_te"):
        values(peak, thr_01=-0.1)
    # the diffusion classifier's evidence may be negative
    classifier = bundle(thr_01=-2e-4, decision_score="diffusion-classifier")
    assert values(classifier)["thr_01"] == {"value": -2e-4, "source": "calibration"}
    with pytest.raises(ModelError, match="thr_01 unknown"):  # uncalibrated: the usual message
        values(bundle(), decision_score="peak-divergence")


def test_the_diffusion_classifier_needs_an_unhealthy_class(bundle: ModelBundle, tmp_path: Path) -> None:
    config = copy.deepcopy(bundle.config)
    assert pipeline.model_spec(bundle).unhealthy_label == 1  # named "unhealthy" in model.json
    config["labels"] = {"0": "healthy", "healthy_label": 0}
    two = SimpleNamespace(config=config, path=tmp_path, networks=bundle.networks)
    assert pipeline.model_spec(two).unhealthy_label == 1  # two classes: the one that is not healthy
    config = copy.deepcopy(config)
    config["networks"]["eps"]["config"]["num_classes"] = 3
    three = SimpleNamespace(config=config, path=tmp_path, networks=bundle.networks)
    with pytest.raises(ModelError, match="no class labelled 'unhealthy'"):
        class_evidence(three, np.zeros((1, 2, 32, 32), np.float32), AnomalySettings(device="cpu"))


def test_commands_offer_every_decision_score() -> None:
    from diffusion_engine.commands import anomaly as command  # spelled there so that --help needs no torch

    assert command.DECISION_SCORES == DECISION_SCORES


# ------------------------------------------------------------------------------------------ bad input


def edited_model(source: Path, folder: Path, **changes: object) -> Path:
    model = folder / "edited"
    shutil.copytree(source, model)
    config = json.loads((model / "model.json").read_text())
    config.update(changes)
    (model / "model.json").write_text(json.dumps(config))
    return model


def test_bad_inputs_are_clear_errors_and_write_nothing(anomaly_model: Path, anomaly_cohort: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    flair, t2 = inputs(anomaly_cohort, lesion_case(anomaly_cohort))
    shifted = tmp_path / "t2_shifted.nii.gz"
    image = sitk.ReadImage(t2)
    image.SetOrigin([v + 10.0 for v in image.GetOrigin()])
    sitk.WriteImage(image, str(shifted))
    zeros = []
    for name in ("flair", "t2"):
        empty = sitk.Image(image.GetSize(), sitk.sitkFloat32)
        empty.CopyInformation(image)
        zeros.append(tmp_path / f"zero_{name}.nii.gz")
        sitk.WriteImage(empty, str(zeros[-1]))
    monkeypatch.setattr(pipeline, "DEMO_MODEL", tmp_path / "no-demo-here")
    explicit = ["--w", "2", "--thr-01", "0.98", "--m-max", "0.01", "--t-max", "50", "--stride", "25", "--device", "cpu"]
    out = tmp_path / "out"
    cases = {
        "expects 2 image": (["--model", str(anomaly_model), "--input", flair], explicit),
        "voxel grid differs": (["--model", str(anomaly_model), "--input", flair, str(shifted)], explicit),
        "for 'aging'": (["--model", str(edited_model(anomaly_model, tmp_path / "a", kind="aging")), "--input",
                         flair, t2], explicit),
        "for 'generic'": (["--model", str(edited_model(anomaly_model, tmp_path / "g", kind="generic")), "--input",
                           flair, t2], explicit),
        "newer diffusion-engine": (["--model", str(edited_model(anomaly_model, tmp_path / "v", format_version=99)),
                                    "--input", flair, t2], explicit),
        "not calibrated: w, thr_01, m_max unknown": (["--model", str(anomaly_model), "--input", flair, t2], []),
        "empty": (["--model", str(anomaly_model), "--input", *map(str, zeros)], explicit),
        "demo anomaly model is not bundled": (["--input", flair, t2], explicit),
        "overwrite an input": (["--model", str(anomaly_model), "--input", flair, t2, "--output-map", t2], explicit),
    }
    for expected, (args, extra) in cases.items():
        code = cli.main(["--progress", "none", "anomaly", *args, "--output-label", str(out / "label.nrrd"),
                         "--report", str(out / "report.json"), *extra])
        message = capsys.readouterr().err
        assert code == 2, expected
        assert expected in message, message
        assert not out.exists() or not any(out.iterdir()), expected
    code = cli.main(["--progress", "none", "anomaly", "--model", str(anomaly_model), "--input", flair, t2,
                     "--output-label", str(out / "label.nrrd")])
    message = capsys.readouterr().err
    assert code == 2 and "diffusion-engine calibrate anomaly" in message and "--w" in message and "--thr-01" in message


def test_a_failed_write_removes_what_was_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusion_engine import fileio
    from diffusion_engine.commands.anomaly import write_outputs

    image = sitk.Image(4, 4, 4, sitk.sitkUInt8)
    result = SimpleNamespace(label=image, score_map=sitk.Cast(image, sitk.sitkFloat32), report={"a": 1})

    def full_disk(path: object, text: str) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(fileio, "write_text_atomic", full_disk)
    with pytest.raises(OSError):
        write_outputs(result, tmp_path / "label.nrrd", tmp_path / "map.nrrd", tmp_path / "report.json")
    assert list(tmp_path.iterdir()) == []


def test_help_quotes_the_api_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["anomaly", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = AnomalySettings()
    assert f"(default {defaults.stride}:" in text and f"(default {defaults.chunk_size})" in text
    assert f"default {defaults.median_size};" in text and f"(default {defaults.min_component_mm2:g} mm2" in text
    assert defaults.min_component_mm2 == 40 * 1.875**2
    with pytest.raises(SystemExit):
        cli.main(["calibrate", "anomaly", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default {','.join(f'{w:g}' for w in DEFAULT_W_GRID)})" in text
