#!/usr/bin/env bash
# Reproduce a preset end to end: its sweep (hydra.sweeper.params in
# configs/experiment/<preset>.yaml) over SEEDS in N_JOBS parallel processes (Hydra's joblib
# launcher), then `bnlab report` on the sweep, which judges the preset's claims.
#
#   scripts/reproduce.sh ioffe_fig1                          # the preset as published
#   scripts/reproduce.sh ioffe_fig1 data=fashion_mnist train.steps=3000   # extra args: Hydra overrides
#   SEEDS=0,1,2,3,4,5,6 N_JOBS=4 scripts/reproduce.sh lr_sensitivity
#
# Environment: SEEDS (0,1,2,3,4: with 5 seeds per group, the report's exact test gives p = 1/252
# when the groups separate completely, below Holm's strictest threshold 0.05/m for up to 12
# claims; 3 seeds give at best 1/20 = 0.05, which never passes), N_JOBS (parallel
# processes, 2; 1 on one GPU), SWEEP (the sweep directory; default
# outputs/multirun/<preset>-<date>-<time>-<pid>), REPORT_ARGS (more `bnlab report` options,
# e.g. "--x optim.lr"), BNLAB (the command; default bnlab).
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help || "$1" == *=* ]]; then
    echo "usage: scripts/reproduce.sh <preset> [overrides...]   (presets: configs/experiment/*.yaml)" >&2
    exit 2
fi
PRESET="$1"
shift
SEEDS="${SEEDS:-0,1,2,3,4}"
N_JOBS="${N_JOBS:-2}"
SWEEP="${SWEEP:-outputs/multirun/$PRESET-$(date +%Y-%m-%d-%H-%M-%S)-$$}"
BNLAB="${BNLAB:-bnlab}"
read -r -a REPORT_OPTIONS <<< "${REPORT_ARGS:-}"

# wall, user and system seconds of the sweep and the report, children included
TIMEFORMAT='%R %U %S'
exec 3>&2  # the commands' own stderr stays on the terminal; only the timing goes to the file
{ time {
    $BNLAB train -m experiment="$PRESET" seed="$SEEDS" \
        hydra/launcher=joblib hydra.launcher.n_jobs="$N_JOBS" hydra.sweep.dir="$SWEEP" "$@" 2>&3
    $BNLAB report "$SWEEP" --out "$SWEEP/report" "${REPORT_OPTIONS[@]}" 2>&3
} ; } 2> "$SWEEP.time"
read -r wall user sys < "$SWEEP.time" && rm -f "$SWEEP.time"
# what made this sweep, for scripts/presets_table.py
python3 - "$SWEEP/report/reproduce.json" "$PRESET" "$SEEDS" "$N_JOBS" "$wall" "$user" "$sys" "$@" <<'PY'
import json, sys
path, preset, seeds, jobs, wall, user, system, *overrides = sys.argv[1:]
json.dump({"preset": preset, "seeds": seeds, "n_jobs": int(jobs), "overrides": overrides,
           "wall_s": float(wall), "cpu_s": float(user) + float(system)}, open(path, "w"), indent=2)
PY
echo "sweep: $SWEEP (${wall} s for sweep + report, $(python3 -c "print(round($user + $sys))") s of CPU)"
