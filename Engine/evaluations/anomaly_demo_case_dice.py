"""Whole-volume Dice of label maps of the bundled anomaly demo case against its ground-truth mask, as a markdown table.

    python Engine/evaluations/anomaly_demo_case_dice.py --out demo-case.md NAME=LABEL.nii.gz [NAME=LABEL.nii.gz ...]

NAME is the row's description (e.g. "decision on"); each LABEL is a label map that `diffusion-engine anomaly --input
demo` wrote (on the demo FLAIR's voxel grid).
"""

from __future__ import annotations

import argparse

import numpy as np
import SimpleITK as sitk

from diffusion_engine.demo import ground_truth
from diffusion_engine.metrics import dice


def rows(labels: dict[str, str]) -> list[str]:
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(ground_truth("anomaly")))) > 0
    lines = ["| run | Dice | label voxels | true lesion voxels |", "| --- | ---: | ---: | ---: |"]
    for name, path in labels.items():
        label = sitk.GetArrayFromImage(sitk.ReadImage(path)) > 0
        if label.shape != truth.shape:
            raise SystemExit(f"{path}: shape {label.shape} is not the demo case's {truth.shape}")
        lines.append(f"| {name} | {dice(label, truth):.3f} | {np.count_nonzero(label)} | {np.count_nonzero(truth)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="markdown file to write")
    parser.add_argument("labels", nargs="+", metavar="NAME=LABEL", help="row name and label map")
    args = parser.parse_args()
    pairs = [item.split("=", 1) for item in args.labels]
    if any(len(pair) != 2 for pair in pairs):
        parser.error("give each label map as NAME=PATH")
    lines = rows(dict(pairs))
    with open(args.out, "w", encoding="utf-8") as out:
        out.write("\n".join(["# The bundled demo case: whole-volume Dice", "", *lines, ""]))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
