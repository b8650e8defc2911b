#!/usr/bin/env bash
# BN vs Batch Renorm vs layer norm as the batch shrinks (configs/experiment/brn_small_batch.yaml):
# norm=bn,brn,ln x train.batch_size=2,4,8,32 (12 runs) in parallel local processes, then the report.
#
#   scripts/brn_small_batch.sh
#   SEEDS=0,1 N_JOBS=4 scripts/brn_small_batch.sh norm=bn,brn,ln,gn norm.groups=2   # extra overrides
#
# Environment: SEEDS (0), N_JOBS (parallel jobs, 2), SWEEP (the sweep directory; default
# outputs/multirun/brn_small_batch-<date>-<time>), BNLAB (bnlab).
set -euo pipefail

SEEDS="${SEEDS:-0}"
N_JOBS="${N_JOBS:-2}"
SWEEP="${SWEEP:-outputs/multirun/brn_small_batch-$(date +%Y-%m-%d-%H-%M-%S)-$$}"
BNLAB="${BNLAB:-bnlab}"

$BNLAB train -m experiment=brn_small_batch norm=bn,brn,ln train.batch_size=2,4,8,32 seed="$SEEDS" \
    hydra/launcher=joblib hydra.launcher.n_jobs="$N_JOBS" hydra.sweep.dir="$SWEEP" "$@"
$BNLAB report "$SWEEP" --out "$SWEEP/report"
echo "sweep: $SWEEP"
