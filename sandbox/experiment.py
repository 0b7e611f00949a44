"""One experiment = phase 1 (train.py trains and exports) + phase 2 (the harness evaluates).

This module turns an experiment into two `RunSpec`s with the right data, limits
and deadlines, runs them on a backend and reads the result from the phase-2 log
only. It never raises because of what train.py did: every end is a status.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sandbox.logparse import numeric, parse_summary, tail
from sandbox.spec import Backend, CancelToken, Limits, Mount, Phase, RunResult, RunSpec, Status

# Exit codes of `prepare.py evaluate` (see prepare.py evaluate_main)
_EVAL_EXIT_STATUS = {3: Status.EXPORT_FAILED, 4: Status.PROBE_FAILED}
DONE = "done"


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
    replay_trace: Path | None = None  # rerun --exact: replay this phase-1 trace
    seed: int | None = None  # the harness seed (AR_SEED), e.g. for confirmation runs
    startup_allowance_s: float = 120.0  # compile + export on top of the budget
    eval_deadline_s: float = 120.0


@dataclass
class ExperimentOutcome:
    status: str  # DONE or a failure Status value
    val_bpb: float | None
    metrics: dict[str, float]
    summary: dict[str, str]  # the phase-2 block as printed (exact strings, e.g. val_bpb_hex)
    train: RunResult
    eval: RunResult | None
    phase_seconds: dict[str, float]

    @property
    def failure_log(self) -> str:
        """The tail of the log of the phase that failed (empty when done)."""
        if self.status == DONE:
            return ""
        failed = self.eval if self.eval is not None else self.train
        return failed.log_tail


def _env(spec: ExperimentSpec, phase: Phase) -> dict[str, str]:
    env = {
        "AR_PHASE": phase.value,
        "AR_DATA_DIR": "/data",
        "AR_OUT_DIR": "/out",
        "AR_PROFILE": "gpu" if spec.gpu_uuid else "cpu",
        "AR_TIME_BUDGET": repr(float(spec.time_budget)),
        "PYTHONUNBUFFERED": "1",
    }
    if spec.deterministic:
        env.update(AR_DETERMINISTIC="1", CUBLAS_WORKSPACE_CONFIG=":4096:8")
    if spec.seed is not None:
        env["AR_SEED"] = str(spec.seed)
    if spec.replay_trace is not None and phase is Phase.TRAIN:
        env["AR_REPLAY"] = "/out/replay_trace.json"
    if spec.gpu_uuid and spec.limits.gpu_memory_bytes:
        env["AR_GPU_MEMORY_CAP"] = str(spec.limits.gpu_memory_bytes)
    return env


def _run_spec(spec: ExperimentSpec, phase: Phase, attempt: str) -> RunSpec:
    split = "train" if phase is Phase.TRAIN else "val"
    mounts = (
        Mount(spec.data_dir / split, f"/data/{split}"),
        Mount(spec.data_dir / "tokenizer", "/data/tokenizer"),
        Mount(spec.data_dir / "manifest.json", "/data/manifest.json"),
    )
    command = ["python3", "train.py"] if phase is Phase.TRAIN else ["python3", "prepare.py", "evaluate"]
    deadline = spec.time_budget + spec.startup_allowance_s if phase is Phase.TRAIN else spec.eval_deadline_s
    return RunSpec(
        run_id=f"{spec.exp_id}-{phase.value}-{attempt}",
        image=spec.image,
        phase=phase,
        command=command,
        log_path=spec.run_dir / f"{phase.value}.log",
        out_dir=spec.run_dir / "out",
        mounts=mounts,
        env=_env(spec, phase),
        limits=spec.limits,
        deadline_s=deadline,
        gpu_uuid=spec.gpu_uuid,
        labels={"autoresearch.exp": spec.exp_id, "autoresearch.phase": phase.value},
    )


def run_experiment(backend: Backend, spec: ExperimentSpec, cancel: CancelToken | None = None,
                   on_phase: Callable[[str], None] | None = None) -> ExperimentOutcome:
    """Run both phases of one experiment; the outcome's status is DONE or why it failed."""
    out = spec.run_dir / "out"
    if out.exists():  # a previous attempt (the runner was killed): start clean
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if spec.replay_trace is not None:
        shutil.copyfile(spec.replay_trace, out / "replay_trace.json")
    attempt = f"{time.time_ns() % 10**8:08d}"
    seconds: dict[str, float] = {}

    if on_phase:
        on_phase("training")
    train = backend.run(_run_spec(spec, Phase.TRAIN, attempt), cancel)
    seconds["train"] = train.wall_seconds
    if train.status is not Status.OK:
        return ExperimentOutcome(train.status.value, None, {}, {}, train, None, seconds)
    if not (out / "model.pt2").exists():  # the backend already kept the log's tail
        return ExperimentOutcome(Status.EXPORT_FAILED.value, None, {}, {}, train, None, seconds)

    if on_phase:
        on_phase("evaluating")
    evaluation = backend.run(_run_spec(spec, Phase.EVAL, attempt), cancel)
    seconds["eval"] = evaluation.wall_seconds
    log = evaluation.log_path.read_text(errors="replace") if evaluation.log_path.exists() else ""
    summary = parse_summary(log) if evaluation.status is Status.OK else {}
    metrics = numeric(summary)
    if evaluation.status is Status.CRASH and evaluation.exit_code in _EVAL_EXIT_STATUS:
        status = _EVAL_EXIT_STATUS[evaluation.exit_code].value
    elif evaluation.status is not Status.OK:
        status = evaluation.status.value
    elif "val_bpb" not in metrics:
        status = Status.CRASH.value
        evaluation.log_tail = "the evaluation log has no val_bpb line\n" + tail(log)
    else:
        status = DONE
    val_bpb = metrics.get("val_bpb") if status == DONE else None
    return ExperimentOutcome(status, val_bpb, metrics, summary, train, evaluation, seconds)
