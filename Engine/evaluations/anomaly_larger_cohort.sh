#!/usr/bin/env bash
# Does a larger training cohort help AnoFPDM? The bundled demo model's recipe (anomaly_demo.sh) with 240 training
# subjects instead of 60, UNet dropout 0.1 and 4x the optimiser steps; calibrated on the same cohort as the demo
# model (the full w grid, then w = 30 alone, the demo model's w) and evaluated on the same held-out test cohorts.
# CPU, about 1.5 hours on 2 cores (training 60 min).
#   bash Engine/evaluations/anomaly_larger_cohort.sh [WORK_DIR]      (default ./anomaly-larger-cohort-work)
# Results land in Engine/evaluations/anomaly/larger-cohort/. The model is not shipped (see the README there).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-anomaly-larger-cohort-work}"
results="$here/anomaly/larger-cohort"
mkdir -p "$work" && cd "$work"
run() { echo "+ $*" >&2; "$@"; }

run diffusion-engine phantoms anomaly --out train --subjects 400 --spacing 2 --seed 21 --difficulty mixed --overwrite
run diffusion-engine train anomaly --manifest train/manifest.csv --out model --preset tiny --image-size 64 \
    --steps 8000 --batch-size 16 --lr 4e-4 --ema 0.999 --dropout 0.1 --checkpoint-every 2000 --seed 0 --device cpu
# the demo model's calibration and test cohorts (same seeds and sizes as anomaly_demo.sh)
run diffusion-engine phantoms anomaly --out calibration --subjects 10 --spacing 2 --seed 31 --difficulty mixed \
    --split 0.1,0.8,0.1 --overwrite
for difficulty in standard hard; do
    seed=$([ "$difficulty" = standard ] && echo 101 || echo 102)
    run diffusion-engine phantoms anomaly --out "test-$difficulty" --subjects 13 --spacing 2 --seed "$seed" \
        --difficulty "$difficulty" --split 0.08,0.31,0.61 --overwrite
done
run diffusion-engine calibrate anomaly --model model --manifest calibration/manifest.csv --device cpu
rm -rf model-w30 && cp -r model model-w30
run diffusion-engine calibrate anomaly --model model-w30 --manifest calibration/manifest.csv --device cpu --w-grid 30
evaluate() { run env OMP_NUM_THREADS=1 diffusion-engine --progress none evaluate anomaly --split test --val-split val \
    --device cpu --no-figure "$@"; }
for model in model model-w30; do
    suffix=$([ "$model" = model ] && echo calibrated || echo w30)
    evaluate --model "$model" --manifest test-hard/manifest.csv --out "$results/hard-$suffix" --variants anofpdm &
    evaluate --model "$model" --manifest test-standard/manifest.csv --out "$results/standard-$suffix" \
        --variants anofpdm
    wait
done
