"""The contract between the runner and the isolation backends.

A backend turns one `RunSpec` (what to run, with which data, under which limits)
into one `RunResult` (how it ended and what was measured). Everything a backend
needs is in the spec, so backends are interchangeable and testable in isolation.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from sandbox.budget_guard import BudgetRule
from common.errors import MachineError
from sandbox.status import Status


class Phase(str, enum.Enum):
    TRAIN = "train"  # phase 1: runs train.py, train split only, /out writable
    EVAL = "eval"  # phase 2: runs the trusted harness, val split only, /out read-only


class Killer(str, enum.Enum):
    """Who ended a run that did not exit by itself (exit code 137 is ambiguous)."""

    NONE = "none"
    DEADLINE = "deadline"
    WATCHDOG = "watchdog"
    BUDGET = "budget"  # the host's budget clock ran out (sandbox.budget_guard)
    OOM_KILLER = "oom_killer"
    CANCEL = "cancel"


# Where things are inside every sandbox, whichever backend builds it (the base image's WORKDIR is APP_DIR).
APP_DIR = "/app"  # the harness and train.py, read-only; the working directory of a run
DATA_DIR = "/data"  # the split a phase may read, the tokenizer and the manifest, read-only
OUT_DIR = "/out"  # what phase 1 leaves for phase 2: writable in phase 1, read-only in phase 2


@dataclass(frozen=True)
class Mount:
    """A host path made visible inside the sandbox at `target`."""

    source: Path
    target: str
    read_only: bool = True


@dataclass(frozen=True)
class Limits:
    """Resource limits for one run. Defaults are sane for a single-GPU box."""

    memory_bytes: int = 64 * 2**30  # host memory; swap is not allowed beyond it
    pids: int = 4096
    cpus: float | None = None  # None: no CPU quota
    shm_bytes: int = 8 * 2**30
    tmp_bytes: int = 16 * 2**30  # size of the writable /tmp
    gpu_memory_bytes: int | None = None  # NVML watchdog cap; None: no cap


@dataclass(frozen=True)
class RunSpec:
    """One sandboxed process run.

    `image` is what to run from: a docker image id for the docker backend, a
    snapshot directory (holding prepare.py and train.py) for the process backend.
    `command` runs with the image's working directory (/app) as cwd; a first
    element "python3" means the image's Python interpreter (the process backend
    substitutes its own executable). Paths /data/... and /out are sandbox paths.
    """

    run_id: str  # unique; used for container names, labels, cgroups
    image: str
    phase: Phase
    command: list[str]
    log_path: Path  # the combined stdout/stderr goes here, streamed as it comes
    out_dir: Path  # host directory seen as /out (rw in TRAIN, ro in EVAL)
    mounts: tuple[Mount, ...] = ()  # data mounts (always read-only)
    env: dict[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    deadline_s: float = 420.0  # wall seconds from start until the host kills it
    gpu_uuid: str | None = None  # one whole GPU, or None for CPU
    labels: dict[str, str] = field(default_factory=dict)
    budget: BudgetRule | None = None  # phase 1: the training budget the host enforces


@dataclass
class RunResult:
    status: Status
    exit_code: int | None
    killed_by: Killer
    wall_seconds: float
    log_path: Path
    peak_host_memory_bytes: int | None = None
    peak_gpu_memory_bytes: int | None = None
    isolation: str = ""  # backend name and level, e.g. "docker" or "process(cgroup v2)"
    log_tail: str = ""  # last lines of the log, for crash reports and agent feedback
    budget: dict | None = None  # the host's account of the budget (budget_guard.Account.report)
    runtime: str = ""  # what the image's runtime was built from (docker: upstream@digest or the offline tag)


class SandboxUnavailable(MachineError):
    """The chosen isolation backend cannot work on this host (one clear sentence)."""


class Backend(Protocol):
    """An isolation backend. `run` never raises because of what the child did.

    An "image" is whatever the backend runs from: a docker image id, or a
    content-addressed snapshot directory for the process backend. Both hold the
    trusted prepare.py and the experiment's train.py in their working directory.
    """

    name: str
    isolation: str  # human-readable isolation level, recorded in the ledger

    def ensure_ready(self) -> None:
        """Build or check what every run needs (the base image); idempotent, may be slow once."""
        ...

    def recipe(self) -> str:
        """What every image of this backend is built from, as a hash that is equal on every machine with
        the same pinned inputs (runtime, harness): a cluster node whose recipe differs is refused."""
        ...

    def build_image(self, train_py: str, exp_id: str) -> str:
        """Bake train.py into a new image for `exp_id`; return its id (content-addressed)."""
        ...

    def image_exists(self, image: str) -> bool: ...

    def remove_image(self, image: str) -> None: ...

    def run(self, spec: RunSpec, cancel: "CancelToken | None" = None) -> RunResult: ...

    def reap(self) -> int:
        """Remove leftovers of earlier runs (containers, cgroups, processes); return how many."""
        ...


class CancelToken:
    """Set by the runner (Ctrl-C) to make a backend stop its run and report CANCELLED."""

    def __init__(self) -> None:
        import threading

        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        return self._event.wait(seconds)
