#!/usr/bin/env bash
# FSDP smoke check: train a tiny recipe for 2 steps on N ranks through torchrun, then resume the
# N-rank checkpoint in a single process for 2 more steps (checkpoints move between world sizes).
#
#   scripts/fsdp_smoke.sh            # CPU, gloo, 2 processes
#   scripts/fsdp_smoke.sh cuda 8     # 8 GPUs, nccl (one process per GPU)
#
# Prints both runs' metrics; they should read like an ordinary tiny run. Only 127.0.0.1 is used.
set -euo pipefail
DEVICE=${1:-cpu}
NPROC=${2:-2}
PORT=${MASTER_PORT:-29517}
PYTHON=${PYTHON:-.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

cat > "$WORK/smoke.toml" <<TOML
name = "fsdp-smoke"
preset = "tiny"
[preset_overrides]
"dit.dim" = 32
"dit.ffn_dim" = 64
"dit.num_heads" = 2
"dit.num_layers" = 2
"dit.freq_dim" = 16
"video.height" = 16
"video.width" = 16
[loop]
steps = 4
batch_size = $((2 * NPROC))
grad_accum = 2
log_every = 1
ckpt_every = 2
[data]
clip_frames = 6
TOML

OMP_NUM_THREADS=1 "$PYTHON" -m torch.distributed.run --nproc_per_node="$NPROC" --nnodes=1 \
    --master_addr=127.0.0.1 --master_port="$PORT" \
    -m mag.train --recipe "$WORK/smoke.toml" --out "$WORK/run" --device "$DEVICE" --no-progress --max-steps 2
"$PYTHON" -m mag.train --recipe "$WORK/smoke.toml" --out "$WORK/run" --device "$DEVICE" --no-progress --resume
cat "$WORK/run/metrics.jsonl"
