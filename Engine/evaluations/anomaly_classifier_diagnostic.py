"""How well does the diffusion classifier's evidence separate healthy from unhealthy validation slices, per timestep?

    python Engine/evaluations/anomaly_classifier_diagnostic.py --manifest calibration/manifest.csv \
        [--model demo] [--out classifier.md]

For each timestep t = 25, 75, ..., 975 (of T = 1000) the evidence of `anomaly.classifier.unhealthy_evidence` at that
one timestep (healthy-label minus unhealthy-label denoising error, the same noise for both labels and every slice)
is scored by its AUROC against the image-level labels of the manifest's 'val' slices (as `calibrate anomaly` reads
them); then the evidence the engine uses (the mean over classifier.TIMESTEP_FRACTIONS), with its default noise seed
and four others (is the decision a lucky noise draw?). Beside them, the paper's
cosine and the peak divergence M_te at the model's calibrated w, and calling every slice healthy. Image-level labels
only; nothing here is tuned.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from anomaly_guidance_diagnostic import auroc

from diffusion_engine.anomaly.calibrate import _validation_slices
from diffusion_engine.anomaly.classifier import classifier_noise, classifier_timesteps, unhealthy_evidence
from diffusion_engine.anomaly.decision import cosine_similarity
from diffusion_engine.anomaly.pipeline import AnomalySettings, class_evidence, model_spec, resolve_model, run_forward


def per_timestep_auroc(bundle, images: np.ndarray, labels: np.ndarray, timesteps: list[int]) -> list[float]:
    spec, schedule, network = model_spec(bundle), bundle.schedule(), bundle.networks["eps"]
    x0 = torch.from_numpy(np.asarray(images, dtype=np.float32))
    scores = []
    for k, t in enumerate(timesteps):
        noise = classifier_noise(x0.shape[1:], 1, seed=k)
        evidence = torch.cat([unhealthy_evidence(network, schedule, x0[i : i + 64], healthy_label=spec.healthy_label,
                                                 unhealthy_label=spec.unhealthy_label, timesteps=[t], noise=noise)
                              for i in range(0, len(x0), 64)])
        scores.append(auroc(labels, evidence.numpy()))
        print(f"t = {t}: AUROC {scores[-1]:.3f}", file=sys.stderr)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", required=True, help="manifest with a 'val' split (image-level labels)")
    parser.add_argument("--model", default="demo", help="anomaly model folder (default: the bundled demo model)")
    parser.add_argument("--out", default=None, help="markdown file to write (default: print)")
    args = parser.parse_args()

    bundle = resolve_model(args.model, device="cpu")
    _, rows, data = _validation_slices(args.manifest, model_spec(bundle), f"reading {args.model}")
    labels = data.unhealthy.astype(int)
    T = bundle.schedule().num_timesteps
    timesteps = list(range(T // 40, T, T // 20))
    per_t = per_timestep_auroc(bundle, data.images, labels, timesteps)
    settings = AnomalySettings(device="cpu").validate()
    evidence, _ = class_evidence(bundle, data.images, settings)
    other_seeds = [auroc(labels, class_evidence(bundle, data.images, AnomalySettings(device="cpu", seed=seed))[0])
                   for seed in range(1, 5)]
    w = float((bundle.config.get("calibration") or {}).get("w", 2.0))
    run = run_forward(bundle, data.images, settings, w=w, task="forward pass")
    lines = [
        f"# The diffusion classifier on validation slices: `{args.model}`", "",
        "```", f"python Engine/evaluations/anomaly_classifier_diagnostic.py --manifest {args.manifest} "
               f"--model {args.model}", "```", "",
        f"{len(rows)} validation cases, {len(labels)} slices ({labels.sum()} unhealthy); image-level labels only. "
        "AUROC: the probability that a random unhealthy slice scores above a random healthy one (0.5 = chance).", "",
        "| slice score | AUROC |", "| --- | ---: |",
        *(f"| evidence at t = {t} alone | {a:.3f} |" for t, a in zip(timesteps, per_t, strict=True)),
        f"| **evidence the engine uses: mean over t = {', '.join(map(str, classifier_timesteps(T)))}** | "
        f"**{auroc(labels, evidence):.3f}** |",
        f"| the same with noise seeds 1-4 instead of 0 | {', '.join(f'{a:.3f}' for a in other_seeds)} |",
        f"| 1 - cos(MSE^h, MSE^u) at w = {w:g} (the paper's decision score) | "
        f"{auroc(labels, -cosine_similarity(run.mse_healthy, run.mse_reference).numpy()):.3f} |",
        f"| M_te at w = {w:g} | {auroc(labels, run.peak_divergence.mean(dim=1).numpy()):.3f} |", "",
        f"Calling every slice healthy is right for {1 - labels.mean():.3f} of them.", "",
    ]
    text = "\n".join(lines)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
