"""Phantom cohorts on MNI152 anatomy: files, geometry, ground truth, contrasts, aging effects, failures.

Small cohorts (3-6 subjects at 4 mm) keep the file fast. Checks are made against independent derivations:
the template read straight from nilearn, intensities measured in the written files, masks re-read from disk.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from diffusion_engine import cli, progress
from diffusion_engine.errors import Cancelled, InputError
from diffusion_engine.manifest import SPLITS, read_manifest
from diffusion_engine.phantoms import anatomy as anatomy_module
from diffusion_engine.phantoms import cohort as cohort_module
from diffusion_engine.phantoms import load_anatomy, make_aging_cohort, make_anomaly_cohort

pytest.importorskip("nilearn")  # the [phantoms] extra

SPACING = 4.0
TEMPLATE = Path(next(iter(importlib.util.find_spec("nilearn").submodule_search_locations))) / "datasets" / "data" \
    / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def standard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_anomaly_cohort(tmp_path_factory.mktemp("std") / "cohort", subjects=6, spacing=SPACING, seed=3)


@pytest.fixture(scope="module")
def hard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_anomaly_cohort(tmp_path_factory.mktemp("hard") / "cohort", subjects=6, spacing=SPACING, seed=3,
                               difficulty="hard")


@pytest.fixture(scope="module")
def aging(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_aging_cohort(tmp_path_factory.mktemp("aging") / "cohort", subjects=8, spacing=SPACING, seed=1)


def _flair_contrast(manifest: Path) -> float:
    """Mean over lesion subjects of (mean FLAIR in the lesion) / (median FLAIR of the rest of the brain)."""
    ratios = []
    for row in read_manifest(manifest).rows:
        flair, mask = _array(row.images["flair"]), _array(row.mask).astype(bool)
        if mask.any():
            ratios.append(flair[mask].mean() / np.median(flair[(flair > 0) & ~mask]))
    return float(np.mean(ratios))


def _best_threshold_dice(manifest: Path) -> float:
    """The intensity-threshold baseline: best pooled Dice of FLAIR / (its 99th brain percentile) > t."""
    values, truth = [], []
    for row in read_manifest(manifest).rows:
        flair, mask = _array(row.images["flair"]), _array(row.mask).astype(bool)
        brain = flair > 0
        values.append(flair[brain] / np.percentile(flair[brain], 99))
        truth.append(mask[brain])
    value, lesion = np.concatenate(values), np.concatenate(truth)
    dices = [2 * (lesion & (value > t)).sum() / (lesion.sum() + (value > t).sum()) for t in np.arange(0.6, 1.6, 0.01)]
    return float(max(dices))


def test_anomaly_manifest_files_and_geometry(standard: Path) -> None:
    manifest = read_manifest(standard, require=("healthy",), modalities=("flair", "t1", "t2"))
    header = standard.read_text().splitlines()[0]
    assert header == "case,subject,split,flair,t1,t2,mask,healthy"
    assert len(manifest.rows) == 6 and (standard.parent / "montage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    template = sitk.ReadImage(str(TEMPLATE))
    template_centre = _physical_centroid(template, sitk.GetArrayFromImage(template) > 0)
    for row in manifest.rows:
        images = {m: sitk.ReadImage(str(p)) for m, p in row.images.items()}
        mask = sitk.ReadImage(str(row.mask))
        assert mask.GetPixelID() == sitk.sitkUInt8
        for image in (*images.values(), mask):
            assert image.GetSize() == mask.GetSize()
            assert image.GetSpacing() == pytest.approx((SPACING,) * 3)
            assert image.GetOrigin() == pytest.approx(template.GetOrigin())
            assert image.GetDirection() == pytest.approx(template.GetDirection())
        assert all(image.GetPixelID() == sitk.sitkFloat32 for image in images.values())
        brains = [sitk.GetArrayFromImage(image) > 0 for image in images.values()]
        assert all(np.array_equal(brains[0], b) for b in brains[1:])  # one skull-stripped brain for all
        # The subject sits where the template's brain is (same physical frame; pose changes are small).
        assert np.linalg.norm(_physical_centroid(mask, brains[0]) - template_centre) < 12.0


def _physical_centroid(image: sitk.Image, foreground: np.ndarray) -> np.ndarray:
    k, j, i = np.nonzero(foreground)
    index = np.stack([i, j, k]).mean(axis=1)
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint(index.tolist()))


def test_lesion_masks_match_health_and_lie_inside_the_brain(standard: Path) -> None:
    rows = read_manifest(standard).rows
    assert sum(row.healthy for row in rows) == 3  # healthy fraction 0.5 of 6
    for row in rows:
        mask = _array(row.mask)
        assert set(np.unique(mask)) <= {0, 1}
        assert mask.any() == (not row.healthy)
        brain = _array(row.images["flair"]) > 0
        assert not (mask.astype(bool) & ~brain).any()


def test_standard_lesions_are_bright_on_flair_and_t2_and_dark_on_t1(standard: Path) -> None:
    for row in read_manifest(standard).rows:
        mask = _array(row.mask).astype(bool)
        if not mask.any():
            continue
        brain = _array(row.images["flair"]) > 0
        outside = brain & ~mask
        ring = brain & ndimage.binary_dilation(mask, iterations=2) & ~mask  # the tissue around the lesion
        images = {m: _array(p) for m, p in row.images.items()}
        assert images["flair"][mask].mean() > 1.25 * np.median(images["flair"][outside])
        assert images["t2"][mask].mean() > 1.1 * np.median(images["t2"][outside])
        assert images["t1"][mask].mean() < np.median(images["t1"][ring])


def test_hard_lowers_lesion_contrast_and_defeats_a_threshold(standard: Path, hard: Path) -> None:
    assert _flair_contrast(hard) < _flair_contrast(standard) - 0.1
    easy_dice, hard_dice = _best_threshold_dice(standard), _best_threshold_dice(hard)
    # On this coarse 4 mm, six-subject cohort the oedema halos of large tumours blur the threshold baseline
    # (at 2 mm with 12 subjects it reaches Dice 0.72 on standard vs 0.11 on hard).
    assert easy_dice > 0.3
    assert hard_dice < 0.5 * easy_dice
    # The hard cohort's healthy subjects hold bright voxels (artefacts) that no lesion mask marks.
    assert _healthy_bright_fraction(hard) > 1e-3 > _healthy_bright_fraction(standard)


def _healthy_bright_fraction(manifest: Path) -> float:
    """Fraction of brain voxels of healthy subjects brighter than 1.6 x their brain's median FLAIR."""
    fractions = []
    for row in read_manifest(manifest).rows:
        if row.healthy:
            flair = _array(row.images["flair"])
            brain = flair[flair > 0]
            fractions.append(np.mean(brain > 1.6 * np.median(brain)))
    return float(np.mean(fractions))


