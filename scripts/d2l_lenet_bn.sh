#!/usr/bin/env bash
# Dive into Deep Learning's BN LeNet on Fashion-MNIST, with and without BN
# (configs/experiment/d2l_lenet_bn.yaml), in parallel local processes, then the report.
#
#   scripts/d2l_lenet_bn.sh
#   SEEDS=0,1,2 scripts/d2l_lenet_bn.sh train.epochs=5     # extra args are overrides
#
# Environment: SEEDS (0), N_JOBS (parallel jobs, 2), SWEEP (the sweep directory; default
# outputs/multirun/d2l_lenet_bn-<date>-<time>), BNLAB (bnlab).
set -euo pipefail

SEEDS="${SEEDS:-0}"
N_JOBS="${N_JOBS:-2}"
SWEEP="${SWEEP:-outputs/multirun/d2l_lenet_bn-$(date +%Y-%m-%d-%H-%M-%S)-$$}"
BNLAB="${BNLAB:-bnlab}"

$BNLAB train -m experiment=d2l_lenet_bn norm=none,bn seed="$SEEDS" \
    hydra/launcher=joblib hydra.launcher.n_jobs="$N_JOBS" hydra.sweep.dir="$SWEEP" "$@"
$BNLAB report "$SWEEP" --out "$SWEEP/report"
echo "sweep: $SWEEP"
