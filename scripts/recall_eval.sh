#!/usr/bin/env bash
# Recall figures of docs/recall.md: the consistency benchmark on held-out TEST episodes, teacher-forced and
# autoregressive, per cache policy, for one model (default: the shipped tiny-causal).
# Usage: scripts/recall_eval.sh [MODEL] [EPISODES] [OUT]
# Environment: FRAMES (episode length, default 36: the 30-frame model's horizon, see docs/recall.md),
# POLICIES (default full,window,downsample), MEMORY_MODEL (adds mag,bounded when POLICIES is unset),
# DEVICE (default cpu), MAG (the mag command, default .venv/bin/mag), EXTRA (more benchmark options).
set -euo pipefail
model=${1:-tiny-causal}
episodes=${2:-176}
out=${3:-results/recall}
mag=${MAG:-.venv/bin/mag}
frames=${FRAMES:-36}
memory=()
policies=${POLICIES:-full,window,downsample}
if [[ -n "${MEMORY_MODEL:-}" ]]; then
    memory=(--memory-model "$MEMORY_MODEL")
    [[ -n "${POLICIES:-}" ]] || policies="$policies,mag,bounded"
fi
# shellcheck disable=SC2206  # EXTRA is a list of options on purpose
common=(--model "$model" "${memory[@]}" --policies "$policies" --split test --episodes "$episodes"
        --episode-frames "$frames" --sampler euler --steps 8 --device "${DEVICE:-cpu}" --no-progress ${EXTRA:-})
[[ "${DEVICE:-cpu}" != cpu ]] || common+=(--threads 1)
$mag bench consistency "${common[@]}" --teacher-forced --out "$out/teacher-forced"
$mag bench consistency "${common[@]}" --out "$out/autoregressive"