def test_splits_are_by_subject_and_never_empty(standard: Path, aging: Path) -> None:
    for manifest in (read_manifest(standard), read_manifest(aging)):
        split_of: dict[str, set[str]] = {}
        for row in manifest.rows:
            split_of.setdefault(row.subject, set()).add(row.split)
        assert all(len(splits) == 1 for splits in split_of.values())
        assert {s for splits in split_of.values() for s in splits} == set(SPLITS)


def test_same_seed_same_cohort_other_seed_other_cohort(tmp_path: Path) -> None:
    first, again, other = (make_anomaly_cohort(tmp_path / name, subjects=3, spacing=SPACING, seed=seed)
                           for name, seed in (("a", 5), ("b", 5), ("c", 6)))
    for a, b, c in zip(*(read_manifest(m).rows for m in (first, again, other)), strict=True):
        assert (a.split, a.healthy) == (b.split, b.healthy)
        for modality in ("flair", "t2", "t1"):
            assert np.array_equal(_array(a.images[modality]), _array(b.images[modality]))
            assert not np.array_equal(_array(a.images[modality]), _array(c.images[modality]))
        assert np.array_equal(_array(a.mask), _array(b.mask))


def test_noise_free_cohort_is_the_same_subject_without_scanner_noise(tmp_path: Path) -> None:
    noisy, clean = (make_anomaly_cohort(tmp_path / name, subjects=3, spacing=SPACING, seed=4, noise_free=free)
                    for name, free in (("noisy", False), ("clean", True)))
    for a, b in zip(read_manifest(noisy).rows, read_manifest(clean).rows, strict=True):
        with_noise, without = _array(a.images["t1"]), _array(b.images["t1"])
        brain = without > 0
        assert np.array_equal(with_noise == 0, ~brain)  # same anatomy and brain mask
        residual = (with_noise - without)[brain] / np.median(without[brain])
        assert 0.005 < residual.std() < 0.08  # only the scanner noise differs (1.5-4 % of white matter)
        # and that difference is white (uncorrelated between neighbouring voxels): scanner noise, not anatomy
        both = brain[:, :, 1:] & brain[:, :, :-1]
        difference = with_noise - without
        assert abs(np.corrcoef(difference[:, :, 1:][both], difference[:, :, :-1][both])[0, 1]) < 0.15


