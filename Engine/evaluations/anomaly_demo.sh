#!/usr/bin/env bash
# Rebuild the bundled AnoFPDM demo model and its held-out evaluation from nothing (CPU, about 2 hours on 2 cores).
#   bash Engine/evaluations/anomaly_demo.sh [WORK_DIR]      (default ./anomaly-demo-work)
# Every cohort has its own seed: training (seed 21), calibration (31) and the two test cohorts (101, 102) share
# no subject. Calibration uses image-level labels only; the baselines' thresholds use the test cohorts' own
# validation masks (which can only help them). Results land in Engine/evaluations/anomaly/.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-anomaly-demo-work}"
mkdir -p "$work" && cd "$work"
run() { echo "+ $*" >&2; "$@"; }

run diffusion-engine phantoms anomaly --out train --subjects 100 --spacing 2 --seed 21 --difficulty mixed --overwrite
run diffusion-engine train anomaly --manifest train/manifest.csv --out model --preset tiny --image-size 64 \
    --steps 2000 --batch-size 16 --lr 4e-4 --ema 0.998 --seed 0 --device cpu
source "$here/anomaly_cohorts.sh" && make_evaluation_cohorts  # calibration and test cohorts
run diffusion-engine calibrate anomaly --model model --manifest calibration/manifest.csv --device cpu
# The hard cohort is the one where hyperintensity alone fails: every method there. Two processes (one per core):
# the reconstruction baseline alone costs as much as three AnoFPDM passes.
evaluate() { run env OMP_NUM_THREADS=1 diffusion-engine --progress none evaluate anomaly --model model --split test --val-split val \
    --device cpu "$@"; }
evaluate --manifest test-hard/manifest.csv --out "$here/anomaly/hard" \
    --variants anofpdm last_sam fixed_noise fixed_threshold anofpdm_ddpm intensity &
evaluate --manifest test-hard/manifest.csv --out "$here/anomaly/hard-reconstruction" \
    --variants reconstruction intensity --reconstruction-stride 25 --no-figure
evaluate --manifest test-standard/manifest.csv --out "$here/anomaly/standard" --variants anofpdm last_sam intensity
wait
