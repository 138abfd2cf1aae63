#!/usr/bin/env bash
# Rebuild the bundled ONLS aging demo model and its held-out evaluation from nothing (CPU, about 3 hours on 2 cores).
#   bash Engine/evaluations/aging_demo.sh [WORK_DIR]      (default ./aging-demo-work)
# One longitudinal phantom cohort (seed 7): 'train' subjects (one visit each) train the networks, 'val' subjects
# calibrate zeta and c, 'test' subjects (never seen before) give the table. Results land in Engine/evaluations/aging/.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-aging-demo-work}"
mkdir -p "$work" && cd "$work"
run() { echo "+ $*" >&2; "$@"; }

run diffusion-engine --progress none phantoms aging --out cohort --subjects 150 --spacing 2 --seed 7 \
    --age-range 50,90 --overwrite
# The regressor first learns on nearly clean slices (t < T/10), then on uniform t, always under random smooth
# intensity fields (see aging/training.py).
run diffusion-engine train aging --manifest cohort/manifest.csv --out model --steps 2000 --batch-size 8 \
    --regressor-steps 2500 --regressor-low-noise-steps 2500 --regressor-batch-size 12 --lr 3e-4 --regressor-lr 1e-3 \
    --seed 0 --device cpu
# The default grid: zeta 1e-4, 3e-4, 1e-3 x c 30, 100, 300, 1000 (23 minutes here).
run diffusion-engine --progress none calibrate aging --model model --manifest cohort/manifest.csv --device cpu
# The paper's sweep L = 1.0 .. 0.4, and 0.3 beside it (ONLS may choose L below 0.4), on all 30 test subjects
# (about 90 minutes): the methods differ by hundredths of a dB, far less than subjects differ from each other.
run diffusion-engine --progress none evaluate aging --model model --manifest cohort/manifest.csv --split test \
    --noise-levels 1.0,0.9,0.8,0.7,0.6,0.5,0.4,0.3 --out "$here/aging/test" --device cpu
# Every brain slice changed (--central-slices 0): the variance rule on the model's 16-slice slab (the default) vs on
# every slice (--variance-slices 0).
for rule in slab every; do
    run diffusion-engine --progress none evaluate aging --model model --manifest cohort/manifest.csv --split test \
        --central-slices 0 $([ $rule = every ] && echo --variance-slices 0) --noise-levels "" --sweep "" \
        --max-subjects 6 --no-figure --out "$here/aging/all-slices-rule-$rule" --device cpu
done
# What the regressor reads: age error, response to the real aging of each test pair, response to brightness.
run python "$here/aging_regressor.py" --manifest cohort/manifest.csv --models model --out "$here/aging/regressor.md"
# How much PSNR against the follow-up aging alone can gain over the unchanged input (noise-free re-render).
run python "$here/aging_noise_ceiling.py" --manifest cohort/manifest.csv --model model --max-subjects 6 \
    --out "$here/aging/noise_ceiling.md"
run python "$here/store_demo_model.py" model "$here/../src/diffusion_engine/data/models/aging-demo"
run python "$here/../benchmarks/aging_speed.py" --out "$here/../benchmarks/results/aging_speed_cpu.md"