def test_mixed_alternates_standard_and_hard_subjects(tmp_path: Path, standard: Path, hard: Path) -> None:
    mixed = make_anomaly_cohort(tmp_path / "mixed", subjects=6, spacing=SPACING, seed=3, difficulty="mixed")
    for index, rows in enumerate(zip(*(read_manifest(m).rows for m in (mixed, standard, hard)), strict=True)):
        same_as = rows[1] if index % 2 == 0 else rows[2]
        assert np.array_equal(_array(rows[0].images["flair"]), _array(same_as.images["flair"]))


def test_template_ventricles_are_bilateral_csf_of_plausible_volume() -> None:
    anatomy = load_anatomy(SPACING)
    ventricles = anatomy.ventricles >= 0.5
    volume_ml = ventricles.sum() * SPACING**3 / 1000
    assert 8.0 < volume_ml < 40.0  # young-adult lateral ventricles: roughly 10-30 ml
    assert anatomy.csf[ventricles].mean() > 0.6
    x = anatomy.ras(np.nonzero(ventricles))[0]
    assert (x < -5).sum() > 0.3 * x.size and (x > 5).sum() > 0.3 * x.size  # both hemispheres
    assert np.abs(x).max() < 40.0  # and nothing lateral (no insular or sulcal CSF)


def test_aging_visits_enlarge_ventricles_within_the_gap(aging: Path) -> None:
    manifest = read_manifest(aging, require=("age", "visit"), modalities=("t1", "flair"))
    assert aging.read_text().splitlines()[0] == "case,subject,split,flair,t1,ventricles,age,visit"
    by_subject: dict[str, dict[int, object]] = {}
    for row in manifest.rows:
        by_subject.setdefault(row.subject, {})[row.visit] = row
    assert len(by_subject) == 8
    ages, volumes = [], []
    for visits in by_subject.values():
        baseline, follow_up = visits[0], visits[1]
        assert 2.0 <= follow_up.age - baseline.age <= 12.0 + 1e-6
        assert 55.0 <= baseline.age < follow_up.age <= 85.0
        sizes = [_array(v.ventricles).sum() for v in (baseline, follow_up)]
        assert sizes[1] > sizes[0]
        ages += [baseline.age, follow_up.age]
        volumes += sizes
        # The mask marks dark CSF on T1, and both visits show the same subject.
        t1 = [_array(v.images["t1"]) for v in (baseline, follow_up)]
        ventricles = _array(baseline.ventricles).astype(bool)
        assert t1[0][ventricles].mean() < 0.75 * np.median(t1[0][t1[0] > 0])  # partial volume at 4 mm
        assert np.corrcoef(t1[0].ravel(), t1[1].ravel())[0, 1] > 0.95
    # Across subjects too, although head size and personal aging pace vary (about 0.5 on 40 subjects).
    assert np.corrcoef(ages, volumes)[0, 1] > 0.2


