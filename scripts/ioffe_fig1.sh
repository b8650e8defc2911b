#!/usr/bin/env bash
# Ioffe & Szegedy 2015, Fig. 1: the sigmoid MLP with and without BN (configs/experiment/ioffe_fig1.yaml).
# Runs the sweep norm=none,bn in parallel local processes (Hydra's joblib launcher), then the report.
#
#   scripts/ioffe_fig1.sh                                   # MNIST, 50,000 steps, as in the paper
#   DATA=fashion_mnist STEPS=10000 scripts/ioffe_fig1.sh    # offline, a few minutes on a laptop CPU
#   SEEDS=0,1,2 scripts/ioffe_fig1.sh optim.lr=0.1          # more seeds; extra args are overrides
#
# Environment: DATA (mnist), STEPS (50000), EVAL_EVERY (500), SEEDS (0), N_JOBS (parallel jobs, 2),
# SWEEP (the sweep directory; default outputs/multirun/ioffe_fig1-<date>-<time>), BNLAB (bnlab).
set -euo pipefail

DATA="${DATA:-mnist}"
STEPS="${STEPS:-50000}"
EVAL_EVERY="${EVAL_EVERY:-500}"
SEEDS="${SEEDS:-0}"
N_JOBS="${N_JOBS:-2}"
SWEEP="${SWEEP:-outputs/multirun/ioffe_fig1-$(date +%Y-%m-%d-%H-%M-%S)-$$}"
BNLAB="${BNLAB:-bnlab}"

$BNLAB train -m experiment=ioffe_fig1 norm=none,bn seed="$SEEDS" \
    data="$DATA" train.steps="$STEPS" train.eval_every="$EVAL_EVERY" \
    hydra/launcher=joblib hydra.launcher.n_jobs="$N_JOBS" hydra.sweep.dir="$SWEEP" "$@"
$BNLAB report "$SWEEP" --out "$SWEEP/report"
echo "sweep: $SWEEP"
