"""The process isolation backend, for hosts without a Docker engine (DESIGN §3.4).

Each run is a child of the `unshare` command in new network, mount and (where the
kernel allows) PID namespaces. Inside, a small launcher running as root
(sandbox.namespace_init) builds a sealed root filesystem on a tmpfs (sandbox.sealed_root):

- only the host's runtime, read-only: the Python interpreter and the packages the
  harness imports, the system libraries, the few programs torch.compile and Triton run,
  the CUDA libraries and NVIDIA devices where present, all found by asking the host; a
  synthesized /etc and a minimal /dev. Nothing else of the host: no home, /var, /opt,
  /run or project directory, and no host unix socket (those inside the runtime's trees
  are covered; abstract ones belong to the network namespace);
- `/app` = the run's snapshot (the harness files + train.py), `/data/...` = the data
  mounts, `/out` (read-only in phase 2), all bound as in the docker backend, so
  commands and paths are the same for both backends;
- a size-limited tmpfs on `/tmp` and `/dev/shm`, a fresh `/proc` and `/sys` (so
  only loopback is visible), and the data cache, snapshots and run directories
  covered by empty tmpfs where the runtime's trees hold them.

It then chroots the child, drops it to a per-run unprivileged uid with
no-new-privileges (it cannot undo the mounts) and waits for it as the PID
namespace's init: when train.py exits, everything it spawned dies with the
namespace. A per-run cgroup (v2, or v1 where that is what the host has: sandbox.cgroups)
caps memory with no swap, and pids; where no pids controller is writable,
RLIMIT_NPROC on the run's uid bounds them. Where no memory limit can be enforced,
isolated runs refuse to start (SandboxUnavailable) rather than run unlimited.

Without root (or where `unshare` fails) the command runs as a plain child process:
no isolation and no limits at all, which the `isolation` string and the log say loudly.

This module is the host's side: it starts the launcher and hands the run to the
supervisor (sandbox.supervision, the same loop as the docker backend's). What the host
allows is sandbox.host_support's to find out, the plan of a run and its handle are
sandbox.launch's, the snapshots sandbox.snapshots', the /proc table sandbox.processes'.
Who ends a run: the deadline, the cancel token, the budget account and the GPU
watchdog kill it through the supervisor (SIGKILL to the cgroup, the run's uid and its
process tree, the namespace's init among them, until none is left); an OOM is the
cgroup's `oom_kill` counter (on cgroup v1, where the kernel kills one process, the
supervisor then ends the whole run), or, where nothing counts it, a SIGKILL that the
host did not send (the kernel's OOM killer is the only other sender). After any end,
whatever the run started is killed too.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import structlog

from sandbox import namespace_init
from sandbox.gpu_watchdog import Reader
from sandbox.harness import HARNESS_FILES, PROJECT_ROOT, harness_files
from sandbox.host_support import HostSupport, probe_host
from sandbox.launch import CHILD_PATH, LAUNCHER_PATH, RUN_RECORD, Launcher, RunHandle
from sandbox.namespace_init import LaunchPlan
from sandbox.processes import identity_alive, process_identity, read_proc
from sandbox.runlog import LineLog
from sandbox.snapshots import SnapshotStore, default_snapshots_root, snapshot_id
from sandbox.spec import CancelToken, Phase, RunResult, RunSpec, SandboxUnavailable
from sandbox.status import Status
from sandbox.supervision import KILL_GRACE_S, Ending, Exit, Supervisor

log = structlog.get_logger(__name__)

# Prints what a run's runtime is: the child's Python and the packages the harness imports, with versions.
RUNTIME_VERSIONS = ("import sys, importlib.metadata as m; print(sys.version.split()[0], "
                    "*(f'{p}=={m.version(p)}' for p in ('torch', 'numpy', 'tiktoken')))")



class _Waiter(threading.Thread):
    """Notices when the started process exits, without reaping it.

    Until `reap()`, the exited process stays a zombie, so its pid (the session id of
    everything it started) cannot be reused while the run's processes are killed.
    """

    def __init__(self, process: subprocess.Popen) -> None:
        super().__init__(name=f"wait-{process.pid}", daemon=True)
        self.process = process
        self.done = threading.Event()

    def run(self) -> None:
        os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOWAIT)
        self.done.set()

    def reap(self) -> tuple[int | None, int | None]:
        """(returncode, peak RSS in bytes of the largest process it waited for); Nones if it still runs."""
        pid, wait_status, usage = os.wait4(self.process.pid, 0 if self.done.is_set() else os.WNOHANG)
        if pid == 0:
            return None, None
        self.process.returncode = os.waitstatus_to_exitcode(wait_status)
        return self.process.returncode, usage.ru_maxrss * 1024


def _pump(stream, line_log: LineLog, stop: threading.Event) -> None:
    """Copy the child's output into the log until EOF (or until stopped and quiet)."""
    fd = stream.fileno()
    while True:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            if stop.is_set():
                return
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return
        line_log.feed(chunk)


