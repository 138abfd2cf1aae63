"""How much closer to the real follow-up than the unchanged input can any aging counterfactual get on a cohort?

    python Engine/evaluations/aging_noise_ceiling.py --manifest aging-demo-work/cohort/manifest.csv \
        [--seed 7 --spacing 2 --split test --max-subjects 8] [--model MODEL] [--out ceiling.md]

A phantom follow-up differs from its baseline by the aging change and by a new draw of scanner noise (phantoms/
aging.py). This script renders the same subjects again without noise (same seed, index and ages) and scores, on
the evaluation's model slices (aging/evaluate.py), against the noisy follow-up:

- identity: the noisy baseline itself (the baseline of the Table-2 evaluation);
- oracle age change: the noisy baseline plus the exact noise-free change (clean follow-up - clean baseline), the
  best an "age-change" counterfactual that keeps the input's own noise can do;
- clean follow-up: the noise-free follow-up itself, an ideal denoised counterfactual.

The oracle bounds the PSNR that an age change alone can gain over the unchanged input.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from diffusion_engine.aging.evaluate import image_metrics, load_pair, longitudinal_pairs
from diffusion_engine.aging.pipeline import model_spec, resolve_model
from diffusion_engine.manifest import ManifestRow, read_manifest
from diffusion_engine.phantoms.aging import AGING_MODALITIES, AgingSubject
from diffusion_engine.phantoms.anatomy import Anatomy, load_anatomy
from diffusion_engine.phantoms.staging import write_volume


def clean_rows(anatomy: Anatomy, seed: int, baseline: ManifestRow, followup: ManifestRow, folder: Path
               ) -> tuple[ManifestRow, ManifestRow]:
    """The subject's two visits rendered without scanner noise, as manifest rows in ``folder``."""
    person = AgingSubject(anatomy, seed, int(baseline.subject.removeprefix("sub")), noise_free=True)
    rows = []
    for number, row in enumerate((baseline, followup)):
        visit = person.visit(float(row.age), number)
        images = {m: write_volume(anatomy, visit.images[m], folder / f"{row.case}_{m}.nii.gz")
                  for m in AGING_MODALITIES}
        ventricles = write_volume(anatomy, visit.ventricles, folder / f"{row.case}_ventricles.nii.gz")
        rows.append(ManifestRow(case=row.case, subject=row.subject, split=row.split, images=images,
                                ventricles=ventricles, age=row.age, visit=number))
    return rows[0], rows[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="the noisy aging cohort's manifest.csv")
    parser.add_argument("--seed", type=int, default=7, help="the cohort's --seed (default 7, the demo cohort)")
    parser.add_argument("--spacing", type=float, default=2.0, help="the cohort's --spacing (default 2)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-subjects", type=int, default=8)
    parser.add_argument("--model", default="demo", help="aging model whose slicing is used (default: the demo's)")
    parser.add_argument("--out", default=None, help="markdown table to write (also printed)")
    args = parser.parse_args()

    spec = model_spec(resolve_model(args.model, device="cpu"))
    anatomy = load_anatomy(args.spacing)
    pairs = longitudinal_pairs(read_manifest(args.manifest, require=("age",)).split(args.split))
    scores: dict[str, list[dict[str, float]]] = {"identity": [], "oracle age change": [], "clean follow-up": []}
    with tempfile.TemporaryDirectory() as name:
        for baseline, followup in pairs[:args.max_subjects]:
            noisy = load_pair(baseline, followup, spec, spec.central_slices)
            clean = load_pair(*clean_rows(anatomy, args.seed, baseline, followup, Path(name)), spec,
                              spec.central_slices)
            truth = noisy.followup[:, 0]
            change = clean.followup[:, 0] - clean.baseline[:, 0]
            scores["identity"].append(image_metrics(noisy.baseline[:, 0], truth))
            scores["oracle age change"].append(image_metrics(noisy.baseline[:, 0] + change, truth))
            scores["clean follow-up"].append(image_metrics(clean.followup[:, 0], truth))
    lines = [f"# What aging alone can gain: {len(scores['identity'])} '{args.split}' subjects of {args.manifest}", "",
             "| counterfactual | SSIM | PSNR (dB) | MSE |", "|---|---:|---:|---:|"]
    for method, rows in scores.items():
        mean = {k: float(np.mean([r[k] for r in rows])) for k in ("ssim", "psnr", "mse")}
        lines.append(f"| {method} | {mean['ssim']:.4f} | {mean['psnr']:.2f} | {mean['mse']:.6f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
