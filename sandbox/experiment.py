"""One experiment = phase 1 (train.py trains and exports) + phase 2 (the harness evaluates).

This module turns an experiment into two `RunSpec`s with the right data, limits,
deadlines and budget rule, runs them on a backend and reads the result. It never
raises because of what train.py did: every end is a status.

What counts is split by who produced it (DESIGN §3.1):
- `result`: what phase 2 computed, from the one result line signed with a nonce that
  only phase 2 was given (contract.parse_result); val_bpb comes from here alone;
- `host`: what the host measured itself (wall seconds, peak memory, the budget account);
- `reported`: what train.py's process wrote (its summary and its budget trace), parsed
  strictly: finite numbers of known keys only, labelled as reported, never decisive.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import structlog

import contract
from sandbox.budget_guard import CPU_WALL_STRETCH, Allowance, BudgetRule
from sandbox.phase1_files import read_phase1_file, read_trace
from sandbox.run_dir import RunDir
from sandbox.runlog import tail
from sandbox.spec import DATA_DIR, OUT_DIR, Backend, CancelToken, Limits, Mount, Phase, RunResult, RunSpec
from sandbox.status import EXIT_STATUSES, Status

log = structlog.get_logger(__name__)

PHASE1_BACKSTOP_S = 30.0  # the hard deadline of phase 1 lies this far beyond everything the budget rule allows
# Phase 2 is the harness's own fixed work; its deadline is a liveness bound. A CPU shared with
# other load stretches it (the CPU profile's budget is CPU time for the same reason).
EVAL_DEADLINE_S = {"gpu": 120.0, "cpu": 120.0 * CPU_WALL_STRETCH}
REPLAY_FILE = "replay_schedule.json"  # in /out: the schedule phase 1 of `rerun --exact` replays
MAX_REPORT_BYTES = 2**20  # a larger summary.json from phase 1 is not read at all


@dataclass
class ExperimentSpec:
    exp_id: str
    image: str
    data_dir: Path  # $AR_CACHE/<source>: tokenizer/, train/, val/, manifest.json
    run_dir: Path  # receives train.log, eval.log and out/
    time_budget: float
    gpu_uuid: str | None = None
    limits: Limits = field(default_factory=Limits)
    deterministic: bool = True
    replay_schedule: str | None = None  # rerun --exact: the schedule to replay (contract.replay_schedule)
    seed: int | None = None  # the harness seed (AR_SEED), e.g. for confirmation runs
    allowance: Allowance | None = None  # what phase 1 may spend beside its budget; None: the profile's defaults
    eval_deadline_s: float | None = None  # None: EVAL_DEADLINE_S of the profile

    @property
    def profile(self) -> str:
        return contract.profile_of(bool(self.gpu_uuid))

    @property
    def cpu_threads(self) -> int | None:
        """CPU profile: the threads the budget's CPU time is counted for (the CPU quota, else every core)."""
        if self.profile == "gpu":
            return None
        return max(1, int(self.limits.cpus)) if self.limits.cpus else os.cpu_count() or 1

    @property
    def budget_rule(self) -> BudgetRule:
        return BudgetRule(self.time_budget, self.allowance or Allowance.default(self.profile),
                          replay=self.replay_schedule is not None, cpu_threads=self.cpu_threads)


@dataclass
class ExperimentOutcome:
    status: Status  # DONE or a failure
    val_bpb: float | None
    result: dict  # phase 2's own figures (contract.RESULT_FIELDS plus val_bpb); empty unless done
    reported: dict[str, float]  # train.py's own figures: untrusted, shown as "reported"
    train: RunResult
    eval: RunResult | None
    phase_seconds: dict[str, float]

    @property
    def failure_log(self) -> str:
        """The tail of the log of the phase that failed (empty when done)."""
        if self.status is Status.DONE:
            return ""
        failed = self.eval if self.eval is not None else self.train
        return failed.log_tail

    @property
    def metrics(self) -> dict[str, float]:
        """The trusted numbers: phase 2's result and what the host measured."""
        numbers = {key: float(value) for key, value in self.result.items() if isinstance(value, (int, float))}
        if "num_params" in numbers:
            numbers["num_params_M"] = numbers.pop("num_params") / 1e6
        runs = [r for r in (self.train, self.eval) if r is not None]
        numbers["total_seconds"] = sum(r.wall_seconds for r in runs)
        peaks = [r.peak_gpu_memory_bytes for r in runs if r.peak_gpu_memory_bytes is not None]
        if peaks:
            numbers["peak_vram_mb"] = max(peaks) / 2**20
        for key, value in (self.train.budget or {}).items():
            if isinstance(value, (int, float)):
                numbers[f"budget_{key}"] = float(value)
        return numbers


def _env(spec: ExperimentSpec, phase: Phase, nonce: str) -> dict[str, str]:
    """The whole environment the harness is given (the backends add only what they need to run it)."""
    env = {
        contract.PHASE_ENV: phase.value,
        contract.DATA_DIR_ENV: DATA_DIR,
        contract.OUT_DIR_ENV: OUT_DIR,
        contract.PROFILE_ENV: spec.profile,
        contract.TIME_BUDGET_ENV: repr(float(spec.time_budget)),
        "PYTHONUNBUFFERED": "1",
    }
    if spec.deterministic:
        name, value = contract.CUBLAS_DETERMINISTIC
        env.update({contract.DETERMINISTIC_ENV: "1", name: value})
    if spec.seed is not None:
        env[contract.SEED_ENV] = str(spec.seed)
    if spec.cpu_threads:  # threads that wait sleep, so waiting for a descheduled one costs no budget
        env.update({contract.CPU_THREADS_ENV: str(spec.cpu_threads), "OMP_WAIT_POLICY": "PASSIVE"})
    if spec.replay_schedule is not None and phase is Phase.TRAIN:
        env[contract.REPLAY_ENV] = f"{OUT_DIR}/{REPLAY_FILE}"
    if spec.gpu_uuid and spec.limits.gpu_memory_bytes:  # the soft limit under the host's watchdog
        env[contract.GPU_MEMORY_CAP_ENV] = str(spec.limits.gpu_memory_bytes)
    if phase is Phase.EVAL:  # phase 2 alone knows how to sign its result
        env[contract.RESULT_NONCE_ENV] = nonce
    return env