class _ProcessRun:
    """The launcher process of one run, as the supervisor drives it (sandbox.supervision.Supervised)."""

    def __init__(self, command: list[str], state_dir: Path, handle: RunHandle, plan: LaunchPlan,
                 line_log: LineLog) -> None:
        self._command, self._state_dir, self._handle, self._plan = command, state_dir, handle, plan
        self._log = line_log
        self._process: subprocess.Popen | None = None
        self._waiter: _Waiter | None = None
        self._pump: threading.Thread | None = None
        self._stop_pump = threading.Event()

    def start(self) -> None:
        self._process = subprocess.Popen(
            self._command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={"PATH": CHILD_PATH, "PYTHONPATH": LAUNCHER_PATH}, cwd=self._state_dir, start_new_session=True,
        )
        root = read_proc(self._process.pid)
        self._handle.root_pid, self._handle.root_start = self._process.pid, root.start if root else None
        self._handle.save(self._state_dir)
        self._waiter = _Waiter(self._process)
        self._waiter.start()
        self._pump = threading.Thread(target=_pump, args=(self._process.stdout, self._log, self._stop_pump),
                                      daemon=True)
        self._pump.start()

    def wait(self, timeout_s: float) -> bool:
        return self._waiter.done.wait(timeout_s)

    def kill(self) -> None:
        self._handle.kill()

    def pids(self) -> set[int]:
        return self._handle.pids()

    def meter(self) -> float | None:
        return self._handle.cpu_seconds()

    def oom_seen(self) -> bool:  # cgroup v1's OOM killer kills one process: the supervisor then ends them all
        group = self._handle.group()
        return group is not None and bool(group.oom_killed())

    def report(self) -> Exit:
        self._handle.kill()  # also after a clean exit: nothing the run started outlives it
        self._waiter.done.wait(KILL_GRACE_S)
        self.close_output()
        returncode, max_rss = self._waiter.reap()
        child_returncode, setup_error = namespace_init.read_status(self._plan.status_path)
        if setup_error is not None:
            raise SandboxUnavailable(f"the process sandbox could not be set up: {setup_error}.")
        returncode = returncode if child_returncode is None else child_returncode  # the child's own, not the launcher's
        group = self._handle.group()
        oom, peak = (group.oom_killed(), group.peak_bytes()) if group is not None else (None, max_rss)
        return Exit(None if returncode is None else namespace_init.exit_code(returncode), oom, peak)

    def close_output(self) -> None:
        """Stop copying the run's output (its last lines are in the log) and close the pipe; again: nothing."""
        if self._pump is None:
            return
        self._stop_pump.set()
        self._pump.join(KILL_GRACE_S)
        self._process.stdout.close()
        self._pump = None


