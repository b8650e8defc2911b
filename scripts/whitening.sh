#!/usr/bin/env bash
# BN vs batch whitening by ZCA, PCA and IterNorm (configs/experiment/whitening.yaml; Huang et al.
# 2018). norm.method exists only for norm=whiten, so this runs two sweeps into sibling folders of
# one directory, $SWEEP/bn and $SWEEP/whiten, and reports on both together.
#
#   scripts/whitening.sh
#   SEEDS=0,1 scripts/whitening.sh train.steps=2000        # extra args go to both sweeps
#
# Environment: SEEDS (0), N_JOBS (parallel jobs, 2), SWEEP (the parent directory; default
# outputs/multirun/whitening-<date>-<time>), BNLAB (bnlab).
set -euo pipefail

SEEDS="${SEEDS:-0}"
N_JOBS="${N_JOBS:-2}"
SWEEP="${SWEEP:-outputs/multirun/whitening-$(date +%Y-%m-%d-%H-%M-%S)-$$}"
BNLAB="${BNLAB:-bnlab}"
LAUNCH=(hydra/launcher=joblib hydra.launcher.n_jobs="$N_JOBS")

$BNLAB train -m experiment=whitening norm=bn seed="$SEEDS" \
    "${LAUNCH[@]}" hydra.sweep.dir="$SWEEP/bn" "$@"
$BNLAB train -m experiment=whitening norm=whiten norm.method=zca,pca,iter seed="$SEEDS" \
    "${LAUNCH[@]}" hydra.sweep.dir="$SWEEP/whiten" "$@"
$BNLAB report "$SWEEP" --out "$SWEEP/report"
echo "sweep: $SWEEP"