def _run_spec(spec: ExperimentSpec, phase: Phase, attempt: str, nonce: str) -> RunSpec:
    split = "train" if phase is Phase.TRAIN else "val"
    mounts = (
        Mount(spec.data_dir / split, f"{DATA_DIR}/{split}"),
        Mount(spec.data_dir / "tokenizer", f"{DATA_DIR}/tokenizer"),
        Mount(spec.data_dir / "manifest.json", f"{DATA_DIR}/manifest.json"),
    )
    command = ["python3", "train.py"] if phase is Phase.TRAIN else ["python3", "evaluate.py"]
    rule = spec.budget_rule
    if phase is Phase.TRAIN:
        deadline = rule.budget_wall_s + rule.startup_wall_s + rule.export_wall_s + PHASE1_BACKSTOP_S
    else:
        deadline = spec.eval_deadline_s or EVAL_DEADLINE_S[spec.profile]
    return RunSpec(
        run_id=f"{spec.exp_id}-{phase.value}-{attempt}",
        image=spec.image,
        phase=phase,
        command=command,
        log_path=RunDir(spec.run_dir).log(phase),
        out_dir=RunDir(spec.run_dir).out,
        mounts=mounts,
        env=_env(spec, phase, nonce),
        limits=spec.limits,
        deadline_s=deadline,
        gpu_uuid=spec.gpu_uuid,
        labels={"autoresearch.exp": spec.exp_id, "autoresearch.phase": phase.value},
        budget=rule if phase is Phase.TRAIN else None,
    )


def _phase_status(run: RunResult) -> Status:
    """The experiment status a phase that did not end OK stands for (the harness's exit codes included)."""
    if run.status is Status.CRASH and run.exit_code in EXIT_STATUSES:
        return EXIT_STATUSES[run.exit_code]
    return run.status


def _read_json(path: Path) -> object:
    """A phase-1 JSON file, or None when it is missing, too large or not JSON."""
    text = read_phase1_file(path, MAX_REPORT_BYTES)
    try:
        return None if text is None else json.loads(text)
    except (ValueError, RecursionError):
        return None


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def read_reported(out: Path) -> dict[str, float]:
    """What train.py's process reported, strictly: its summary's known keys with finite numbers, and the
    step count and training seconds recomputed from its budget trace (which wins over the summary)."""
    summary = _read_json(out / contract.REPORT_FILE)
    reported, dropped = {}, []
    for key, value in (summary.items() if isinstance(summary, dict) else ()):
        number = _finite(value) if key in contract.REPORTED_KEYS else None
        if number is None:
            dropped.append(str(key)[:40])
        else:
            reported[key] = number
    try:
        trace = read_trace(out / contract.TRACE_FILE)
        reported.update(num_steps=float(trace.num_steps), training_seconds=trace.training_seconds)
    except contract.TraceError:
        pass  # a run that ended before finish() wrote none; steps from the summary, if any
    if dropped:
        log.warning("experiment.reported_dropped", keys=dropped[:20], why="not a known key with a finite number")
    return reported


def run_experiment(backend: Backend, spec: ExperimentSpec, cancel: CancelToken | None = None,
                   on_phase: Callable[[Status], None] | None = None) -> ExperimentOutcome:
    """Run both phases of one experiment; the outcome's status is DONE or why it failed."""
    run_dir = RunDir(spec.run_dir)
    out = run_dir.out
    if out.exists():  # a previous attempt (the runner was killed): start clean
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if spec.replay_schedule is not None:
        (out / REPLAY_FILE).write_text(spec.replay_schedule)
    attempt, nonce = f"{time.time_ns() % 10**8:08d}", secrets.token_hex(16)
    seconds: dict[str, float] = {}

    if on_phase:
        on_phase(Status.TRAINING)
    train = backend.run(_run_spec(spec, Phase.TRAIN, attempt, nonce), cancel)
    seconds["train"] = train.wall_seconds
    reported = read_reported(out)
    if train.status is not Status.OK:
        return ExperimentOutcome(_phase_status(train), None, {}, reported, train, None, seconds)
    if not run_dir.model.exists():  # the backend already kept the log's tail
        return ExperimentOutcome(Status.EXPORT_FAILED, None, {}, reported, train, None, seconds)

    if on_phase:
        on_phase(Status.EVALUATING)
    evaluation = backend.run(_run_spec(spec, Phase.EVAL, attempt, nonce), cancel)
    seconds["eval"] = evaluation.wall_seconds
    if evaluation.status is not Status.OK:
        return ExperimentOutcome(_phase_status(evaluation), None, {}, reported, train, evaluation, seconds)
    log_text = evaluation.log_path.read_text(errors="replace") if evaluation.log_path.exists() else ""
    try:
        result = contract.parse_result(log_text, nonce)
    except contract.ResultError as error:
        evaluation.log_tail = f"no valid result: {error}\n" + tail(log_text)
        return ExperimentOutcome(Status.CRASH, None, {}, reported, train, evaluation, seconds)
    return ExperimentOutcome(Status.DONE, result["val_bpb"], result, reported, train, evaluation, seconds)