class ProcessBackend:
    """Runs each `RunSpec` as an isolated child process (see the module docstring).

    `python` is the interpreter the child runs ("python"/"python3" in a command
    mean it); it must import torch, so its installation is bound into the sandbox.
    `hide` adds host paths the child must not see (the runner's run directory).
    """

    name = "process"

    def __init__(
        self,
        snapshots_root: Path | None = None,
        harness_root: Path | None = None,
        python: str = sys.executable,
        hide: tuple[Path, ...] = (),
        support: HostSupport | None = None,
        gpu_reader: Reader | None = None,
    ) -> None:
        self.snapshots_root = Path(snapshots_root or default_snapshots_root())
        self.snapshots = SnapshotStore(self.snapshots_root)
        self.state_root = self.snapshots_root / ".runs"
        self.harness_root = Path(harness_root or PROJECT_ROOT)  # holds the trusted harness files
        self.python = shutil.which(python) or python
        self._hide = tuple(hide) + (self.snapshots_root.parent,)
        self.launcher = Launcher(self.python, self.harness_root, self.snapshots_root, self._hide)
        self._support = support
        self._gpu_reader = gpu_reader  # None: NVML

    # -- host support ---------------------------------------------------------

    @property
    def support(self) -> HostSupport:
        if self._support is None:
            self._support = probe_host()
            if self._support.isolated:
                log.info("process_backend.isolation", isolation=self._support.describe())
            else:
                log.warning("process_backend.NO_ISOLATION", isolation=self._support.describe(),
                            hint="run as root on Linux with the unshare command for a real sandbox")
        return self._support

    @property
    def isolation(self) -> str:
        return self.support.describe()

    @property
    def child_path(self) -> str:
        return self.launcher.child_path

    # -- images ---------------------------------------------------------------

    def ensure_ready(self) -> None:
        missing = [name for name in HARNESS_FILES if not (self.harness_root / name).is_file()]
        if missing:
            raise SandboxUnavailable(f"the harness file {self.harness_root / missing[0]} does not exist.")
        if refusal := self.support.refusal():
            raise SandboxUnavailable(refusal)
        with self.snapshots.writes():
            self.snapshots_root.mkdir(parents=True, exist_ok=True)
            self.state_root.mkdir(parents=True, exist_ok=True)
        self._self_check()

    def _self_check(self) -> None:
        """Run a trivial child through the whole sandbox once: a broken setup fails here, clearly."""
        probe = "import importlib.util as u, sys\nassert u.find_spec('torch'), 'torch is not importable'\nprint('sandbox-ok')\n"
        image = self.build_image(probe, "self-check")
        with tempfile.TemporaryDirectory() as tmp:
            spec = RunSpec(run_id=f"self-check-{os.getpid()}", image=image, phase=Phase.TRAIN,
                           command=["python", "train.py"], log_path=Path(tmp, "log"), out_dir=Path(tmp, "out"),
                           deadline_s=120.0)
            spec.out_dir.mkdir()
            result = self.run(spec)
        if result.status is not Status.OK:
            raise SandboxUnavailable(f"the process sandbox cannot run its Python ({result.status.value}): "
                                     f"{result.log_tail.strip()[-500:]}")

    def recipe(self) -> str:
        """The harness files and the runtime the child imports: its Python and the packages the harness
        needs, at the versions installed for the child's interpreter (asked of that interpreter)."""
        versions = subprocess.run([self.python, "-c", RUNTIME_VERSIONS], capture_output=True, text=True, timeout=60)
        if versions.returncode != 0:
            raise SandboxUnavailable(f"the process sandbox's Python {self.python} cannot name its packages: "
                                     f"{versions.stderr.strip()[-300:]}")
        return f"process-{snapshot_id({**harness_files(self.harness_root), 'runtime': versions.stdout.encode()})}"

    def build_image(self, train_py: str, exp_id: str) -> str:
        return self.snapshots.build({**harness_files(self.harness_root), "train.py": train_py.encode()}, exp_id)

    def image_exists(self, image: str) -> bool:
        return self.snapshots.exists(image)

    def remove_image(self, image: str) -> None:
        self.snapshots.remove(image)

    # -- runs -----------------------------------------------------------------

    def run(self, spec: RunSpec, cancel: CancelToken | None = None) -> RunResult:
        with Supervisor(spec) as supervisor:
            if self.image_exists(spec.image):
                ending = self._run(spec, cancel, supervisor)
            else:
                supervisor.log.note(f"snapshot {spec.image} does not exist")
                ending = Ending(Status.CRASH)
            return supervisor.result(ending, self.isolation)

    def _run(self, spec: RunSpec, cancel: CancelToken | None, supervisor: Supervisor) -> Ending:
        if refusal := self.support.refusal():  # never a run without the memory limit it was given
            raise SandboxUnavailable(refusal)
        state_dir = self.state_root / spec.run_id
        shutil.rmtree(state_dir, ignore_errors=True)
        state_dir.mkdir(parents=True)
        support = self.support
        handle = RunHandle(spec.run_id, uid=Launcher.uid(state_dir) if support.isolated else None, cgroup=None,
                           owner=process_identity(os.getpid()))
        try:
            if support.cgroups is not None:
                handle.cgroup = Launcher.cgroup(support.cgroups, spec, state_dir).record()
            plan = self.launcher.plan(spec, handle, state_dir, support)
            run = _ProcessRun(Launcher.command(state_dir, support), state_dir, handle, plan, supervisor.log)
            try:
                return supervisor.supervise(run, cancel, self._gpu_reader)
            finally:
                run.close_output()
        finally:
            handle.kill()
            handle.clean_up(state_dir)

    # -- leftovers ------------------------------------------------------------

    def reap(self) -> int:
        """Kill and remove what runs of a runner that is gone left: processes, cgroups, state. The runs of a live
        runner are left alone, this one's and another's alike (two nights on one host share the snapshots)."""
        reaped = 0
        for record in sorted(self.state_root.glob(f"*/{RUN_RECORD}")):
            handle = RunHandle(**json.loads(record.read_text()))
            if handle.owner and identity_alive(handle.owner):
                continue
            handle.kill()
            handle.clean_up(record.parent)
            reaped += 1
        if reaped:
            log.info("process_backend.reaped", runs=reaped)
        return reaped

