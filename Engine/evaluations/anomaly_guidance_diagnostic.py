"""Which guidance strength w makes AnoFPDM's slice scores separate healthy from unhealthy slices? Image labels only.

    python Engine/evaluations/anomaly_guidance_diagnostic.py --manifest calibration/manifest.csv \
        --models MODEL [MODEL ...] [--out guidance.md]

The paper picks w by the accuracy of the thresholded cosine decision on validation slices. With a small model and
mostly healthy slices that accuracy stays near the all-healthy rate at every w, so it cannot rank w. This script
scores, per w and on the same validation slices (the manifest's 'val' split, image-level labels only, as
`calibrate anomaly` reads them), how well three slice scores rank unhealthy above healthy slices (AUROC; 0.5 =
chance):

- 1 - cos(MSE^h, MSE^u): the paper's decision score, before its threshold;
- M_te: the peak divergence between the healthy-guided and unconditional predictions;
- map q99: the 99th percentile of the aggregated anomaly map H inside the brain (a slice-level view of the map the
  segmentation thresholds).

A rule that follows map quality without pixel labels would pick the w where these peak. Nothing here is tuned.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from diffusion_engine.anomaly.calibrate import DEFAULT_W_GRID, _validation_slices
from diffusion_engine.anomaly.decision import cosine_similarity
from diffusion_engine.anomaly.pipeline import AnomalySettings, model_spec, resolve_model, run_forward
from diffusion_engine.metrics import brain_pixels

SCORES = ("1 - cos", "M_te", "map q99")


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Probability that a random unhealthy slice scores above a random healthy one (ties count half)."""
    ranks = stats.rankdata(scores)
    positives = int(labels.sum())
    negatives = labels.size - positives
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def slice_scores(run, images: np.ndarray) -> dict[str, np.ndarray]:
    """The three slice scores of one ForwardRun (see the module docstring)."""
    maps = run.aggregated.mean(dim=1)
    brain = torch.from_numpy(brain_pixels(images))
    q99 = np.array([torch.quantile(m[b], 0.99).item() if b.any() else 0.0 for m, b in zip(maps, brain, strict=True)])
    return {"1 - cos": -cosine_similarity(run.mse_healthy, run.mse_reference).numpy(),
            "M_te": run.peak_divergence.mean(dim=1).numpy(), "map q99": q99}


def model_table(model: str, manifest: str, grid: list[float]) -> list[str]:
    bundle = resolve_model(model, device="cpu")  # "demo" is the bundled model, as for every command
    _, rows, data = _validation_slices(manifest, model_spec(bundle), f"reading {model}")
    runs = run_forward(bundle, data.images, AnomalySettings().validate(), w=grid, task=f"forward passes of {model}")
    labels = data.unhealthy.astype(int)
    lines = [f"## `{model}`", "", f"{len(rows)} validation cases, {len(labels)} slices ({labels.sum()} unhealthy); "
             f"calibrated w: {bundle.config.get('calibration', {}).get('w')}", "",
             "| w | " + " | ".join(f"AUROC {name}" for name in SCORES) + " |", "|---:|" + "---:|" * len(SCORES)]
    for w, run in zip(grid, runs, strict=True):
        scores = slice_scores(run, data.images)
        lines.append(f"| {w:g} | " + " | ".join(f"{auroc(labels, scores[n]):.3f}" for n in SCORES) + " |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", required=True, help="manifest whose 'val' split holds the validation cases")
    parser.add_argument("--models", nargs="+", required=True, help="anomaly model folders, or demo")
    parser.add_argument("--out", help="markdown file to write (default: print)")
    args = parser.parse_args(argv)
    lines = ["# AnoFPDM slice scores per guidance strength (validation slices, image-level labels only)", "",
             "```", " ".join(["python", "Engine/evaluations/anomaly_guidance_diagnostic.py", *sys.argv[1:]]), "```",
             ""]
    for model in args.models:
        lines += model_table(model, args.manifest, list(DEFAULT_W_GRID))
    text = "\n".join(lines)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
