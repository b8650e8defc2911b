#!/usr/bin/env bash
# Santurkar et al. 2018, Sec. 2: no norm vs BN vs noisy BN, with gradient-based ICS
# (configs/experiment/santurkar_noisy_bn.yaml: VGG on CIFAR-10, GPU advised; TIER=small runs
# santurkar_noisy_bn_small.yaml: a small VGG on Fashion-MNIST, minutes on a laptop CPU).
#
#   TIER=small scripts/santurkar_noisy_bn.sh
#   scripts/santurkar_noisy_bn.sh device=cuda              # the paper's setting; extra args are overrides
#
# Environment: TIER (full | small; full), SEEDS (0), N_JOBS (parallel jobs, 2; use 1 on one GPU),
# SWEEP (the sweep directory; default outputs/multirun/<preset>-<date>-<time>), BNLAB (bnlab).
set -euo pipefail

TIER="${TIER:-full}"
case "$TIER" in
    full) PRESET=santurkar_noisy_bn ;;
    small) PRESET=santurkar_noisy_bn_small ;;
    *) echo "TIER=$TIER is not valid: expected full or small" >&2; exit 2 ;;
esac
SEEDS="${SEEDS:-0}"
N_JOBS="${N_JOBS:-2}"
SWEEP="${SWEEP:-outputs/multirun/$PRESET-$(date +%Y-%m-%d-%H-%M-%S)-$$}"
BNLAB="${BNLAB:-bnlab}"

$BNLAB train -m experiment="$PRESET" norm=none,bn,noisy_bn seed="$SEEDS" \
    hydra/launcher=joblib hydra.launcher.n_jobs="$N_JOBS" hydra.sweep.dir="$SWEEP" "$@"
$BNLAB report "$SWEEP" --out "$SWEEP/report"
echo "sweep: $SWEEP"
