"""The two cohorts as folders of NIfTI files with a manifest and a montage: the public phantom API.

    make_anomaly_cohort(out, subjects=40)   FLAIR, T2, T1 and a lesion mask per subject; about half healthy
    make_aging_cohort(out, subjects=40)     T1, FLAIR and a ventricle mask per subject at two ages

Both validate their arguments before any work, build the folder next to ``out`` and rename it into place at
the end, so a failure or a cancel leaves nothing behind; both tick the progress bar once per subject.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError
from ..manifest import ManifestRow, write_manifest
from ..progress import Progress
from .aging import AGE_LIMITS, AGING_MODALITIES, AgingSubject, Visit
from .anatomy import Anatomy, load_anatomy
from .cases import ANOMALY_MODALITIES, DIFFICULTIES, anomaly_case
from .montage import AxialViewer, save_montage
from .splits import assign_splits
from .staging import check_output_folder, staged_folder, write_volume
from .subject import cohort_stream, stream

SPACING_LIMITS_MM = (1.0, 4.0)
MIN_SUBJECTS = 3  # one per split
MIN_GAP_YEARS = 1.0
DEFAULT_SPLIT = (0.6, 0.2, 0.2)
MANIFEST, MONTAGE = "manifest.csv", "montage.png"


def make_anomaly_cohort(out: str | os.PathLike[str], subjects: int = 40, spacing: float = 2.0, seed: int = 0, *,
                        healthy_fraction: float = 0.5, difficulty: str = "standard",
                        split: str | Sequence[float] = DEFAULT_SPLIT, overwrite: bool = False,
                        noise_free: bool = False) -> Path:
    """Write an anomaly-segmentation cohort into ``out`` and return the path of its manifest.

    Each subject: ``<case>_flair/_t2/_t1.nii.gz`` and ``<case>_mask.nii.gz`` (uint8 lesion mask, empty for
    healthy subjects). ``difficulty="hard"`` lowers the lesion contrast and adds bright non-lesion artefacts;
    ``"mixed"`` alternates standard and hard subjects (a training cohort that covers both). ``noise_free`` leaves
    out the scanner noise (clean ground truth for restoration).
    """
    subjects, spacing, seed, fractions = _check_common(subjects, spacing, seed, split)
    if not 0.0 <= float(healthy_fraction) <= 1.0:
        raise InputError(f"healthy fraction {healthy_fraction} is outside 0..1",
                         fix="pass --healthy-fraction between 0 and 1 (e.g. 0.5)")
    if difficulty not in (*DIFFICULTIES, "mixed"):
        raise InputError(f"unknown difficulty {difficulty!r}", fix=f"use one of {', '.join(DIFFICULTIES)}, mixed")
    out = check_output_folder(out, overwrite)
    anatomy = load_anatomy(spacing)
    healthy = _healthy_flags(subjects, float(healthy_fraction), seed)
    splits = assign_splits(healthy, fractions, cohort_stream(seed, "anomaly splits"))
    viewer = AxialViewer(anatomy.direction)
    rows, panels = [], []
    with staged_folder(out) as work, Progress(subjects, "phantoms anomaly", unit="subject") as bar:
        for index in range(subjects):
            subject_difficulty = DIFFICULTIES[index % 2] if difficulty == "mixed" else difficulty
            case = anomaly_case(anatomy, seed, index, healthy=healthy[index], difficulty=subject_difficulty,
                                noise_free=noise_free)
            images = {m: write_volume(anatomy, case.images[m], work / f"{case.name}_{m}.nii.gz")
                      for m in ANOMALY_MODALITIES}
            mask = write_volume(anatomy, case.mask, work / f"{case.name}_mask.nii.gz")
            rows.append(ManifestRow(case=case.name, subject=case.name, split=splits[index], images=images,
                                    mask=mask, healthy=case.healthy))
            level = viewer.busiest_level(case.mask if case.mask.any() else case.images["flair"] > 0)
            label = "healthy" if case.healthy else "lesion"
            panels.append(viewer.panel(case.images["flair"], level, f"{case.name} {label} ({splits[index]})",
                                       outline=case.mask))
            bar.update(message=case.name)
        write_manifest(work / MANIFEST, rows)
        save_montage(work / MONTAGE, panels, columns=8,
                     heading=f"anomaly cohort ({difficulty}), FLAIR; red: lesion mask; seed {seed}")
    return out / MANIFEST


def make_aging_cohort(out: str | os.PathLike[str], subjects: int = 40, spacing: float = 2.0, seed: int = 0, *,
                      min_gap: float = 2.0, max_gap: float = 12.0, age_range: str | Sequence[float] = (55.0, 85.0),
                      split: str | Sequence[float] = DEFAULT_SPLIT, overwrite: bool = False,
                      noise_free: bool = False) -> Path:
    """Write a longitudinal aging cohort into ``out`` and return the path of its manifest.

    Each subject at a baseline age and ``gap`` years later (gap uniform in ``[min_gap, max_gap]``, both ages
    within ``age_range``): ``<subject>_v<visit>_t1/_flair/_ventricles.nii.gz``. ``noise_free`` leaves out the
    scanner noise.
    """
    subjects, spacing, seed, fractions = _check_common(subjects, spacing, seed, split)
    youngest, oldest = _numbers(age_range, 2, "age range", "--age-range 55,85")
    min_gap, max_gap = float(min_gap), float(max_gap)
    _check_ages(youngest, oldest, min_gap, max_gap)
    out = check_output_folder(out, overwrite)
    anatomy = load_anatomy(spacing)
    splits = assign_splits([0] * subjects, fractions, cohort_stream(seed, "aging splits"))
    viewer = AxialViewer(anatomy.direction)
    rows, panels = [], []
    with staged_folder(out) as work, Progress(subjects, "phantoms aging", unit="subject") as bar:
        for index in range(subjects):
            person = AgingSubject(anatomy, seed, index, noise_free=noise_free)
            ages = _visit_ages(seed, index, youngest, oldest, min_gap, max_gap)
            visits = [person.visit(age, number) for number, age in enumerate(ages)]
            level = viewer.busiest_level(visits[0].ventricles)
            for number, visit in enumerate(visits):
                case = f"{person.name}_v{number}"
                rows.append(_write_visit(anatomy, work, case, person.name, splits[index], visit, number))
                panels.append(viewer.panel(visit.images["t1"], level, f"{case} T1 {visit.age:.1f} y",
                                           outline=visits[0].ventricles))
            panels += [viewer.panel(v.images["flair"], level, f"{person.name}_v{n} FLAIR {v.age:.1f} y")
                       for n, v in enumerate(visits)]
            bar.update(message=person.name)
        write_manifest(work / MANIFEST, rows)
        save_montage(work / MONTAGE, panels, columns=8,
                     heading="aging cohort: T1 and FLAIR at baseline (v0) and follow-up (v1); red: baseline ventricles")
    return out / MANIFEST


def _write_visit(anatomy: Anatomy, folder: Path, case: str, subject: str, split: str, visit: Visit,
                 number: int) -> ManifestRow:
    images = {m: write_volume(anatomy, visit.images[m], folder / f"{case}_{m}.nii.gz") for m in AGING_MODALITIES}
    ventricles = write_volume(anatomy, visit.ventricles, folder / f"{case}_ventricles.nii.gz")
    return ManifestRow(case=case, subject=subject, split=split, images=images, ventricles=ventricles,
                       age=visit.age, visit=number)


def _check_common(subjects: int, spacing: float, seed: int, split: str | Sequence[float]
                  ) -> tuple[int, float, int, tuple[float, float, float]]:
    if isinstance(subjects, bool) or int(subjects) != subjects or subjects < MIN_SUBJECTS:
        raise InputError(f"{subjects} subjects is too few", fix=f"ask for at least {MIN_SUBJECTS} subjects "
                         "(one per split: train, val, test)")
    spacing = float(spacing)
    if not SPACING_LIMITS_MM[0] <= spacing <= SPACING_LIMITS_MM[1]:
        raise InputError(f"spacing {spacing:g} mm is outside {SPACING_LIMITS_MM[0]:g}-{SPACING_LIMITS_MM[1]:g} mm",
                         fix="pass --spacing between 1 and 4 (2 is the default)")
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise InputError(f"seed {seed} is not a non-negative integer", fix="pass --seed 0, 1, 2, ...")
    fractions = _numbers(split, 3, "split", "--split 0.6,0.2,0.2 (train, val, test)")
    if min(fractions) <= 0.0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-3):
        raise InputError(f"split fractions {','.join(f'{f:g}' for f in fractions)} must be positive and sum to 1",
                         fix="pass three positive fractions for train, val and test, e.g. --split 0.6,0.2,0.2")
    total = sum(fractions)
    return int(subjects), spacing, int(seed), tuple(f / total for f in fractions)  # type: ignore[return-value]


def _numbers(value: str | Sequence[float], count: int, what: str, example: str) -> tuple[float, ...]:
    """Parse "a,b,c" or a sequence of numbers into exactly ``count`` finite floats."""
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        numbers = tuple(float(item) for item in items)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != count or not all(math.isfinite(n) for n in numbers):
        raise InputError(f"{what} {value!r} is not {count} comma-separated numbers", fix=f"pass e.g. {example}")
    return numbers


def _check_ages(youngest: float, oldest: float, min_gap: float, max_gap: float) -> None:
    low, high = AGE_LIMITS
    if not low <= youngest < oldest <= high:
        raise InputError(f"age range {youngest:g}-{oldest:g} is not an increasing range within {low:g}-{high:g} "
                         "years (where the aging model is calibrated)", fix="pass e.g. --age-range 55,85")
    if not MIN_GAP_YEARS <= min_gap <= max_gap:
        raise InputError(f"gap {min_gap:g}-{max_gap:g} years is invalid",
                         fix=f"pass {MIN_GAP_YEARS:g} <= --min-gap <= --max-gap (e.g. 2 and 12)")
    if max_gap > oldest - youngest:
        raise InputError(f"the largest gap ({max_gap:g} years) does not fit in the age range {youngest:g}-{oldest:g}",
                         fix="widen --age-range or lower --max-gap")


def _visit_ages(seed: int, index: int, youngest: float, oldest: float, min_gap: float,
                max_gap: float) -> tuple[float, float]:
    """Gap uniform in [min_gap, max_gap]; baseline uniform over the ages that keep the follow-up in range.

    Ages are rounded to the manifest's 1/100 year first, so the images show exactly the ages it lists.
    """
    rng = stream(seed, index, "ages")
    gap = min(max(round(float(rng.uniform(min_gap, max_gap)), 2), min_gap), max_gap)
    baseline = round(float(rng.uniform(youngest, oldest - gap)), 2)
    return baseline, round(baseline + gap, 2)


def _healthy_flags(subjects: int, healthy_fraction: float, seed: int) -> list[bool]:
    """Exactly round(fraction x subjects) healthy subjects, chosen at random."""
    healthy = round(healthy_fraction * subjects)
    chosen = set(cohort_stream(seed, "healthy").permutation(subjects)[:healthy].tolist())
    return [index in chosen for index in range(subjects)]
