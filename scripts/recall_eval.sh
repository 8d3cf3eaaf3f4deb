#!/usr/bin/env bash
# Recall figures of docs/recall.md: the consistency benchmark on held-out TEST episodes, teacher-forced and
# autoregressive, full vs window vs downsample, for one model (default: the shipped tiny-causal).
# Usage: scripts/recall_eval.sh [MODEL] [EPISODES] [OUT]
set -euo pipefail
model=${1:-tiny-causal}
episodes=${2:-176}
out=${3:-bench/results/recall}
mag=${MAG:-.venv/bin/mag}
# 36-frame episodes: the model was trained on 30-frame clips; see docs/recall.md for the horizon.
common=(--model "$model" --policies full,window,downsample --split test --episodes "$episodes"
        --episode-frames 36 --sampler euler --steps 8 --threads 1 --no-progress)
"$mag" bench consistency "${common[@]}" --teacher-forced --out "$out/teacher-forced"
"$mag" bench consistency "${common[@]}" --out "$out/autoregressive"
