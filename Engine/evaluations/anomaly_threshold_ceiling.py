"""Is AnoFPDM's unhealthy Dice limited by its maps or by its threshold? Ceilings from the lesion masks.

    python Engine/evaluations/anomaly_threshold_ceiling.py --manifest test-hard/manifest.csv \
        --models demo MODEL [--split test] [--out threshold-ceiling.md]

For each model: the anomaly maps H (median-filtered) of the split's slices with lesion pixels, as `evaluate anomaly`
makes them, scored by per-slice Dice averaged over those slices (the "unhealthy" setting) under
- Algorithm 1 (the engine's masks, small components removed): what `evaluate anomaly` reports;
- one threshold for all slices, the best one in hindsight (oracle, no component removal);
- each slice's own best threshold in hindsight (oracle, no component removal): no rule that thresholds H slice by
  slice can do better.
The oracles read the lesion masks: a diagnostic, not a method. If the per-slice ceiling is far above Algorithm 1 a
better threshold rule could help; if it is near, the maps themselves must improve.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from diffusion_engine.anomaly.evaluate import run_evaluation
from diffusion_engine.metrics import dice

LEVELS = np.linspace(0.0, 1.0, 201)  # candidate thresholds: quantiles of a slice's map (per-slice oracle)


def per_slice_best(score: np.ndarray, truth: np.ndarray) -> float:
    """Best Dice of score >= q over q among the slice's own map quantiles."""
    return max(dice(score >= q, truth) for q in np.unique(np.quantile(score, LEVELS)))


def global_best(scores: np.ndarray, truths: np.ndarray) -> tuple[float, float]:
    """(mean per-slice Dice, threshold) of the best single threshold for every slice."""
    candidates = np.unique(np.quantile(scores[scores > 0], np.linspace(0.5, 0.999, 200)))
    means = [float(np.mean(dice(scores >= c, truths, per_slice=True))) for c in candidates]
    best = int(np.argmax(means))
    return means[best], float(candidates[best])


def ceiling_rows(model: str, manifest: str, split: str) -> list[str]:
    evaluation = run_evaluation(model, manifest, split=split, variants=["anofpdm"])
    run = evaluation.runs[0]
    lesion = evaluation.truth.reshape(len(evaluation.truth), -1).any(axis=1)
    scores, truths = run.score[lesion], evaluation.truth[lesion]
    engine = run.metrics["unhealthy"]["dice"]  # what `evaluate anomaly` reports
    single, threshold = global_best(scores, truths)
    own = np.mean([per_slice_best(s, t) for s, t in zip(scores, truths, strict=True)])
    return [f"| {model} | {lesion.sum()} | {100 * engine:.1f} | {100 * single:.1f} (H >= {threshold:.3g}) | "
            f"{100 * own:.1f} |"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--models", nargs="+", default=["demo"])
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", default="threshold-ceiling.md")
    args = parser.parse_args(argv)
    lines = ["# Unhealthy Dice: Algorithm 1 and the oracle thresholds of the same maps", "",
             f"Cohort `{args.manifest}`, split `{args.split}`; per-slice Dice in %, averaged over slices with lesion "
             "pixels. Made by `anomaly_threshold_ceiling.py`; the oracles read the lesion masks.", "",
             "| model | lesion slices | Algorithm 1 (engine) | best single threshold (oracle) | "
             "best threshold per slice (oracle) |", "| --- | ---: | ---: | ---: | ---: |"]
    for model in args.models:
        lines += ceiling_rows(model, args.manifest, args.split)
    Path(args.out).write_text("\n".join([*lines, ""]))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
