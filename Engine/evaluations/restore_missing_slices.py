"""Missing axial slices, filled by the demo imputation model (in coronal slices) vs linear interpolation.

    python Engine/evaluations/restore_missing_slices.py --manifest WORK/test/manifest.csv [--subjects 3]
        [--out Engine/evaluations/restore/missing_slices.md]

Every third axial slice of the central 40 of each held-out (noise-free) T1 volume is removed, as in an
interleaved acquisition with one corrupted package. Scored on the removed slices only, as the restoration table
scores its slices (PSNR, SSIM, MAE inside the head; MS-SSIM whole slice), intensities on [0, 1] up to the
volume's 99.5th head percentile.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from diffusion_engine.manifest import read_manifest
from diffusion_engine.restore.evaluate import image_scores
from diffusion_engine.restore.pipeline import RestoreSettings, restore_volume

GAP_EVERY, CENTRAL = 3, 40


def _like(values: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.CopyInformation(reference)
    return image


def remove_slices(clean: np.ndarray) -> np.ndarray:
    """Mask [z, y, x] of the removed axial slices (array axis 0 is the phantoms' slice axis)."""
    missing = np.zeros(clean.shape, bool)
    first = clean.shape[0] // 2 - CENTRAL // 2
    missing[first + 1:first + CENTRAL - 1:GAP_EVERY] = True
    return missing


def linear_between_neighbours(holed: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Each removed slice as the mean of the nearest kept slice below and above it."""
    out = holed.copy()
    kept = np.flatnonzero(~missing.all(axis=(1, 2)))
    for k in np.flatnonzero(missing.all(axis=(1, 2))):
        below, above = kept[kept < k].max(), kept[kept > k].min()
        weight = (k - below) / (above - below)
        out[k] = (1 - weight) * holed[below] + weight * holed[above]
    return out


def scores(clean: np.ndarray, restored: np.ndarray, missing: np.ndarray) -> dict[str, float]:
    """The restoration table's scores (``image_scores``: head voxels, slice means) over the removed slices, with
    intensities mapped to [-1, 1] by the volume's 99.5th head percentile."""
    peak = float(np.percentile(clean[clean > 0], 99.5))
    removed = missing.all(axis=(1, 2))
    unit = [2 * volume[removed] / peak - 1 for volume in (clean, restored)]
    return image_scores(*unit, head=clean[removed] > 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--subjects", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "restore" / "missing_slices.md"))
    args = parser.parse_args(argv)
    rows = read_manifest(args.manifest, modalities=("t1",)).split(args.split)[: args.subjects]
    table = {"removed slices left empty": [], "linear interpolation between neighbours": [],
             "diffusion imputation (demo model, coronal slices)": []}
    for row in rows:
        image = sitk.ReadImage(str(row.images["t1"]), sitk.sitkFloat32)
        clean = sitk.GetArrayFromImage(image)
        missing = remove_slices(clean)
        holed = np.where(missing, 0, clean)
        mask = _like(missing.astype(np.uint8), image)
        result = restore_volume(None, _like(holed, image), "impute", mask=mask, settings=RestoreSettings())
        restored = sitk.GetArrayFromImage(result.image)
        for name, values in zip(table, (holed, linear_between_neighbours(holed, missing), restored), strict=True):
            table[name].append(scores(clean, values, missing))
    lines = [f"`python Engine/evaluations/restore_missing_slices.py --manifest {args.manifest} --split {args.split} "
             f"--subjects {args.subjects}`", "",
             f"{len(rows)} held-out noise-free T1 volumes; every {GAP_EVERY}rd axial slice of the central {CENTRAL} "
             "removed; scored on the removed slices (mean over volumes).", "",
             "| method | PSNR | SSIM | MS-SSIM | MAE |", "|---|---:|---:|---:|---:|"]
    for name, per_case in table.items():
        mean = {k: np.mean([s[k] for s in per_case]) for k in ("psnr", "ssim", "ms_ssim", "mae")}
        lines.append(f"| {name} | {mean['psnr']:.2f} | {mean['ssim']:.3f} | {mean['ms_ssim']:.3f} | "
                     f"{mean['mae']:.4f} |")
    lines += ["", "Speed: `Engine/benchmarks/restore_speed.py` (timings here would depend on what else runs)."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
