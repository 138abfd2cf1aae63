#!/usr/bin/env bash
# One AnoFPDM training variant beside the bundled demo model: the larger-cohort recipe (anomaly_larger_cohort.sh:
# dropout 0.1, 8,000 steps of 16 slices) on a training cohort of its own, calibrated with the default `--decision auto`
# on the demo model's calibration cohort and scored on the same held-out test cohorts and the bundled demo case.
#   bash Engine/evaluations/anomaly_variant.sh WORK_DIR NAME SUBJECTS SEED MODALITIES [SCORE_MODALITIES]
# SUBJECTS phantoms are generated with SEED (60% of them train); MODALITIES are the network's inputs, SCORE_MODALITIES
# (default: all of them) the channels whose maps are scored. Results land in Engine/evaluations/anomaly/NAME/.
# CPU, about 2.5 hours on 2 cores (training about 2 h; each evaluation 4-7 min). The variants measured:
#   bash Engine/evaluations/anomaly_variant.sh work-t1 t1-input 400 21 flair,t1,t2 flair,t2
#       T1 as an extra network input, FLAIR and T2 scored, as the authors' code trains on all four BraTS channels
#       (the training cohort is the larger cohort's: 240 subjects); with two diagnostics on the hard cohort
#   bash Engine/evaluations/anomaly_variant.sh work-480 larger-cohort-480 800 22 flair,t2
#       twice the larger cohort's training subjects (480), FLAIR and T2
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ $# -lt 5 ]; then sed -n 2,14p "$0" >&2; exit 2; fi
work="$1" name="$2" subjects="$3" seed="$4" modalities="$5" scored="${6:-$5}"
results="$here/anomaly/$name"
mkdir -p "$work" "$results" && cd "$work"
run() { echo "+ $*" >&2; "$@"; }

run diffusion-engine phantoms anomaly --out train --subjects "$subjects" --spacing 2 --seed "$seed" --difficulty mixed \
    --overwrite
run diffusion-engine train anomaly --manifest train/manifest.csv --out model --preset tiny --image-size 64 \
    --steps 8000 --batch-size 16 --lr 4e-4 --ema 0.999 --dropout 0.1 --checkpoint-every 1000 --seed 0 --device cpu \
    --modalities "$modalities" --score-modalities "$scored"
# the demo model's calibration and test cohorts (anomaly_cohorts.sh)
source "$here/anomaly_cohorts.sh" && make_evaluation_cohorts
run diffusion-engine calibrate anomaly --model model --manifest calibration/manifest.csv --device cpu
evaluate() { run env OMP_NUM_THREADS=1 diffusion-engine --progress none evaluate anomaly --split test --val-split val \
    --device cpu "$@"; }
evaluate --model model --manifest test-hard/manifest.csv --out "$results/hard" --variants anofpdm intensity &
evaluate --model model --manifest test-standard/manifest.csv --out "$results/standard" --variants anofpdm intensity
wait
# Diagnostics on the hard cohort when some inputs are not scored (not the method): the same model at w = 10 (the
# larger FLAIR + T2 model's w), and scoring every input (score_modalities dropped from a copy's model.json, recalibrated)
if [ "$scored" != "$modalities" ]; then
rm -rf model-w10 model-score-all && cp -r model model-w10 && cp -r model model-score-all
run diffusion-engine calibrate anomaly --model model-w10 --manifest calibration/manifest.csv --device cpu --w-grid 10
python - model-score-all/model.json <<'EOF_JSON'
import json, sys
config = json.load(open(sys.argv[1]))
config["preprocessing"].pop("score_modalities")
config["calibration"] = {}
json.dump(config, open(sys.argv[1], "w"), indent=1)
EOF_JSON
run diffusion-engine calibrate anomaly --model model-score-all --manifest calibration/manifest.csv --device cpu
evaluate --model model-w10 --manifest test-hard/manifest.csv --out "$results/hard-w10" --variants anofpdm --no-figure &
evaluate --model model-score-all --manifest test-hard/manifest.csv --out "$results/hard-score-all" --variants anofpdm \
    --no-figure
wait
fi
run python "$here/anomaly_threshold_ceiling.py" --manifest test-hard/manifest.csv --models model \
    --out "$results/threshold-ceiling.md"
# The bundled demo case (a phantom with a tumour that no model saw): whole-volume Dice, with and without the decision
run diffusion-engine --progress none anomaly --model model --input demo --output-label demo.nii.gz --device cpu \
    --report demo.json
run diffusion-engine --progress none anomaly --model model --input demo --no-decision --device cpu \
    --output-label demo-no-decision.nii.gz
run python "$here/anomaly_demo_case_dice.py" --out "$results/demo-case.md" "decision on=demo.nii.gz" \
    "decision off=demo-no-decision.nii.gz"
