#!/usr/bin/env bash
# The tiny recipes on ONE lent GPU inside a fixed budget (a lease is 15 minutes, start-up included).
# Two chains run side by side (the tiny model is launch-bound, so two processes fill the GPU better than
# one), every training run stops at its own time limit with a resumable checkpoint, and the results are
# packed into $OUT (15 MB parts: `cat results.tar.part-* | tar x` in the repo root brings them back).
#
#   recall   : long-clip curriculum (issue 9) -> tiny-causal-long -> memory model (stage 1) from it
#              -> consistency benchmark on test episodes (teacher-forced + autoregressive, all policies)
#   chain    : teacher -> ODE pairs -> ODE init -> Self-Forcing DMD (issue 4)
#   speed    : scripts/gpu_bench.sh's Wan-1.3B runs in whatever time is left (issue 6/8)
#
# Needs: python3 with torch+cuda, numpy, safetensors, tqdm, matplotlib (the device image has them); the
# MiniLM package is not needed: MAG_PROMPT_TABLE names a prompt table built here with `mag text table`.
# Usage (repo root): OUT=/some/dir MAG_GIT_COMMIT=<sha> scripts/gpu_train.sh [BUDGET_SECONDS]
# A CPU dry run of the plumbing (in a scratch copy of the repo: it advances the curriculum run):
#   DEVICE=cpu MINUTES_SCALE=0.01 CLIPS=16 EPISODES=2 scripts/gpu_train.sh 600
set -u
budget=${1:-540}
device=${DEVICE:-cuda}
scale=${MINUTES_SCALE:-1}
minutes() { awk -v m="$1" -v s="$scale" 'BEGIN { print m * s }'; }
out=${OUT:-out/gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg OMP_NUM_THREADS=2
export MAG_PROMPT_TABLE=${MAG_PROMPT_TABLE:-.gpu/prompts.safetensors}
mag="python3 -m mag.cli"
start=$(date +%s)
logs=runs/gpu-logs
mkdir -p "$logs" models runs
log() { echo "[$(( $(date +%s) - start ))s] $*"; }
left() { echo $(( budget - ($(date +%s) - start) )); }
step() {  # step NAME CMD...: run, log rc; the chains go on after a failure where they can
    local name=$1; shift
    log "start $name"
    "$@" >"$logs/$name.log" 2>&1
    local rc=$?
    log "done $name rc=$rc"; tail -n 3 "$logs/$name.log"
    return $rc
}

log "$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo no GPU)"
python3 -c "import torch, mag; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 1

long_run=results/recall/training/camera-rope-long
recall_chain() {
    step long $mag train --recipe recipes/tiny-causal-camera-long.toml --out "$long_run" --resume \
        --device "$device" --no-progress --time-limit "$(minutes 3.5)"
    step export-long $mag export "$long_run" -o mag/shipped/tiny-causal-long.safetensors \
        --name tiny-causal-long --stage causal || return
    step memory $mag train --recipe recipes/tiny-memory.toml --out runs/tiny-memory --device "$device" \
        --no-progress --time-limit "$(minutes 2.0)"
    step export-memory $mag export runs/tiny-memory -o mag/shipped/tiny-memory.safetensors \
        --name tiny-memory --stage memory || return
    FRAMES=60 MEMORY_MODEL=tiny-memory DEVICE=$device MAG=$mag EXTRA=--no-lpips step recall-eval \
        timeout 150 scripts/recall_eval.sh tiny-causal-long "${EPISODES:-176}" runs/recall-long
    step memory-recon timeout 60 $mag bench memory --memory-model tiny-memory --baseline-model tiny-causal-long \
        --split test --episodes "${EPISODES:-176}" --device "$device" --no-lpips --no-progress --out runs/memory-recon
}

chain() {
    step teacher $mag train --recipe recipes/tiny-teacher.toml --out runs/tiny-teacher --device "$device" \
        --no-progress --time-limit "$(minutes 2.5)"
    step export-teacher $mag export runs/tiny-teacher -o models/tiny-teacher.safetensors \
        --name tiny-teacher --stage teacher || return
    step ode-pairs timeout 90 $mag train ode-pairs --teacher models/tiny-teacher.safetensors \
        --out models/tiny-ode-pairs.safetensors --clips "${CLIPS:-512}" --steps 48 --batch 128 --device "$device" \
        --no-progress || return
    step ode $mag train --recipe recipes/tiny-ode-init.toml --out runs/tiny-ode-init --device "$device" \
        --no-progress --time-limit "$(minutes 1.2)"
    step export-ode $mag export runs/tiny-ode-init -o models/tiny-ode-init.safetensors \
        --name tiny-ode-init --stage causal || return
    step dmd $mag train --recipe recipes/tiny-dmd.toml --out runs/tiny-dmd --device "$device" --no-progress \
        --time-limit "$(minutes 2.5)"
    step export-dmd $mag export runs/tiny-dmd -o models/tiny-dmd.safetensors --name tiny-dmd --stage dmd
}

recall_chain & recall_pid=$!
chain & chain_pid=$!
wait $recall_pid $chain_pid

speed_left=$(( $(left) - 25 ))
if (( speed_left > 60 )) && [[ -x scripts/gpu_bench.sh ]]; then
    FRAMES=${SPEED_FRAMES:-120} EAGER_S=$(( speed_left * 2 / 5 )) COMPILE_S=$(( speed_left * 3 / 5 - 20 )) \
        step speed timeout "$speed_left" scripts/gpu_bench.sh runs/speed-gpu
fi

log "packing"
keep=$(ls "$long_run"/checkpoints/step_*.safetensors 2>/dev/null | sort | tail -n 1)
for old in "$long_run"/checkpoints/step_*.safetensors; do [[ "$old" == "$keep" ]] || rm -f "$old"; done
files=(mag/shipped/tiny-causal-long.safetensors mag/shipped/tiny-memory.safetensors
       models/tiny-teacher.safetensors models/tiny-ode-init.safetensors models/tiny-dmd.safetensors
       "$long_run" runs/recall-long runs/memory-recon runs/speed-gpu "$logs")
for run in runs/tiny-*/; do files+=("${run}metrics.jsonl" "${run}recipe.json"); done
present=(); for f in "${files[@]}"; do [[ -e "$f" ]] && present+=("$f"); done
tar cf - "${present[@]}" | split -b 15m - "$out/results.tar.part-"
ls -la "$out"
log "end"
