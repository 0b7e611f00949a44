#!/usr/bin/env bash
# Noise floor of train.py on a GPU box: N identical runs at one budget, standalone harness.
#   bench/gpu_noise.sh DATA_DIR BUDGET_SECONDS RUNS [DETERMINISTIC=1]
# Prints one line per run: val_bpb, steps, tokens/s, MFU, data wait, startup, peak VRAM.
set -euo pipefail
data=$1 budget=$2 runs=$3 det=${4:-1}
for i in $(seq 1 "$runs"); do
    out=$(mktemp -d)
    AR_DATA_DIR=$data AR_TIME_BUDGET=$budget AR_DETERMINISTIC=$det AR_OUT_DIR=$out PYTHONUNBUFFERED=1 \
        python3 train.py 2>&1 | tr '\r' '\n' \
        | grep -E '^(val_bpb|num_steps|tokens_per_second|mfu_percent|data_wait_percent|startup_seconds|peak_vram_mb):' \
        | tr '\n' ' '
    echo "budget=$budget det=$det run=$i"
    rm -rf "$out"
done
