#!/usr/bin/env bash
# Santurkar et al. 2018, Fig. 5(b): a 25-layer deep linear network with and without BN, with
# gradient-based ICS (configs/experiment/santurkar_dln.yaml). A regression: the report times
# test/loss, not accuracy.
#
#   scripts/santurkar_dln.sh
#   STEPS=2000 scripts/santurkar_dln.sh                    # a shorter run
#
# Environment: STEPS (10000), SEEDS (0), N_JOBS (parallel jobs, 2), SWEEP (the sweep directory;
# default outputs/multirun/santurkar_dln-<date>-<time>), BNLAB (bnlab).
set -euo pipefail

STEPS="${STEPS:-10000}"
SEEDS="${SEEDS:-0}"
N_JOBS="${N_JOBS:-2}"
SWEEP="${SWEEP:-outputs/multirun/santurkar_dln-$(date +%Y-%m-%d-%H-%M-%S)-$$}"
BNLAB="${BNLAB:-bnlab}"

$BNLAB train -m experiment=santurkar_dln norm=none,bn seed="$SEEDS" train.steps="$STEPS" \
    hydra/launcher=joblib hydra.launcher.n_jobs="$N_JOBS" hydra.sweep.dir="$SWEEP" "$@"
$BNLAB report "$SWEEP" --out "$SWEEP/report" --metric test/loss
echo "sweep: $SWEEP"
