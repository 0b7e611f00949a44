#!/usr/bin/env bash
# σ(seed) of train.py on a GPU box: one standalone run per harness seed at one budget.
#   bench/gpu_noise.sh DATA_DIR BUDGET_SECONDS SEED [SEED ...]
# Env: DETERMINISTIC (default 1), KEEP_DIR (keep each run's out/ as KEEP_DIR/seed<N>, e.g. for
# bench/eval_noise.py). Prints one line per run: val_bpb, steps, tokens/s, MFU, data wait, startup, peak VRAM.
set -euo pipefail
data=$1 budget=$2
shift 2
det=${DETERMINISTIC:-1}
for seed in "$@"; do
    out=${KEEP_DIR:+$KEEP_DIR/seed$seed}
    out=${out:-$(mktemp -d)}
    mkdir -p "$out"
    AR_DATA_DIR=$data AR_TIME_BUDGET=$budget AR_DETERMINISTIC=$det AR_SEED=$seed AR_OUT_DIR=$out PYTHONUNBUFFERED=1 \
        python3 train.py 2>&1 | tr '\r' '\n' \
        | grep -E '^(val_bpb|num_steps|tokens_per_second|mfu_percent|data_wait_percent|startup_seconds|peak_vram_mb):' \
        | tr '\n' ' '
    echo "budget=$budget det=$det seed=$seed"
    [ -n "${KEEP_DIR:-}" ] || rm -rf "$out"
done
