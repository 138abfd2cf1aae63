"""What does an aging model's regressor R(x_t, t) read: age, or brightness? Held-out longitudinal pairs.

    python Engine/evaluations/aging_regressor.py --manifest aging-demo-work/cohort/manifest.csv \
        --models MODEL [MODEL ...] [--split test] [--out regressor.md]

Guided decoding follows R's gradient, so R should respond to the anatomy that ages and not to intensity changes
that MRI does not control (gain, bias field). Per model, on both visits of every pair's model slices:

- age error: |mean R over a visit's slices - true age| (years) at t = 0, and the constant predictor's (the mean
  training age) beside it; r = correlation of the slice predictions with the ages;
- aging response: (R(follow-up) - R(baseline)) / (follow-up age - baseline age), years of R per year of aging
  (1 = R follows the true change of the same brain; 0 = it does not see it);
- brightness response: the largest |change of R| (years) when the baseline's brain intensities are multiplied by a
  5% gain (1 +- 0.05) or a 5% linear bias field (1 +- 0.05 y or x, y and x in [-1, 1] over the slice).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from diffusion_engine.aging.evaluate import load_pair, longitudinal_pairs
from diffusion_engine.aging.onls import predict
from diffusion_engine.aging.pipeline import model_spec, resolve_model
from diffusion_engine.manifest import read_manifest

BRIGHTNESS = 0.05


def brightness_variants(x: torch.Tensor) -> list[torch.Tensor]:
    """x [S, C, H, W] in [-1, 1] with its brain (above the background) under +-5% gain and linear bias fields."""
    h, w = x.shape[-2:]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    fields = [torch.ones(h, w), yy, xx]
    return [((x + 1) * (1 + sign * BRIGHTNESS * field) - 1).clamp(-1, 1) for field in fields for sign in (1, -1)]


def regressor_report(model: str, manifest: str, split: str) -> dict[str, float]:
    bundle = resolve_model(model)
    spec, regressor = model_spec(bundle), bundle.networks["regressor"]
    table = read_manifest(manifest, require=("age",), modalities=spec.modalities)
    train_ages = [float(a) for a in bundle.config["training"]["train_ages"]]

    def years(x: torch.Tensor) -> np.ndarray:
        return np.asarray(spec.ages.years(predict(regressor, x, 0, 64)[:, 0].numpy()))

    errors, constant, response, brightness, slices, ages = [], [], [], [], [], []
    for baseline, followup in longitudinal_pairs(table.split(split)):
        pair = load_pair(baseline, followup, spec, spec.central_slices)
        x, f = torch.from_numpy(pair.baseline).float(), torch.from_numpy(pair.followup).float()
        before, after = years(x), years(f)
        for visit, age in ((before, pair.age), (after, pair.target)):
            errors.append(abs(visit.mean() - age))
            constant.append(abs(np.mean(train_ages) - age))
            slices.extend(visit)
            ages.extend([age] * len(visit))
        response.append((after.mean() - before.mean()) / (pair.target - pair.age))
        brightness.append(max(abs(years(v).mean() - before.mean()) for v in brightness_variants(x)))
    return {"pairs": len(response), "age_error": float(np.mean(errors)), "constant_error": float(np.mean(constant)),
            "r": float(np.corrcoef(slices, ages)[0, 1]), "aging_response": float(np.mean(response)),
            "brightness_response": float(np.mean(brightness))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--models", nargs="+", required=True, help="aging model folders (or 'demo')")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", help="markdown file to write (default: print only)")
    args = parser.parse_args()
    lines = [f"# Aging regressors on the '{args.split}' pairs of {args.manifest}", "",
             "```", "python Engine/evaluations/aging_regressor.py " + " ".join(sys.argv[1:]), "```", "",
             "| model | pairs | age error (years) | constant predictor | r | aging response (years/year) | "
             "brightness response (years, 5%) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for model in args.models:
        m = regressor_report(model, args.manifest, args.split)
        lines.append(f"| {Path(model).name} | {m['pairs']} | {m['age_error']:.2f} | {m['constant_error']:.2f} | "
                     f"{m['r']:.2f} | {m['aging_response']:.2f} | {m['brightness_response']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