def test_aging_grows_white_matter_hyperintensities_on_flair(aging: Path) -> None:
    rows = read_manifest(aging).rows
    grew = []
    for baseline, follow_up in zip(rows[::2], rows[1::2], strict=True):
        bright = [np.mean(_array(v.images["flair"]) > 1.5 * np.median(_array(v.images["flair"])[
            _array(v.images["flair"]) > 0])) for v in (baseline, follow_up)]
        grew.append(bright[1] >= bright[0])
    assert np.mean(grew) >= 0.8


@pytest.mark.parametrize("arguments", [
    {"subjects": 2}, {"spacing": 0.5}, {"spacing": 5}, {"seed": -1}, {"split": "0.5,0.5"},
    {"split": "0.6,0.4,0"}, {"split": "a,b,c"}, {"split": (0.5, 0.3, 0.3)}, {"healthy_fraction": 1.5},
    {"difficulty": "easy"},
])
def test_bad_anomaly_arguments(tmp_path: Path, arguments: dict) -> None:
    with pytest.raises(InputError):
        make_anomaly_cohort(tmp_path / "out", **arguments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arguments", [
    {"age_range": (80, 60)}, {"age_range": "55"}, {"age_range": (30, 70)}, {"min_gap": 0.5},
    {"min_gap": 8, "max_gap": 4}, {"max_gap": 40},
])
def test_bad_aging_arguments(tmp_path: Path, arguments: dict) -> None:
    with pytest.raises(InputError):
        make_aging_cohort(tmp_path / "out", **arguments)


def test_output_folder_rules(tmp_path: Path, standard: Path) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="is a file"):
        make_anomaly_cohort(file, subjects=3, spacing=SPACING)
    with pytest.raises(InputError, match="not empty"):
        make_anomaly_cohort(busy, subjects=3, spacing=SPACING)
    with pytest.raises(InputError, match="does not look like an earlier cohort"):
        make_anomaly_cohort(busy, subjects=3, spacing=SPACING, overwrite=True)
    assert (busy / "notes.txt").read_text() == "keep me"
    with pytest.raises(InputError, match="not empty"):
        make_anomaly_cohort(standard.parent, subjects=3, spacing=SPACING)


def test_overwrite_replaces_an_earlier_cohort(tmp_path: Path) -> None:
    out = tmp_path / "cohort"
    make_aging_cohort(out, subjects=3, spacing=SPACING, seed=0)
    manifest = make_anomaly_cohort(out, subjects=3, spacing=SPACING, seed=0, overwrite=True)
    assert not list(out.glob("*_ventricles.nii.gz"))  # nothing of the aging cohort is left
    assert len(read_manifest(manifest, require=("healthy",)).rows) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["cohort"]  # no staging or old folders left


def test_cancel_or_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cancel = tmp_path / "cancel"
    cancel.touch()
    progress.configure(cancel_file=str(cancel))
    try:
        with pytest.raises(Cancelled):
            make_aging_cohort(tmp_path / "cancelled", subjects=3, spacing=SPACING)
    finally:
        progress.configure(cancel_file="")

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(cohort_module, "write_manifest", broken)
    with pytest.raises(OSError, match="disk full"):
        make_anomaly_cohort(tmp_path / "failed", subjects=3, spacing=SPACING)
    assert [p.name for p in tmp_path.iterdir()] == ["cancel"]


def test_missing_nilearn_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(anatomy_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match=r'pip install "diffusion-engine\[phantoms\]"'):
        anatomy_module.template_folder()


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    code = cli.main(["--progress", "none", "phantoms", "anomaly", "--out", str(out), "--subjects", "3",
                     "--spacing", "4", "--difficulty", "hard", "--split", "0.4,0.3,0.3"])
    assert code == 0
    assert f"manifest: {out / 'manifest.csv'}" in capsys.readouterr().out
    assert len(read_manifest(out / "manifest.csv").rows) == 3
    assert cli.main(["--progress", "none", "phantoms", "aging", "--out", str(tmp_path / "x"), "--subjects",
                     "2"]) == 2
    assert "at least 3 subjects" in capsys.readouterr().err
