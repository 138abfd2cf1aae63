"""Baselines with known answers (an oracle network, a synthetic FLAIR) and the evaluation end to end."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from diffusion_engine import cli
from diffusion_engine.anomaly.baselines import (
    Reconstruction,
    choose_threshold,
    intensity_scores,
    reconstruct_healthy,
    reconstruction_scores,
    threshold_masks,
)
from diffusion_engine.anomaly.evaluate import (
    VARIANTS,
    default_settings,
    load_split,
    pixel_areas,
    run_evaluation,
    write_evaluation,
)
from diffusion_engine.anomaly.forward import NULL_LABEL
from diffusion_engine.anomaly.pipeline import model_spec, resolve_model, segment_slices
from diffusion_engine.commands.evaluate import VARIANT_KEYS
from diffusion_engine.datasets import SliceSet
from diffusion_engine.errors import InputError
from diffusion_engine.manifest import read_manifest
from diffusion_engine.nets.bundle import save_bundle
from diffusion_engine.nets.unet import build_network
from diffusion_engine.schedule import linear_schedule
from diffusion_engine.volume import Normalisation, normalise_slices, to_model_grid, volume_scale

T = 100
SCHEDULE = linear_schedule(T)
ABAR = torch.from_numpy(np.cumprod(1.0 - np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)))  # independent


class CounterfactualOracle:
    """Null label: x0 prediction = the input image x; healthy label: (h + w x) / (1 + w), so that the guided
    prediction (1 + w) eps_h - w eps_null points exactly at the healthy image h. Records every call."""

    def __init__(self, x: torch.Tensor, healthy: torch.Tensor, w: float):
        self.x, self.healthy, self.w = x, healthy, w
        self.calls: list[tuple[int, list[int]]] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls.append((int(t[0]), y.tolist()))
        batch = len(self.x)
        targets = torch.cat([self.x if int(label) == NULL_LABEL else (self.healthy + self.w * self.x) / (1 + self.w)
                             for label in y[::batch]])
        abar = ABAR[t].to(x_t.dtype)[:, None, None, None]
        return (x_t - abar.sqrt() * targets) / (1 - abar).sqrt()


def test_reconstruction_with_an_oracle_returns_the_healthy_image() -> None:
    generator = torch.Generator().manual_seed(0)
    healthy = torch.rand(3, 2, 16, 16, generator=generator, dtype=torch.float64) * 1.6 - 0.8
    x = healthy.clone()
    x[:, :, 4:9, 5:11] += 0.15 + 0.05 * torch.arange(2, dtype=torch.float64)[:, None, None]  # a lesion per channel
    settings = Reconstruction(noise_level=55, w=2.0, stride=10, median_size=None)
    oracle = CounterfactualOracle(x, healthy, w=2.0)
    result, evaluations = reconstruct_healthy(oracle, SCHEDULE, x, settings)
    torch.testing.assert_close(result, healthy, atol=1e-10, rtol=0)
    # grid 0, 10, ..., 50: 5 null-only encoding calls up the grid, then 6 guided + null calls down it
    assert [t for t, _ in oracle.calls] == [0, 10, 20, 30, 40, 50, 40, 30, 20, 10, 0]
    assert all(labels == [NULL_LABEL] * 3 for _, labels in oracle.calls[:5])
    assert all(labels == [0] * 3 + [NULL_LABEL] * 3 for _, labels in oracle.calls[5:])
    assert evaluations == 5 + 2 * 6 == settings.evaluations_per_slice(SCHEDULE)
    # in chunks of 2 slices (the oracle knows 2 slices; the 4 slices repeat them)
    pair, pair_healthy = x[:2].float(), healthy[:2].float()
    scores, reported = reconstruction_scores(CounterfactualOracle(pair, pair_healthy, 2.0), SCHEDULE,
                                             torch.cat([pair, pair]).numpy(), settings, chunk_size=2)
    np.testing.assert_allclose(scores, (pair - pair_healthy).abs().mean(dim=1).repeat(2, 1, 1).numpy(), atol=1e-5)
    assert reported == evaluations


def test_reconstruction_checks_its_settings() -> None:
    with pytest.raises(InputError, match="noise level"):
        Reconstruction(noise_level=T, w=1.0).grid(SCHEDULE)
    with pytest.raises(InputError, match="guidance"):
        Reconstruction(noise_level=50, w=-1.0).grid(SCHEDULE)


def synthetic_flair(rng: np.random.Generator, lesion: bool) -> tuple[np.ndarray, np.ndarray]:
    """One 2-channel slice: background -1, brain around -0.2, a bright 8x8 FLAIR lesion (T2 left plain)."""
    image = np.full((2, 32, 32), -1.0, np.float32)
    image[:, 4:28, 4:28] = -0.2 + 0.05 * rng.standard_normal((2, 24, 24))
    truth = np.zeros((32, 32), bool)
    if lesion:
        row, col = rng.integers(6, 18, size=2)
        image[0, row:row + 8, col:col + 8] = 0.7 + 0.05 * rng.standard_normal((8, 8))
        truth[row:row + 8, col:col + 8] = True
    return image, truth


def synthetic_slice_set(rng: np.random.Generator, cases: int = 2, per_case: int = 3
                        ) -> tuple[SliceSet, np.ndarray, np.ndarray]:
    """Synthetic cases in scanner-like units (background 0), normalised with the anofpdm recipe as a model sees
    them: (SliceSet, raw FLAIR / the case's 99th percentile [N, H, W], lesion truth [N, H, W])."""
    images, names, expected, truths, geometries = [], [], [], [], {}
    for case in range(cases):
        pairs = [synthetic_flair(rng, lesion=i % 2 == 0) for i in range(per_case)]
        raw = (np.stack([p[0] for p in pairs]).astype(np.float64) + 1.0) * (400.0 + 150.0 * case)
        scales = [volume_scale(raw[:, c], 99.0) for c in range(2)]
        normalised, stats = normalise_slices(raw, Normalisation("anofpdm"), scales)
        images.append(normalised)
        names += [f"case{case}"] * per_case
        expected.append(raw[:, 0] / scales[0])
        truths.append(np.stack([p[1] for p in pairs]))
        geometries[f"case{case}"] = SimpleNamespace(intensity=stats)  # all intensity_scores reads of a geometry
    data = SliceSet(images=np.concatenate(images), cases=names, slice_index=np.tile(np.arange(per_case), cases),
                    geometries=geometries)
    return data, np.concatenate(expected).astype(np.float32), np.concatenate(truths)


def test_intensity_baseline_on_a_synthetic_case() -> None:
    data, expected, truth = synthetic_slice_set(np.random.default_rng(0))
    scores = intensity_scores(data, ("flair", "t2"))
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    # the model's per-slice stretch would make a lesion-free slice as bright as a lesion; the volume scale does not
    lesion_free = ~truth.reshape(len(truth), -1).any(axis=1)
    assert data.images[lesion_free, 0].max() == pytest.approx(1.0)
    assert scores[lesion_free].max() < scores[truth].min()
    brain = scores > 0
    threshold, record = choose_threshold(scores, truth, brain)
    # lesions are a few % of the brain: a percentile between the brain and the lesions keeps every lesion pixel,
    # and the small-component removal drops scattered brain pixels; Dice 1 on validation
    assert threshold <= scores[truth].min()
    assert record["uses_pixel_labels"] and record["validation_dice_pooled"] == 1.0
    test, _, test_truth = synthetic_slice_set(np.random.default_rng(5), cases=1, per_case=1)
    mask = threshold_masks(intensity_scores(test, ("flair", "t2")), brain[:1], threshold)
    np.testing.assert_array_equal(mask[0], test_truth[0])
    with pytest.raises(InputError, match="FLAIR"):
        intensity_scores(data, ("t1",))


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An UNTRAINED 20x20 model with random weights: plumbing only, no segmentation quality is expected. Its
    zero-initialised layers get random weights and it uses scale-shift norm, so that the label changes the output
    (with 32 channels in 32 GroupNorm groups an added label embedding would be normalised away). Building it takes
    milliseconds; training even ten steps of the tiny preset takes about a minute on the 2-core test machine."""
    torch.manual_seed(0)
    network = build_network("UNetModel", {"image_size": 20, "in_channels": 2, "model_channels": 32, "out_channels": 2,
                                          "num_res_blocks": 1, "attention_resolutions": [], "channel_mult": [1, 1],
                                          "num_classes": 2, "use_scale_shift_norm": True})
    with torch.no_grad():
        for parameter in network.parameters():
            if parameter.ndim > 1 and not parameter.any():
                parameter.normal_(0.0, 0.1)
    preprocessing = {"modalities": ["flair", "t2"], "image_size": [20, 20],
                     "normalisation": Normalisation("anofpdm").to_dict()}
    return save_bundle(tmp_path_factory.mktemp("evaluate") / "model", {"eps": network}, kind="anomaly",
                       schedule=linear_schedule(1000), preprocessing=preprocessing, labels={"healthy_label": 0})


def rewrite_manifest(source: Path, target: Path, splits: dict[str, str], drop_mask: set[str] = frozenset()) -> Path:
    """A copy of a manifest with absolute paths, new splits (unlisted cases: train) and some masks removed."""
    with source.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    for row in rows:
        for column in ("flair", "t1", "t2", "mask"):
            row[column] = "" if column == "mask" and row["case"] in drop_mask else str(source.parent / row[column])
        row["split"] = splits.get(row["case"], "train")
    with target.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return target


@pytest.fixture(scope="module")
def resplit_cohort(anomaly_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared cohort with one lesion case in 'test' (its slices without lesion make the mixed setting) and one
    in 'val' (the shared split has a healthy-only val, on which the baselines could not choose a threshold)."""
    lesion = [r.case for r in read_manifest(anomaly_cohort).rows if not r.healthy]
    splits = {lesion[0]: "test", lesion[1]: "val"}
    return rewrite_manifest(anomaly_cohort, tmp_path_factory.mktemp("resplit") / "manifest.csv", splits)


# grid 0, 300; no median filter so that the random model's noisy maps give masks; thr_01 near the median cosine of
# this model on the test slices, so that some slices are decided healthy and others unhealthy
OVERRIDES = {"w": 2.0, "thr_01": 0.99999994, "m_max": 1.0, "stride": 300, "t_max": 301, "median_size": 1,
             "device": "cpu"}
RECONSTRUCTION = {"noise_level": 100, "stride": 100}


def test_evaluation_end_to_end(small_bundle: Path, resplit_cohort: Path, tmp_path: Path) -> None:
    bundle = resolve_model(small_bundle)
    settings = default_settings(bundle, **OVERRIDES)
    evaluation = run_evaluation(bundle, resplit_cohort, settings=settings, reconstruction=RECONSTRUCTION)
    runs = {run.variant.key: run for run in evaluation.runs}
    assert list(runs) == list(VARIANTS)
    data, truth = evaluation.data, evaluation.truth
    assert set(data.cases) == {c for c in (r.case for r in read_manifest(resplit_cohort).split("test"))}
    lesion_slices = int(truth.reshape(len(truth), -1).any(axis=1).sum())
    assert lesion_slices > 0

    # the mixed masks are what the pipeline itself returns with its decision switched on
    reference = segment_slices(bundle, data.images, replace(settings, decision=True),
                               pixel_area_mm2=pixel_areas(data))
    main = runs["anofpdm"]
    assert main.score.any()  # (the random model's masks lie almost all outside the brain, where none are kept)
    np.testing.assert_array_equal(main.mixed_masks, reference.mask.astype(bool))
    np.testing.assert_array_equal(main.decided_unhealthy, reference.unhealthy)
    assert main.evaluations_per_slice == 2 * 2  # two grid steps, guided + null in one call each
    # the ablations: one t_e (on the grid) and one threshold for every slice, taken from the main run
    grid = main.slice_results.timesteps
    fixed_t = runs["fixed_noise"].parameters["ablation"]["noise_scale"]
    assert fixed_t in grid and abs(fixed_t - np.median(main.slice_results.t_e)) <= max(np.diff(grid)) / 2
    assert (runs["fixed_noise"].slice_results.end_step == fixed_t).all()
    fixed_q = runs["fixed_threshold"].parameters["ablation"]["threshold"]
    np.testing.assert_allclose(runs["fixed_threshold"].slice_results.threshold, fixed_q)
    assert runs["anofpdm_ddpm"].parameters["settings_changed"] == {"encoding": "ddpm"}
    assert runs["last_sam"].parameters["settings_changed"] == {"aggregation": "last"}
    # baselines: no decision, thresholds chosen on validation with its masks
    # intensity: FLAIR on the model grid over its volume's 99th percentile, derived here from the file itself
    for row in read_manifest(resplit_cohort).rows:
        if row.case in data.geometries:
            flair = sitk.ReadImage(str(row.images["flair"]))
            voxels = sitk.GetArrayViewFromImage(flair)
            expected = to_model_grid(flair, data.geometries[row.case]) / np.percentile(voxels[voxels != 0], 99)
            np.testing.assert_allclose(runs["intensity"].score[data.of_case(row.case)], expected, atol=2e-3)
    for key in ("intensity", "reconstruction"):
        run = runs[key]
        assert run.variant.pixel_labels and run.parameters["threshold"]["uses_pixel_labels"]
        np.testing.assert_array_equal(run.mixed_masks, run.all_masks)
        assert not (run.all_masks & ~evaluation.brain).any()
    assert runs["reconstruction"].evaluations_per_slice == 1 + 2 * 2  # grid 0, 100
    for run in runs.values():
        assert not (run.all_masks & ~evaluation.brain).any()  # every method's masks stay inside the brain
        assert run.metrics["mixed"]["slices"] == len(data)
        assert run.metrics["unhealthy"]["slices"] == lesion_slices
        assert not (run.mixed_masks & ~run.all_masks).any()

    outputs = write_evaluation(evaluation, tmp_path / "out", command="diffusion-engine evaluate anomaly ...")
    table = Path(outputs["results"]).read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    for variant in VARIANTS.values():
        assert any(line.startswith(f"| {variant.label} | {'yes' if variant.pixel_labels else 'no'} |") for line in rows)
    saved = json.loads(Path(outputs["results_json"]).read_text())
    assert list(saved["methods"]) == list(VARIANTS)
    assert saved["methods"]["anofpdm"]["metrics"]["unhealthy"]["dice"] == pytest.approx(
        main.metrics["unhealthy"]["dice"])
    assert saved["cohort"]["slices"] == len(data) and saved["machine"]["cores"] >= 1
    assert Path(outputs["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluation_with_the_diffusion_classifier_decision(small_bundle: Path, resplit_cohort: Path) -> None:
    from diffusion_engine.anomaly.pipeline import class_evidence

    bundle = resolve_model(small_bundle)
    settings = default_settings(bundle, **{**OVERRIDES, "decision_score": "diffusion-classifier", "thr_01": 0.0})
    test = load_split(resplit_cohort, "test", model_spec(bundle), task="reading")
    evidence, _ = class_evidence(bundle, test.images, settings)
    settings = replace(settings, thr_01=float(np.median(evidence)))  # some slices decided each way
    evaluation = run_evaluation(bundle, resplit_cohort, variants=["anofpdm", "last_sam"], settings=settings)
    reference = segment_slices(bundle, evaluation.data.images, replace(settings, decision=True),
                               pixel_area_mm2=pixel_areas(evaluation.data))
    np.testing.assert_array_equal(reference.evidence, evidence)
    for run in evaluation.runs:  # one classifier pass serves both variants' mixed setting
        np.testing.assert_array_equal(run.decided_unhealthy, evidence >= settings.thr_01)
        assert 0 < run.decided_unhealthy.sum() < len(evidence)
        assert run.evaluations_per_slice == 2 * 2 + 12  # the forward pass's two grid steps and the classifier's
    np.testing.assert_array_equal(evaluation.runs[0].mixed_masks, reference.mask.astype(bool))


def test_evaluate_command(small_bundle: Path, resplit_cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    code = cli.main(["--progress", "none", "evaluate", "anomaly", "--model", str(small_bundle), "--manifest",
                     str(resplit_cohort), "--out", str(out), "--variants", "intensity", "--device", "cpu",
                     "--no-figure"])
    assert code == 0
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["methods"]) == ["intensity"]
    assert saved["command"].startswith("diffusion-engine evaluate anomaly --model")
    assert "--no-figure" in saved["command"] and "--variants intensity" in saved["command"]
    assert (out / "results.md").is_file() and not (out / "figure.png").exists()
    assert set(VARIANT_KEYS) == set(VARIANTS)  # the command lists the variants without importing torch


def test_evaluation_refuses_unknown_variants_and_missing_masks(small_bundle: Path, resplit_cohort: Path,
                                                               tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown variant"):
        run_evaluation(small_bundle, resplit_cohort, variants=["anofpdm", "nope"])
    rows = read_manifest(resplit_cohort).rows
    splits = {r.case: r.split for r in rows}
    lesion_test = {r.case for r in rows if r.split == "test" and not r.healthy}
    stripped = rewrite_manifest(resplit_cohort, tmp_path / "manifest.csv", splits, drop_mask=lesion_test)
    with pytest.raises(InputError, match="no lesion mask"):
        run_evaluation(small_bundle, stripped, variants=["intensity"], settings=default_settings(
            resolve_model(small_bundle), **OVERRIDES))
