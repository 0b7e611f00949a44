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
REPLAY_ENV = "AR_REPLAY"  # phase 1 of `rerun --exact`: the schedule to replay (replay_schedule below)
GPU_MEMORY_CAP_ENV = "AR_GPU_MEMORY_CAP"  # bytes: the harness caps its allocator below the host's watchdog
DETERMINISTIC_ENV = "AR_DETERMINISTIC"  # "1": deterministic algorithms, so that a rerun is bit-identical
# What deterministic cuBLAS needs before its first handle; the host sets it, the harness defaults to it.
CUBLAS_DETERMINISTIC = ("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
# CPU_THREADS_ENV and RESULT_NONCE_ENV stand below, beside the facts they carry.


def profile_of(has_gpu: bool) -> str:
    """The profile of a run given a GPU (gpu) or not (cpu): the one rule, for the host and the harness."""
    return "gpu" if has_gpu else "cpu"


def profile_name(cuda_available: bool) -> str:
    """The profile a run uses: $AR_PROFILE when set (the host sets it per phase), else gpu where CUDA is."""
    return os.environ.get(PROFILE_ENV) or profile_of(cuda_available)


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


# -- the budget trace (written in phase 1, so untrusted) ---------------------------------------
# The harness's budget moves its progress on a grid of 1/PROGRESS_GRID and records it at every step
# (TRACE_FILE). `rerun --exact` replays a run's schedule: the host parses the trace strictly and
# writes a schedule of its own holding the step count and the progress values alone. Whatever
# train.py wrote into its trace, a schedule is a non-decreasing sequence on that grid of at most
# MAX_TRACE_STEPS values, which holds at most log2 C(MAX_TRACE_STEPS + PROGRESS_GRID, PROGRESS_GRID)
# bits, under 6 KiB: far too little to carry trained weights from a run to its rerun.
PROGRESS_GRID = 10_000  # 1e-4 of the budget: 30 ms of a 300 s budget, below any schedule's resolution
MAX_TRACE_STEPS = 100_000
MAX_TRACE_BYTES = 2**23


class TraceError(ValueError):
    """A budget trace that is not what the harness writes."""


@dataclass(frozen=True)
class Trace:
    time_budget: float
    warmup_steps: int
    progress: tuple[float, ...]  # the budget's progress during each step, on the grid
    step_seconds: tuple[float, ...]  # each step's seconds by the budget's clock

    @property
    def num_steps(self) -> int:
        return len(self.progress)

    @property
    def training_seconds(self) -> float:
        return sum(self.step_seconds[self.warmup_steps:])


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise TraceError(f"{what} is not a finite number >= 0")
    return float(value)


def parse_trace(text: str) -> Trace:
    """A budget trace, checked key by key and number by number; raises TraceError."""
    if len(text) > MAX_TRACE_BYTES:
        raise TraceError(f"the trace is larger than {MAX_TRACE_BYTES} bytes")
    try:
        trace = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise TraceError(f"the trace is not JSON ({error})") from None
    keys = {"time_budget", "warmup_steps", "num_steps", "progress", "step_seconds"}
    if not isinstance(trace, dict) or set(trace) != keys:
        raise TraceError(f"the trace does not hold exactly the keys {sorted(keys)}")
    steps, warmup = trace["num_steps"], trace["warmup_steps"]
    if type(steps) is not int or type(warmup) is not int or not (0 <= warmup and 0 <= steps <= MAX_TRACE_STEPS):
        raise TraceError(f"num_steps and warmup_steps are not whole numbers from 0 to {MAX_TRACE_STEPS}")
    progress, seconds = trace["progress"], trace["step_seconds"]
    if not isinstance(progress, list) or not isinstance(seconds, list) or not len(progress) == len(seconds) == steps:
        raise TraceError("progress and step_seconds are not lists of num_steps values")
    progress = tuple(_number(value, "a progress value") for value in progress)
    if any(value > 1 or round(value * PROGRESS_GRID) / PROGRESS_GRID != value for value in progress):
        raise TraceError(f"a progress value is not on the grid of 1/{PROGRESS_GRID} in [0, 1]")
    if any(later < earlier for earlier, later in zip(progress, progress[1:])):
        raise TraceError("the progress values go backwards")
    budget = _number(trace["time_budget"], "time_budget")
    return Trace(budget, warmup, progress, tuple(_number(value, "a step's seconds") for value in seconds))


def replay_schedule(trace: Trace) -> str:
    """The schedule a rerun replays (REPLAY_ENV), written by the host: step count and progress only."""
    return json.dumps({"num_steps": trace.num_steps, "progress": list(trace.progress)})


# -- what train.py reports (untrusted) ---------------------------------------------------------

# Training figures written by train.py's process (REPORT_FILE): shown, labelled as reported,
# never used to decide anything. The runner keeps only these keys, and only finite numbers.
REPORTED_KEYS = ("training_seconds", "total_seconds", "startup_seconds", "export_seconds", "peak_vram_mb",
                 "mfu_percent", "tokens_per_second", "total_tokens_M", "num_steps", "num_params_M", "depth",
                 "data_wait_percent")
