"""The facts the host and the harness share, in one place, with the standard library only.

The runner, the sandbox and the data builder import this module without torch; every
image carries it beside prepare.py. It holds the cache rule, the data layout, the
profiles, the exit codes of the phases and the result protocol of phase 2.

The result protocol is the trust boundary (DESIGN §3.1): phase 2 prints exactly one
line `AR_RESULT <nonce> <json>`, where the nonce is a fresh secret the runner gives
to phase 2 alone. Nothing train.py's process wrote can carry the nonce, so no
forged line, block or file can pass for a result; the runner parses that one line
strictly and nothing else of the log.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

# -- where things live ---------------------------------------------------------------


def cache_dir() -> Path:
    """Prepared data, downloads and sandbox snapshots: $AR_CACHE, else ~/.cache/autoresearch-sandbox."""
    return Path(os.environ.get("AR_CACHE") or Path.home() / ".cache" / "autoresearch-sandbox")


BOS = "<|bos|>"  # the only special token: starts every document
DATA_FILES = ("tokenizer/tokenizer.pkl", "tokenizer/token_bytes.npy", "train/tokens.bin",
              "train/docs.npy", "val/tokens.bin", "val/docs.npy")  # everything manifest.json vouches for
MODEL_FILE, TRACE_FILE, REPORT_FILE = "model.pt2", "trace.json", "summary.json"  # what phase 1 leaves in /out
# Phase 1 also leaves the compiled kernels it used (torch's portable compile cache) in /out; the host
# takes the file out and may hand it, read-only, to later runs of the same code or of its descendants.
COMPILE_CACHE_FILE = "compile_cache.bin"
# The harness prints this line when the timed budget starts; the host starts its own budget clock on it.
BUDGET_START_MARK = "[harness] training budget started"


# -- profiles ------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    max_seq_len: int
    time_budget: float  # training seconds
    eval_tokens: int
    eval_batch: int


# The CPU profile keeps an experiment to about two minutes on a laptop. The GPU profile scores 2^22
# tokens: there the sampling error of a difference between two models is 0.0004 bpb, against
# 0.0013 at 2^20 and a seed-to-seed spread of about 0.002 (docs/benchmarks.md).
PROFILES = {
    "gpu": Profile(max_seq_len=2048, time_budget=300.0, eval_tokens=2**22, eval_batch=32),
    "cpu": Profile(max_seq_len=256, time_budget=60.0, eval_tokens=2**15, eval_batch=16),
}

# -- the environment of a phase -------------------------------------------------------------
# The host sets these for each phase (sandbox/experiment.py); the harness reads them (prepare.py).

PHASE_ENV = "AR_PHASE"  # "train" (phase 1) or "eval" (phase 2); unset when run standalone
PROFILE_ENV = "AR_PROFILE"  # a key of PROFILES
TIME_BUDGET_ENV = "AR_TIME_BUDGET"  # training seconds (repr of a float)
DATA_DIR_ENV, OUT_DIR_ENV = "AR_DATA_DIR", "AR_OUT_DIR"  # /data and /out in the sandbox
SEED_ENV = "AR_SEED"  # the harness's seed (confirmation and verification runs draw fresh ones)
REPLAY_ENV = "AR_REPLAY"  # phase 1 of `rerun --exact`: the recorded trace to replay
GPU_MEMORY_CAP_ENV = "AR_GPU_MEMORY_CAP"  # bytes: the harness caps its allocator below the host's watchdog
COMPILE_CACHE_ENV = "AR_COMPILE_CACHE"  # phase 1: an earlier run's COMPILE_CACHE_FILE to start from
DETERMINISTIC_ENV = "AR_DETERMINISTIC"  # "1": deterministic algorithms, so that a rerun is bit-identical
# What deterministic cuBLAS needs before its first handle; the host sets it, the harness defaults to it.
CUBLAS_DETERMINISTIC = ("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
# CPU_THREADS_ENV and RESULT_NONCE_ENV stand below, beside the facts they carry.


def profile_name(cuda_available: bool) -> str:
    """The profile a run uses: $AR_PROFILE when set (the host sets it per phase), else gpu where CUDA is."""
    return os.environ.get(PROFILE_ENV) or ("gpu" if cuda_available else "cpu")


# On the CPU profile the training budget is CPU time: the harness counts its process's CPU
# seconds divided by the threads it runs (this variable; the host sets it, default: the
# machine's cores), and the host meters the run's processes against the same figure. Other
# load on the machine then stretches a run in wall time instead of cutting its training short.
CPU_THREADS_ENV = "AR_CPU_THREADS"

# -- how a phase ends ----------------------------------------------------------------------

EXIT_CRASH, EXIT_EXPORT_FAILED, EXIT_PROBE_FAILED, EXIT_GPU_OOM = 2, 3, 4, 5

# -- the result of phase 2 ---------------------------------------------------------------------

RESULT_TAG = "AR_RESULT"
RESULT_NONCE_ENV = "AR_RESULT_NONCE"
# Every key phase 2 reports and its type; a line with any other key, or without one, is refused.
RESULT_FIELDS: dict[str, type] = {
    "val_bpb_hex": str,  # the exact float (float.hex); the decimal form is derived from it
    "eval_tokens": int,
    "eval_bytes": int,
    "num_params": int,  # counted in the exported program
    "probe_seed": str,  # the fresh entropy the probes were drawn from (hex)
    "probe_rows": int,  # rows whose logits were compared against a changed batch
    "probe_max_change": float,  # the largest relative change seen (below the tolerance)
}


class ResultError(Exception):
    """The phase-2 log holds no valid result line, or more than one."""


def result_line(nonce: str, result: dict) -> str:
    """The one line phase 2 prints: the tag, the nonce and the result as compact JSON."""
    return f"{RESULT_TAG} {nonce} {json.dumps(result, sort_keys=True, separators=(',', ':'))}"


def parse_result(text: str, nonce: str) -> dict:
    """The result phase 2 printed under `nonce`, checked field by field; raises ResultError."""
    prefix = f"{RESULT_TAG} {nonce} "
    lines = [line[len(prefix):] for line in text.replace("\r", "\n").split("\n") if line.startswith(prefix)]
    if len(lines) != 1:
        raise ResultError(f"the evaluation printed {len(lines)} result lines with this run's nonce, not one")
    try:
        result = json.loads(lines[0])
    except ValueError as error:
        raise ResultError(f"the result line is not JSON ({error})") from error
    if not isinstance(result, dict) or set(result) != set(RESULT_FIELDS):
        raise ResultError("the result line does not hold exactly the expected fields")
    for key, kind in RESULT_FIELDS.items():
        value = result[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = result[key] = float(value)
        if type(value) is not kind or (kind is float and not math.isfinite(value)):
            raise ResultError(f"the result field {key} is not a finite {kind.__name__}")
    try:
        val_bpb = float.fromhex(result["val_bpb_hex"])
    except (ValueError, OverflowError) as error:
        raise ResultError("val_bpb_hex is not a float in hex") from error
    if val_bpb.hex() != result["val_bpb_hex"]:
        raise ResultError("val_bpb_hex is not a float in hex (as float.hex writes it)")
    if not (math.isfinite(val_bpb) and val_bpb > 0):
        raise ResultError(f"val_bpb {val_bpb!r} is not a positive finite number")
    return {**result, "val_bpb": val_bpb}


# -- what train.py reports (untrusted) ---------------------------------------------------------

# Training figures written by train.py's process (REPORT_FILE): shown, labelled as reported,
# never used to decide anything. The runner keeps only these keys, and only finite numbers.
REPORTED_KEYS = ("training_seconds", "total_seconds", "startup_seconds", "export_seconds", "peak_vram_mb",
                 "mfu_percent", "tokens_per_second", "total_tokens_M", "num_steps", "num_params_M", "depth",
                 "data_wait_percent")
