# Sourced by the anomaly evaluation scripts: the held-out cohorts every AnoFPDM model here is calibrated and scored on,
# so that their rows compare. Calibration (seed 31, 8 validation subjects) and the standard (seed 101) and hard
# (seed 102) test cohorts share no subject with each other or with any training cohort (seeds 21 and 22).
#   source anomaly_cohorts.sh && make_evaluation_cohorts      (in the work folder; needs a run() function)
make_evaluation_cohorts() {
    run diffusion-engine phantoms anomaly --out calibration --subjects 10 --spacing 2 --seed 31 --difficulty mixed \
        --split 0.1,0.8,0.1 --overwrite
    local difficulty seed
    for difficulty in standard hard; do
        seed=$([ "$difficulty" = standard ] && echo 101 || echo 102)
        run diffusion-engine phantoms anomaly --out "test-$difficulty" --subjects 13 --spacing 2 --seed "$seed" \
            --difficulty "$difficulty" --split 0.08,0.31,0.61 --overwrite
    done
}
