#!/usr/bin/env bash
# The tiny teacher -> ODE pairs -> ODE init -> DMD chain on a CPU, one thread per stage, in a scratch folder
# (the recipes read and write models/ relative to the working directory, so the repository's files are not
# touched). Appends each stage's wall time to SCRATCH/times.txt.
# Usage (repo root): scripts/cpu_chain.sh [SCRATCH]   (default /tmp/mag-cpu-chain; MAG = the mag command)
set -euo pipefail
repo=$(pwd)
scratch=${1:-/tmp/mag-cpu-chain}
mag=${MAG:-$repo/.venv/bin/mag}
export OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1
mkdir -p "$scratch/models"
cp -r "$repo/recipes" "$scratch/"
cd "$scratch"
t() { local s; s=$(date +%s); "$@"; echo "$(( $(date +%s) - s )) s: $*" >> times.txt; }
t $mag train --recipe recipes/tiny-teacher.toml --out runs/tiny-teacher --threads 1 --no-progress
$mag export runs/tiny-teacher -o models/tiny-teacher.safetensors --name tiny-teacher --stage teacher
t $mag train ode-pairs --teacher models/tiny-teacher.safetensors --out models/tiny-ode-pairs.safetensors \
    --clips 512 --steps 48 --no-progress
t $mag train --recipe recipes/tiny-ode-init.toml --out runs/tiny-ode-init --threads 1 --no-progress
$mag export runs/tiny-ode-init -o models/tiny-ode-init.safetensors --name tiny-ode-init --stage causal
t $mag train --recipe recipes/tiny-dmd.toml --out runs/tiny-dmd --threads 1 --no-progress
$mag export runs/tiny-dmd -o models/tiny-dmd.safetensors --name tiny-dmd --stage dmd
