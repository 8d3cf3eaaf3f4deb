#!/usr/bin/env bash
# One prepared speed benchmark for a lent GPU (H100/H200), issue 8: Wan-1.3B shape, 480x832, 4 steps, bf16,
# random weights; policies full, window, downsample, mag, bounded, each without and with torch.compile (every
# block but its cached attention), ROUNDS interleaved rounds per run (fps = median, same-round ratios to
# window), plus a torch.profiler table per policy in the eager run. Finishes within 9.5 minutes: every run is
# guarded by `timeout` (SIGINT first, so the JSON keeps the rounds that finished).
#
# Usage (from the repository root; the package need not be installed, no network needed):
#   bash scripts/gpu_bench.sh [OUT_DIR]          # default results/speed/gpu
# Environment: FRAMES (video frames per stream, default 120 -> 33 latent frames = 11 blocks), ROUNDS (default 2),
#              PROFILE_BLOCKS (default 3), ATTENTION (backend of the last run, default cudnn), SYNC_S / EAGER_S /
#              COMPILE_S / GRAPHS_S / ATTENTION_S (timeouts in seconds, default 30 / 145 / 190 / 120 / 75),
#              PYTHON (default python3).
# First, scripts/sync_check.py streams every policy with CUDA's sync check set to "error" (2 layers, seconds).
# Writes OUT_DIR/sync-check.{json,log}, OUT_DIR/wan-1.3b-{eager,compile,cudagraphs,attention}.{json,png,log} and
# OUT_DIR/machine.txt (SMOKE=1: the tiny preset on the CPU under the same names, the sync check on meta).
set -u
cd "$(dirname "$0")/.."
OUT=${1:-results/speed/gpu}
# SMOKE=1: the same runs on the CPU with the tiny preset and short streams, so the script itself can be checked
# without a GPU (tests/test_bench_speed.py does).
if [[ "${SMOKE:-0}" == 1 ]]; then
  MODEL_ARGS=(--preset tiny --device cpu --dtype float32 --threads 1)
  SYNC_ARGS=(--preset tiny --device meta --dtype float32)
  FRAMES=${FRAMES:-6}
  ATTENTION=${ATTENTION:-flash}
  SYNC_S=${SYNC_S:-120}  # the meta-device audit of every policy takes ~25 s on a loaded shared CPU
else
  MODEL_ARGS=(--preset wan-1.3b --device cuda --dtype bfloat16 --height 480 --width 832)
  SYNC_ARGS=(--preset wan-1.3b --device cuda --dtype bfloat16)
  FRAMES=${FRAMES:-120}
  ATTENTION=${ATTENTION:-cudnn}
fi
ROUNDS=${ROUNDS:-2}
PROFILE_BLOCKS=${PROFILE_BLOCKS:-3}
SYNC_S=${SYNC_S:-30}
EAGER_S=${EAGER_S:-145}
COMPILE_S=${COMPILE_S:-190}
GRAPHS_S=${GRAPHS_S:-120}
ATTENTION_S=${ATTENTION_S:-75}
PYTHON=${PYTHON:-python3}
# Grace period after SIGINT before SIGKILL (the JSON is written after each policy, so little is lost).
KILL_AFTER_S=15
mkdir -p "$OUT"

log() { echo "[$(date +%H:%M:%S)] $*"; }

log "gpu_bench: output in $OUT, $FRAMES video frames per stream"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  PYTHONPATH=. "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
 torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')" 2>&1
  echo "MAG_GIT_COMMIT=${MAG_GIT_COMMIT:-unset} (the commit the JSON files record; git here: $(git rev-parse HEAD 2>/dev/null || echo none))"
} | tee "$OUT/machine.txt"

# The wan-vae codec needs diffusers; without it the decode is left out (and says so in the JSON).
DECODE=(--no-decode)
if PYTHONPATH=. "$PYTHON" -c "import diffusers" 2>/dev/null; then DECODE=(); fi
log "decode: ${DECODE[*]:-wan-vae (random weights)}"

COMMON=("${MODEL_ARGS[@]}" --steps 4 --random-weights
        --frames "$FRAMES" --warmup-blocks 2 --rounds "$ROUNDS" --policies full,window,downsample,mag,bounded
        "${DECODE[@]}")

run() {  # run NAME TIMEOUT_S [extra args...]
  local name=$1 limit=$2
  shift 2
  log "start $name (timeout ${limit}s)"
  timeout --signal=INT --kill-after="$KILL_AFTER_S" "$limit" \
    env PYTHONPATH=. "$PYTHON" -m mag bench speed "${COMMON[@]}" "$@" --out "$OUT/$name.json" \
    > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 12 "$OUT/$name.log"
  log "end $name: exit $rc$([ "$rc" = 124 ] || [ "$rc" = 130 ] && echo ' (timed out; JSON keeps finished policies)')"
}

log "start sync-check (timeout ${SYNC_S}s)"
timeout --signal=INT --kill-after="$KILL_AFTER_S" "$SYNC_S" env PYTHONPATH=. "$PYTHON" scripts/sync_check.py \
  "${SYNC_ARGS[@]}" --json-out "$OUT/sync-check.json" > "$OUT/sync-check.log" 2>&1
log "end sync-check: exit $? (0: no policy synced)"
cat "$OUT/sync-check.log"

run wan-1.3b-eager "$EAGER_S" --profile-blocks "$PROFILE_BLOCKS"
run wan-1.3b-compile "$COMPILE_S" --compile
# Later --policies wins: the CUDA-graph run keeps to window and mag to fit the lease.
run wan-1.3b-cudagraphs "$GRAPHS_S" --compile reduce-overhead --policies window,mag
run wan-1.3b-attention "$ATTENTION_S" --attention "$ATTENTION" --policies window,mag

# A run cut by its timeout has a JSON without its plot: draw it from what finished.
for json in "$OUT"/wan-1.3b-*.json; do
  [ -f "$json" ] || continue
  PYTHONPATH=. "$PYTHON" - "$json" <<'PY' || log "plot failed for $json"
import json, sys
from pathlib import Path
from mag.bench.speed import write_plot
path = Path(sys.argv[1])
report = json.loads(path.read_text())
if report.get("policies") and not report.get("plot"):
    write_plot(report, path.with_suffix(".png"))
    print(f"plotted {path.with_suffix('.png')}")
PY
done
log "gpu_bench: done; results in $OUT"
