"""Restoration cost per volume with the bundled demo models: seconds and peak memory for each task.

    python Engine/benchmarks/restore_speed.py [--out restore_speed.md] [--samples 1 4]

1. A noise-free phantom T1 on its own 2 mm grid (99 x 117 x 95; `--brats-sized`: resampled onto 240 x 240 x 155
   voxels of 1 mm, as anomaly_speed.py builds its case) and its degraded versions: Rician noise (sigma 5% of the
   brain's 99th percentile) for denoising, 30% of the voxels missing (with the mask) for imputation, and 2x
   in-plane block averaging for super-resolution.
2. Each task and sample count runs `diffusion-engine restore` in a fresh Python process, which reports its own peak
   resident memory (Linux VmHWM) when it ends; the wall time includes reading, preprocessing, the network passes
   and writing the output. A process that imports the engine and loads the model without restoring gives the
   memory floor.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BRATS_SIZE = (240, 240, 155)
CHILD = """
import json, sys
from diffusion_engine.cli import main
code = 0
try:
    code = main(sys.argv[2:]) or 0
finally:
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            json.dump({'peak_rss_bytes': int(line.split()[1]) * 1024, 'exit': code}, open(sys.argv[1], 'w'))
"""


def clean_volume(folder: Path, seed: int = 0, *, brats_sized: bool = False) -> Path:
    """A noise-free phantom T1 on its own 2 mm grid, or resampled onto a 240 x 240 x 155, 1 mm grid
    centred on the brain."""
    import SimpleITK as sitk

    from diffusion_engine.phantoms import anomaly_case, load_anatomy

    anatomy = load_anatomy(2.0)
    case = anomaly_case(anatomy, seed, 0, healthy=True, difficulty="standard", noise_free=True)
    template = anatomy.image(case.images["t1"])
    path = folder / "clean_t1.nii.gz"
    if not brats_sized:
        sitk.WriteImage(template, str(path))
        return path
    centre = template.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in template.GetSize()])
    direction = np.asarray(template.GetDirection()).reshape(3, 3)
    reference = sitk.Image(BRATS_SIZE, sitk.sitkFloat32)
    reference.SetDirection(template.GetDirection())
    reference.SetOrigin(tuple(np.asarray(centre) - direction @ ((np.asarray(BRATS_SIZE) - 1) / 2.0)))
    image = sitk.Resample(template, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    sitk.WriteImage(image, str(path))
    return path


def degraded_inputs(clean: Path, folder: Path, seed: int = 0) -> dict[str, list[str]]:
    """{task: extra restore arguments} with the degraded volumes written to ``folder``."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    image = sitk.ReadImage(str(clean))
    array = sitk.GetArrayFromImage(image)
    sigma = 0.05 * float(np.percentile(array[array > 0], 99))

    def write(values: np.ndarray, name: str, pixel: int = sitk.sitkFloat32) -> str:
        out = sitk.GetImageFromArray(values)
        out.CopyInformation(image)
        sitk.WriteImage(sitk.Cast(out, pixel), str(folder / name))
        return str(folder / name)

    noisy = np.hypot(array + sigma * rng.standard_normal(array.shape), sigma * rng.standard_normal(array.shape))
    missing = rng.random(array.shape) < 0.3
    # 2x in-plane block averaging (larger voxels), back onto the original grid by linear interpolation
    low = sitk.Resample(sitk.BinShrink(image, [2, 2, 1]), image, sitk.Transform(), sitk.sitkLinear)
    return {
        "denoise": ["--input", write(noisy.astype(np.float32), "noisy.nii.gz")],
        "impute": ["--input", write(np.where(missing, 0, array).astype(np.float32), "missing.nii.gz"),
                   "--mask", write(missing.astype(np.uint8), "missing_mask.nii.gz", sitk.sitkUInt8)],
        "superres": ["--input", write(sitk.GetArrayFromImage(low), "low_resolution.nii.gz"), "--factor", "2"],
    }


def run_restore(task: str, arguments: list[str], samples: int, folder: Path) -> dict:
    """One `diffusion-engine restore` in a fresh interpreter: wall seconds and the child's own peak memory."""
    answer = folder / f"{task}_{samples}.json"
    command = [sys.executable, "-c", CHILD, str(answer), "--progress", "none", "restore", "--task", task, *arguments,
               "--output", str(folder / f"restored_{task}_{samples}.nii.gz"), "--samples", str(samples),
               "--device", "cpu"]
    if samples > 1:
        command += ["--uncertainty", str(folder / f"uncertainty_{task}_{samples}.nii.gz")]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - started
    return {"task": task, "samples": samples, "seconds": seconds, **json.loads(answer.read_text())}


def floor_memory() -> int | None:
    """Peak memory of a process that imports the engine and loads the three demo models."""
    code = ("from diffusion_engine.restore.model import load_restore_model\n"
            "for t in ('denoise', 'impute', 'superres'): load_restore_model('demo', task=t)\n"
            "import sys; sys.path.insert(0, sys.argv[1]); from anomaly_speed import _own_peak_rss\n"
            "print(_own_peak_rss())")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent)], check=True,
                         capture_output=True, text=True).stdout.split()
    return int(out[-1]) if out and out[-1].isdigit() else None


def report(rows: list[dict], floor: int | None, threads: int, volume: object) -> str:
    from diffusion_engine.restore.model import load_restore_model

    size = " x ".join(map(str, volume.GetSize()))
    spacing = " x ".join(f"{s:g}" for s in volume.GetSpacing())
    lines = [f"# Restoration speed with the bundled demo models ({platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs, torch threads {threads})", "",
             f"T1 phantom of {size} voxels ({spacing} mm), restored at its own in-plane pixel size; each run is one "
             "`diffusion-engine restore` in a fresh process (read, preprocess, restore, write).", "",
             "| task | method | samples | seconds per volume | peak memory (GB) |", "|---|---|---:|---:|---:|"]
    for row in rows:
        method = load_restore_model("demo", task=row["task"]).method
        lines.append(f"| {row['task']} | {method} | {row['samples']} | {row['seconds']:.1f} | "
                     f"{row['peak_rss_bytes'] / 1e9:.2f} |")
    if floor:
        lines += ["", f"Memory floor (Python, torch, the engine, the three demo models): {floor / 1e9:.2f} GB."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="markdown report to write (also printed)")
    parser.add_argument("--samples", type=int, nargs="+", default=[1], help="sample counts to time (default 1)")
    parser.add_argument("--tasks", nargs="+", default=["denoise", "impute", "superres"])
    parser.add_argument("--brats-sized", action="store_true",
                        help="a 240 x 240 x 155, 1 mm volume instead of the phantom's own 2 mm grid")
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        clean = clean_volume(folder, brats_sized=args.brats_sized)
        inputs = degraded_inputs(clean, folder)
        rows = [run_restore(task, inputs[task], samples, folder) for samples in args.samples for task in args.tasks]
        import SimpleITK as sitk

        text = report(rows, floor_memory(), torch.get_num_threads(), sitk.ReadImage(str(clean)))
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
