#!/usr/bin/env bash
# Rebuild the bundled restoration demo models and their held-out evaluation from nothing (CPU, about 2.5 hours on
# 2 cores: the two training queues run side by side, one per core).
#   bash Engine/evaluations/restore_demo.sh [WORK_DIR]      (default ./restore-demo-work)
# Clean ground truth: noise-free phantom cohorts (training seed 41, test seed 141, no shared subject). Models are
# convolutional (preset tiny-conv) and train on random 32-pixel crops of the 64-pixel T1 slices; they restore
# whole slices. Results land in Engine/evaluations/restore/; demo models in the package's data/models/.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
models="$here/../src/diffusion_engine/data/models"
work="${1:-restore-demo-work}"
mkdir -p "$work" && cd "$work"
run() { echo "+ $*" >&2; "$@"; }

run diffusion-engine phantoms anomaly --noise-free --out train --subjects 40 --seed 41 --split 0.8,0.1,0.1 --overwrite
run diffusion-engine phantoms anomaly --noise-free --out test --subjects 10 --seed 141 --split 0.1,0.1,0.8 --overwrite
train() { name=$1; shift; run env OMP_NUM_THREADS=1 diffusion-engine --progress none train restore \
    --manifest train/manifest.csv --out "$name" --preset tiny-conv --crop 32 --batch-size 16 --lr 4e-4 --ema 0.998 \
    --device cpu "$@"; }
(
    train denoise-ddpm --task denoise --method ddpm --steps 2000
    train denoise-conditional --task denoise --method conditional --steps 2000
    train impute-conditional --task impute --method conditional --steps 2000
) &
train superres-cvdm --task superres --method cvdm --steps 1500
train superres-cvdm-simple --task superres --method cvdm-simple --steps 1500
train superres-cvdm-linear --task superres --method cvdm-linear --steps 1500
train denoise-cvdm --task denoise --method cvdm --steps 1500
wait
# where each conditional/CVDM model's sampling chain starts, chosen on the training cohort's validation slices
# (not for the DDPM and conditional denoisers: they enter at the step that matches the input's noise)
for name in superres-cvdm superres-cvdm-simple superres-cvdm-linear impute-conditional denoise-cvdm; do
    run env OMP_NUM_THREADS=1 diffusion-engine --progress none calibrate restore --model "$name" \
        --manifest train/manifest.csv
done
run env OMP_NUM_THREADS=2 diffusion-engine --progress none evaluate restore --manifest test/manifest.csv \
    --models denoise-ddpm denoise-conditional denoise-cvdm impute-conditional superres-cvdm superres-cvdm-simple \
    superres-cvdm-linear --slices 16 --samples 3 --cvdm-steps 100 --out "$here/restore"
# the demo model of each task (chosen from the table in $here/restore/README.md)
run python3 "$here/store_demo_model.py" denoise-ddpm "$models/restore-denoise-demo"
run python3 "$here/store_demo_model.py" impute-conditional "$models/restore-impute-demo"
run python3 "$here/store_demo_model.py" superres-cvdm "$models/restore-superres-demo"
# wholly missing axial slices, filled by the impute demo model in coronal slices, vs linear interpolation
run python3 "$here/restore_missing_slices.py" --manifest test/manifest.csv --subjects 3 --out "$here/restore/missing_slices.md"
